"""The ``claim`` method: new classes from a few examples, calibrated on what they may claim (numpy only).

A new class gets one column and one bias; the old columns stay bit-identical.

**Direction.** With class statistics that hold a Gram matrix (and a head that does not
L2-normalise its features), the column is a shrinkage discriminant direction put on the head's
own scale: the shared within-class covariance ``Sw`` of the old classes, shrunk towards a scaled
identity, ``P = inv((1 - a) Sw + a tr(Sw)/D I)`` with ``a`` = ``claim_shrinkage``; the old classes'
discriminant columns ``P m_c`` are fitted to the head's real columns by one scale ``s`` and one
offset vector ``v`` (least squares in the ``Sw`` metric on class-centred columns), and the new
column is ``s P m + v`` for the new class's mean feature ``m``. Otherwise (no statistics, an
L2-normalised head, fewer than two old classes) it is the prototype column of
:func:`edgeadapt.device.prototype_column.prototype_column`: the unit mean feature of the shots
scaled to the mean norm of the existing columns, the rule the C head library implements too.

**Bias: the claim budget.** The bias is set so that the new class beats the best existing
class on at most ``claim_budget`` of a calibration set: samples drawn from the old classes'
statistics (``N(mu_c, Sw)``, a fixed seeded draw, at most :data:`MAX_SYNTHETIC` in all) plus
every real embedding the caller gives (the bundle's background photos, the old classes'
reference embeddings, examples the device learned earlier). ``claim_budget`` is the one
operating knob: smaller keeps the old classes safer, larger recognises more of the new class.
A class always wins at the mean of its own examples (the bias is raised to that floor when
needed), so a class learned from one photo recognises that photo. With no calibration
embeddings at all (a head without statistics or background), the bias is the mean of the
existing biases (0 for the first class), raised to the same floor. Without statistics this is
exactly :func:`~edgeadapt.device.prototype_column.prototype_column`, the rule of the C head
library.

Each new class is calibrated against the existing columns only, so adding several classes in
one call gives the same columns in any order. The solver state (``P``, the alignment, the
synthetic samples and their best existing logits) is cached per head and statistics, so that
an added class costs a few matrix-vector products once it is built.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from edgeadapt.device.errors import InputError
from edgeadapt.device.head import ClassStats, Head
from edgeadapt.device.prototype_column import (
    EMPTY_HEAD_SCALE,
    claim_threshold,
    column_norms,
    mean_column_norm,
    prototype_column,
    prototype_direction,
    raise_to_floor,
)

#: The largest number of synthetic old-class samples drawn from the statistics.
MAX_SYNTHETIC = 4096
#: Synthetic samples per old class, at most (fewer when there are many classes).
SYNTHETIC_PER_CLASS = 512
#: Synthetic samples per old class, at least.
MIN_SYNTHETIC_PER_CLASS = 4
#: Seed of the synthetic draw (fixed: the same bundle gives the same columns).
SYNTHETIC_SEED = 20261201
#: Examples beyond one per class the statistics need before their covariance is used (fewer: the
#: statistics-free path, as for a head whose classes were each learned from a few photos).
MIN_DEGREES = 20
#: Solver states kept in memory (one per head and statistics in use).
CACHE_SIZE = 4


@dataclass
class _Solver:
    """What an added class needs from the head and its statistics, computed once.

    Built for the head's first ``classes`` columns; it serves heads that extend those columns
    by up to its refresh limit (classes added since), like ridge's cached basis.
    """

    key: bytes  # _prefix_key of the head and statistics it was built for
    classes: int
    feature_mean: np.ndarray  # (D,) float64, zeros when the head has none
    projection: np.ndarray | None  # P (D, D) float32, None for prototype columns
    scale: float
    offset: np.ndarray | None  # v (D,)
    synthetic: np.ndarray  # (N, D) float32 head features of the synthetic old-class samples
    synthetic_best: np.ndarray  # (N,) best logit (before the temperature) over the first `classes` columns
    norms: np.ndarray  # (classes,) L2 norm of each of the first `classes` columns


@dataclass
class _Calibrated:
    """Head features of a calibration set and their best logit over a head's first ``classes`` columns."""

    key: bytes  # _prefix_key of the head's first `classes` columns
    classes: int
    rows_key: bytes  # _rows_key of the calibration rows
    blocks: list[tuple[np.ndarray, np.ndarray]]  # (features (m, D) float32, best (m,)) per block of rows

    @property
    def rows(self) -> int:
        return sum(features.shape[0] for features, _ in self.blocks)


_SOLVERS: list[_Solver] = []
_CALIBRATED: list[_Calibrated] = []


def clear_cache() -> None:
    """Forget every cached solver state and calibration set (benchmarks: measure a cold start).

    Returns:
        None.
    """
    _SOLVERS.clear()
    _CALIBRATED.clear()


def _row_sums(rows: np.ndarray) -> np.ndarray:
    """Each row's sum (float64): computed once per calibration set, its prefixes serve every prefix key."""
    values = np.asarray(rows)
    return np.add.reduce(values, axis=1, dtype=np.float64) if values.size else np.zeros(values.shape[:1])


def _prefix_key(head: Head, stats: ClassStats | None, classes: int, options) -> bytes:
    """Key of the head's first ``classes`` columns (and of the statistics' first ``classes`` rows)."""
    digest = hashlib.blake2b(digest_size=16)
    # a strided sample of the weight rows and every bias: an update that changes a column changes its bias too
    digest.update(np.ascontiguousarray(head.weights[:: max(1, head.embedding_size // 64), :classes]).tobytes())
    digest.update(head.bias[:classes].tobytes())
    digest.update(b"none" if head.feature_mean is None else head.feature_mean.tobytes())
    digest.update(repr((head.l2_normalize, options.claim_shrinkage, classes)).encode())
    if stats is None:
        digest.update(b"no statistics")
    else:
        digest.update(stats.counts[:classes].tobytes())
        digest.update(np.ascontiguousarray(stats.sums[:classes, :: max(1, stats.sums.shape[1] // 64)]).tobytes())
        digest.update(b"gram" if stats.gram is not None else b"no gram")
    return digest.digest()


def _rows_key(rows: np.ndarray, row_sums: np.ndarray) -> bytes:
    """Key of calibration rows: their shape, their row sums (``row_sums``) and a strided sample of them.

    A cache key, not a checksum.
    """
    values = np.asarray(rows)
    digest = hashlib.blake2b(repr((values.shape, values.dtype.str)).encode(), digest_size=16)
    if values.size:
        digest.update(np.ascontiguousarray(row_sums, dtype=np.float64).tobytes())
        digest.update(np.ascontiguousarray(values[:: max(1, values.shape[0] // 64)]).tobytes())
    return digest.digest()


def _refresh_limit(classes: int, options) -> int:
    """Classes that may be added before a solver built for ``classes`` columns is rebuilt."""
    return max(int(options.basis_refresh_minimum), int(options.basis_refresh_fraction * classes))


def _extended_best(head: Head, features: np.ndarray, best: np.ndarray, classes: int) -> np.ndarray:
    """``best`` (over the first ``classes`` columns) extended to every column of ``head``."""
    if head.num_classes == classes or features.shape[0] == 0:
        return best
    extra = np.asarray(features, dtype=np.float32) @ head.weights[:, classes:]  # no copy of float32 rows
    extra += head.bias[classes:]
    return np.maximum(best, extra.max(axis=1).astype(np.float64))


def _solver(head: Head, stats: ClassStats | None, options) -> tuple[_Solver, np.ndarray]:
    """The cached solver serving ``head`` (built when none does) and its synthetic samples' best logits."""
    for solver in reversed(_SOLVERS):
        if (solver.classes <= head.num_classes <= solver.classes + _refresh_limit(solver.classes, options)
                and _prefix_key(head, stats, solver.classes, options) == solver.key):
            _SOLVERS.remove(solver)
            _SOLVERS.append(solver)
            return solver, _extended_best(head, solver.synthetic, solver.synthetic_best, solver.classes)
    solver = _build_solver(head, stats, options)
    _SOLVERS.append(solver)
    del _SOLVERS[:-CACHE_SIZE]
    return solver, solver.synthetic_best


def _features(head: Head, embeddings: np.ndarray) -> np.ndarray:
    return head.features(np.asarray(embeddings, dtype=np.float32)).astype(np.float64)


def _features32(head: Head, embeddings: np.ndarray) -> np.ndarray:
    """Head features in float32 (calibration sets: half the memory traffic of float64)."""
    return np.ascontiguousarray(head.features(np.asarray(embeddings, dtype=np.float32)), dtype=np.float32)


def _build_solver(head: Head, stats: ClassStats | None, options) -> _Solver:
    size = head.embedding_size
    feature_mean = (np.zeros(size) if head.feature_mean is None
                    else head.feature_mean.astype(np.float64))
    usable = (stats is not None and stats.gram is not None and stats.num_classes == head.num_classes
              and int(np.count_nonzero(stats.counts)) == head.num_classes
              and int(stats.counts.sum()) - head.num_classes >= max(MIN_DEGREES, head.num_classes))
    key = _prefix_key(head, stats, head.num_classes, options)
    norms = column_norms(head.weights)
    empty = _Solver(key, head.num_classes, feature_mean, None, 0.0, None, np.zeros((0, size), np.float32), np.zeros(0), norms)
    if not usable:
        return empty
    within = stats.within_covariance()
    trace = float(np.trace(within))
    if not trace > 0:
        return empty
    synthetic = _features32(head, _synthetic_samples(stats, within, trace))
    synthetic_best = _best_logits(head, synthetic)
    projection, scale, offset = None, 0.0, None
    if not head.l2_normalize and head.num_classes >= 2:
        shrinkage = options.claim_shrinkage
        shrunk = (1.0 - shrinkage) * within
        shrunk[np.diag_indices(size)] += shrinkage * trace / size
        projection = np.linalg.inv(shrunk)
        projection = 0.5 * (projection + projection.T)
        scale, offset = _alignment(head, stats, feature_mean, projection, within)
        if not (math.isfinite(scale) and scale > 0 and np.all(np.isfinite(offset))):
            projection, scale, offset = None, 0.0, None
        else:
            projection = projection.astype(np.float32)  # a direction: float32 halves the work per class
    return _Solver(key, head.num_classes, feature_mean, projection, scale, offset, synthetic, synthetic_best, norms)


def _synthetic_samples(stats: ClassStats, within: np.ndarray, trace: float) -> np.ndarray:
    """A fixed, seeded draw of N(mu_c, Sw) per old class (raw embeddings)."""
    classes, size = stats.num_classes, within.shape[0]
    per_class = max(MIN_SYNTHETIC_PER_CLASS, min(SYNTHETIC_PER_CLASS, MAX_SYNTHETIC // max(classes, 1)))
    regularised = within.copy()
    regularised[np.diag_indices(size)] += 1e-6 * trace / size  # positive definite for the Cholesky factor
    factor = np.linalg.cholesky(regularised)
    rng = np.random.default_rng(SYNTHETIC_SEED)
    noise = rng.standard_normal((classes * per_class, size))
    means = stats.sums / np.maximum(stats.counts, 1)[:, None]
    return np.repeat(means, per_class, axis=0) + noise @ factor.T


def _alignment(head: Head, stats: ClassStats, feature_mean: np.ndarray, projection: np.ndarray,
               within: np.ndarray) -> tuple[float, np.ndarray]:
    """Scale s and offset v so that s P m_c + v fits the head's columns (Sw-weighted least squares)."""
    means = stats.sums / np.maximum(stats.counts, 1)[:, None] - feature_mean
    discriminant = projection @ means.T  # (D, C)
    weights = head.weights.astype(np.float64)
    centred_weights = weights - weights.mean(axis=1, keepdims=True)
    centred_discriminant = discriminant - discriminant.mean(axis=1, keepdims=True)
    weighted = within @ centred_discriminant
    denominator = float(np.sum(centred_discriminant * weighted))
    if not denominator > 0:
        return 0.0, np.zeros(head.embedding_size)
    scale = float(np.sum(centred_weights * weighted)) / denominator
    offset = weights.mean(axis=1) - scale * discriminant.mean(axis=1)
    return scale, offset


def _best_logits(head: Head, features: np.ndarray) -> np.ndarray:
    """The best existing logit (before the temperature) per row of ``features`` (float32 products, float64 out)."""
    if head.num_classes == 0 or features.shape[0] == 0:
        return np.full(features.shape[0], -np.inf)
    logits = features.astype(np.float32) @ head.weights
    logits += head.bias
    return logits.max(axis=1).astype(np.float64)


def _column_scale(head: Head, solver: _Solver) -> float:
    """:func:`~edgeadapt.device.prototype_column.mean_column_norm` of ``head``, from the solver's cached norms."""
    if head.num_classes == 0:
        return EMPTY_HEAD_SCALE
    norms = solver.norms
    if head.num_classes > solver.classes:
        norms = np.concatenate([norms, column_norms(head.weights[:, solver.classes:])])
    return float(np.mean(norms))


def _direction_column(head: Head, solver: _Solver, shots: np.ndarray) -> np.ndarray:
    """The new class's column (D,) float32 from its raw shot embeddings."""
    if solver.projection is None:
        column, _ = prototype_direction(head, shots, _column_scale(head, solver))
        return column
    mean = np.asarray(shots, dtype=np.float64).mean(axis=0) - solver.feature_mean
    column = solver.scale * (solver.projection @ mean.astype(np.float32)).astype(np.float64) + solver.offset
    return column.astype(np.float32)


def _claim_bias(column: np.ndarray, parts: list[tuple[np.ndarray, np.ndarray]], budget: float) -> float | None:
    """The bias at which ``column`` beats the best existing logit on at most ``budget`` of the samples.

    ``parts``: (features (n, D), best existing logits (n,)) pairs, used without concatenating the
    features. None when there are no samples (or no existing class to beat).
    """
    margins = [best - (features @ column.astype(features.dtype)).astype(np.float64)
               for features, best in parts if features.shape[0]]
    if not margins:
        return None
    margins = np.sort(np.concatenate(margins))
    if not np.all(np.isfinite(margins)):
        return None
    return claim_threshold(margins, budget)


def _float32_at_most(value: float) -> float:
    if not abs(value) <= float(np.finfo(np.float32).max):
        raise InputError("the new class's bias does not fit float32: the calibration embeddings are far outside "
                         "the head's range; check the backbone output")
    rounded = np.float32(value)
    if float(rounded) > value:
        rounded = np.nextafter(rounded, np.float32(-np.inf))
    return float(rounded)


def _calibrated_bias(head: Head, samples: list[tuple[np.ndarray, np.ndarray]], column: np.ndarray,
                     prototype: np.ndarray, options, default: float) -> float:
    """The claim-budget bias of ``column`` against ``head``'s columns, raised to the prototype floor.

    ``samples``: (features, best existing logits) pairs of the calibration set.
    """
    claim = _claim_bias(column, samples, options.claim_budget)
    bias = default if claim is None else _float32_at_most(claim)
    return raise_to_floor(head, column, prototype, bias)


@dataclass(frozen=True)
class _KeyOptions:
    """Key settings of a calibration set's cache entry (it depends on no option)."""

    claim_shrinkage: float = 0.0


_KEY_OPTIONS = _KeyOptions()


#: More blocks than this in a calibration entry: the blocks after the first are joined into one.
MAX_CALIBRATION_BLOCKS = 8


def _joined_tail(blocks: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``blocks`` with every block after the first joined into one when there are more than :data:`MAX_CALIBRATION_BLOCKS`.

    The first block holds the calibration set as first seen (background and references: large);
    the later ones hold a few device examples each. Joining them keeps the work per update from
    growing with the number of updates made in this process.
    """
    if len(blocks) <= MAX_CALIBRATION_BLOCKS:
        return blocks
    tail = blocks[1:]
    return [blocks[0], (np.concatenate([features for features, _ in tail]), np.concatenate([best for _, best in tail]))]


def _real_calibration(head: Head, calibration: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Head features of the caller's calibration embeddings and their best existing logits, in blocks of rows.

    Cached and extended: a set that starts with the rows of an earlier one (the updater appends
    the examples it learns) and a head that extends its columns reuse the earlier work; the
    first (large) block is never copied, the small blocks appended after it are joined now and then.
    """
    if calibration is None or not len(calibration):
        return []
    calibration = np.asarray(calibration)
    row_sums = _row_sums(calibration)
    full_key = _rows_key(calibration, row_sums)
    for entry in reversed(_CALIBRATED):
        rows = entry.rows
        if (entry.classes <= head.num_classes and rows <= calibration.shape[0]
                and (full_key if rows == calibration.shape[0] else _rows_key(calibration[:rows], row_sums[:rows])) == entry.rows_key
                and _prefix_key(head, None, entry.classes, _KEY_OPTIONS) == entry.key):
            break
    else:
        entry = None
    if entry is None:
        features = _features32(head, calibration)
        blocks = [(features, _best_logits(head, features))]
    else:
        blocks = [(features, _extended_best(head, features, best, entry.classes)) for features, best in entry.blocks]
        if entry.rows < calibration.shape[0]:
            added = _features32(head, calibration[entry.rows:])
            blocks.append((added, _best_logits(head, added)))
        blocks = _joined_tail(blocks)
    if entry is None or entry.classes != head.num_classes or entry.rows != calibration.shape[0]:
        _CALIBRATED.append(_Calibrated(_prefix_key(head, None, head.num_classes, _KEY_OPTIONS), head.num_classes,
                                       full_key, blocks))
    del _CALIBRATED[:-CACHE_SIZE]
    return blocks


def claim_columns(
    head: Head,
    stats: ClassStats | None,
    arrays: list[np.ndarray],
    calibration: np.ndarray | None,
    options,
) -> tuple[np.ndarray, np.ndarray]:
    """The columns (D, k) and biases (k,) of ``k`` new classes with the ``claim`` method.

    Args:
        head: The head the classes are added to (any normalisation; zero classes allowed).
        stats: Its class statistics, or None; with a Gram matrix the direction is the aligned
            shrinkage discriminant and the calibration includes samples drawn from them.
        arrays: One (n_i, D) array of raw embeddings per new class (checked by the caller).
        calibration: Optional raw embeddings (N, D) of other things the device sees
            (background photos, reference embeddings, earlier device examples).
        options: An :class:`~edgeadapt.device.incremental.AddClassOptions` (``claim_budget``,
            ``claim_shrinkage``).

    Returns:
        ``(weights, biases)``: float64 arrays of the new columns, each calibrated against the
        existing columns only (independent of the order of ``arrays``).

    Raises:
        InputError: A bias that does not fit float32 (extreme embeddings).
        IncompatibleModelError: Shots whose mean feature is zero (no direction).
    """
    solver, synthetic_best = _solver(head, stats, options)
    real = _real_calibration(head, calibration)
    default = 0.0 if head.num_classes == 0 else float(np.mean(head.bias.astype(np.float64)))
    columns, biases = [], []
    for shots in arrays:
        column = _direction_column(head, solver, shots)
        prototype = _features(head, shots).mean(axis=0)
        biases.append(_calibrated_bias(head, [(solver.synthetic, synthetic_best), *real], column, prototype, options,
                                       default))
        columns.append(column.astype(np.float64))
    return np.stack(columns, axis=1), np.array(biases, dtype=np.float64)


def strengthened_column(
    head: Head,
    stats: ClassStats | None,
    class_index: int,
    embeddings: np.ndarray,
    calibration: np.ndarray | None,
    options,
) -> tuple[np.ndarray, float]:
    """The column and bias of existing class ``class_index`` after more examples, with ``claim``.

    The class is recomputed like a new class added to the head without it: from its statistics
    row (already updated with ``embeddings``) when there are statistics; without them, from the
    new examples' mean feature direction averaged with the class's current column direction.

    Args:
        head: The current head.
        stats: The statistics including the new examples, or None.
        class_index: The class to strengthen.
        embeddings: The new raw examples (n, D).
        calibration: Optional raw calibration embeddings (N, D).
        options: An :class:`~edgeadapt.device.incremental.AddClassOptions`.

    Returns:
        ``(column float64 (D,), bias)``.

    Raises:
        InputError: A bias that does not fit float32 (extreme embeddings).
        IncompatibleModelError: Examples whose mean feature is zero (no direction).
    """
    others = [index for index in range(head.num_classes) if index != class_index]
    rest = head.with_columns(head.weights[:, others], head.bias[others])
    rest_stats = None
    if stats is not None and stats.gram is not None:
        rest_stats = ClassStats(sums=stats.sums[others], counts=stats.counts[others], gram=stats.gram)
    solver, synthetic_best = _solver(rest, rest_stats, options)
    if stats is not None:
        class_mean = stats.sums[class_index] / max(int(stats.counts[class_index]), 1)
        column = _direction_column(rest, solver, class_mean[None, :])
    else:
        mean_feature = _features(head, embeddings).mean(axis=0)
        current = head.weights[:, class_index].astype(np.float64)
        direction = sum(vector / norm for vector in (mean_feature, current)
                        if (norm := float(np.linalg.norm(vector))) > 0)
        length = float(np.linalg.norm(direction))
        if not length > 0:
            column, _ = prototype_column(rest, embeddings)
        else:
            scale = mean_column_norm(rest) if rest.num_classes else float(np.linalg.norm(current)) or 1.0
            column = (direction / length * scale).astype(np.float32)
    real = _real_calibration(rest, calibration)
    prototype = _features(head, embeddings).mean(axis=0)
    bias = _calibrated_bias(rest, [(solver.synthetic, synthetic_best), *real], column, prototype, options,
                            float(head.bias[class_index]))
    return np.asarray(column, dtype=np.float64), bias
