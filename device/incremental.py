"""Head math for adding classes without forgetting the old ones (numpy only).

The host (``edgeadapt add-classes``, ``edgeadapt merge-heads``) and the on-device updater
call exactly these functions, so a class added on either side gets the same column.

Append-only: :func:`add_classes`, :func:`add_examples` and :func:`merge_heads` never touch
an existing column, its bias, or the head's feature normalisation. Together with
:func:`edgeadapt.device.head.column_stable_matmul` (used by :meth:`Head.logits`) this keeps
every old-class logit bit-identical after an update. Only :func:`resolve_all` changes old
columns, and says so.

The hard part is calibration: a new column must compete fairly with old columns that were
trained discriminatively on lots of data. The methods (``AddClassOptions.method``):

``"claim"`` (default)
    The few-shot method of :mod:`edgeadapt.device.fewshot`: an aligned shrinkage-discriminant
    direction (with class statistics) or the prototype direction (without), and a bias at
    which the new class takes at most ``claim_budget`` of a calibration set (samples drawn
    from the statistics, background photos, references, earlier device examples). Works on
    every bundle, trained, imported or headless; chosen by ``edgeadapt bench fewshot``.

``"ridge"``
    Class-balanced closed form from the stored class statistics: no old images needed.
    From the Gram matrix and the class sums come every class's mean and the shared
    within-class covariance ``Sw``; a new class adds its own mean and covariance. Two
    closed forms are solved for ALL classes (old and new) from these moments:

    * class-balanced least squares (ridge regression of one-hot targets on
      ``[features, 1]``, every class weighted equally, ridge ``regularization``): the
      discriminative solution, best with many examples;
    * the shrinkage linear discriminant ``w_c = S^-1 m_c``,
      ``b_c = -1/2 (m_c S^-1 m_c - g d / n_c)`` with ``S = (1-a) Sw + a tr(Sw)/D I``
      (``shrinkage`` a; ``g d / n_c`` removes the small-sample inflation of a mean
      estimated from n_c examples, ``d = tr(S^-1 Sw)``, ``small_sample_correction`` g):
      stable with few examples.

    Calibration: each solution's columns for the OLD classes are compared with the head's
    real old columns. The logit scale ``s`` (class-balanced least squares on column-centred
    logits over the stored class distributions) and the offsets ``v``, ``beta`` that softmax
    leaves free are fitted, and the new columns are mapped the same way
    (``w = s w_closed + v``, ``b = s b_closed + beta``): new columns speak the old columns'
    logit language whatever head the bundle came with (softmax-trained, imported, centred
    or not). A class with n examples then takes ``n / (n + few_shot_examples)`` of its
    column from the least-squares solution and the rest from the discriminant.
    Needs :class:`ClassStats` with a Gram matrix.

    The work that depends only on the classes already in the head (both inverses, the
    calibration) is kept as a :class:`~edgeadapt.device.ridge.RidgeBasis` with the statistics
    and in the bundle, so a new class costs O(D^2 n) instead of O(D^3 + D^2 C): about 10 ms
    instead of 0.7 s at 1000 classes x 1280-d. A new class enters the least-squares moment
    matrix with its own second moment; the shared covariance and the calibration stay those
    of the basis classes until the basis is rebuilt (after ``basis_refresh_fraction`` of its
    classes in updates, or when the head or the settings changed).
``"center_l2"``
    Cosine imprinting for heads trained on centred (stored base mean), L2-normalised
    features: the new column is the normalised mean of the new examples' normalised
    features, scaled to the old columns' mean norm; its bias is the old columns' mean bias.
    Needs a head with ``feature_mean`` and ``l2_normalize``.
``"weight_align"``
    New columns trained with softmax cross-entropy on the new examples (old columns
    frozen), then rescaled so their mean norm equals the old columns' mean norm, biases
    recentred on the old mean bias (weight aligning, Zhao et al. 2020).
``"imprint_calibrated"`` (the statistics-free fallback)
    Imprinting with an own-example bias: the column is the unit-norm mean feature of the new
    examples scaled to the old columns' mean norm; the bias is the lowest value at which the
    new class's logit beats the best logit of the columns already in the head (the old ones
    and the new classes added before it in the same call) on all but the weakest
    ``own_example_quantile`` of its own examples. Needs no statistics and no old-class data,
    so it suits imported heads (not centred, not L2-normalised); a new class claims only
    what looks like its own examples instead of swamping the old classes.
``"imprint"``
    Plain imprinting: the unit-norm mean feature of the new examples, bias 0.
``"none"``
    The uncalibrated lower bound: new columns trained on the new examples only with the
    old columns frozen ("extend the last layer and keep training"). The new columns learn
    to beat the old ones everywhere, so old classes are largely forgotten.

All arrays are float32 in the head, float64 in the statistics. Nothing here writes files.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import numpy as np

from edgeadapt.device.errors import IncompatibleModelError, InputError
from edgeadapt.device.add_options import (  # noqa: F401 (re-exported: the options of this module's functions)
    DEFAULT_METHOD,
    METHODS,
    STATISTICS_FREE_METHOD,
    STATISTICS_METHODS,
    TRAINED_METHODS,
    AddClassOptions,
    needs_statistics,
)
from edgeadapt.device.head import ClassStats, Head, softmax
from edgeadapt.device.ridge import (
    as_basis,
    resolve_columns,
    ridge_merge_columns,
    within_covariance,
    basis_class_column,
    basis_new_columns,
    build_ridge_basis,
    class_feature_mean,
    current_basis,
    new_class_examples,
)

logger = logging.getLogger(__name__)

# ============================================================================= validation
def _check_options(options: AddClassOptions) -> AddClassOptions:
    if not isinstance(options, AddClassOptions):
        raise InputError(f"options must be an AddClassOptions, got {type(options).__name__}")
    return options


def _check_stats(head: Head, stats: ClassStats | None, what: str = "class statistics") -> None:
    if stats is None:
        return
    if stats.num_classes != head.num_classes or stats.embedding_size != head.embedding_size:
        raise IncompatibleModelError(
            f"{what} cover {stats.num_classes} classes x {stats.embedding_size} dimensions but the head has "
            f"{head.num_classes} classes x {head.embedding_size} dimensions; they do not belong to this head"
        )


def _check_embeddings(head: Head, embeddings, what: str) -> np.ndarray:
    """One class's raw embeddings as float64 (n >= 1, D), or :class:`InputError`."""
    try:
        array = np.asarray(embeddings)
    except (TypeError, ValueError) as error:
        raise InputError(f"{what}: embeddings must be a numeric (n, {head.embedding_size}) array ({error})") from error
    if array.ndim == 1 and array.size == head.embedding_size:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != head.embedding_size:
        raise InputError(
            f"{what}: embeddings have shape {array.shape}, but this head takes {head.embedding_size}-d embeddings "
            f"(an (n, {head.embedding_size}) array); were they computed with another backbone?"
        )
    if array.shape[0] == 0:
        raise InputError(f"{what}: no examples; give at least one embedding (image) per class")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise InputError(f"{what}: embeddings must be real numbers, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise InputError(f"{what}: embeddings contain NaN or infinite values; check the backbone output and the images")
    return array


def _check_class_list(head: Head, new_embeddings: Sequence[np.ndarray]) -> list[np.ndarray]:
    if isinstance(new_embeddings, np.ndarray):
        raise InputError(
            "new_embeddings must be a list with one (n_i, D) array per new class, not a single array; "
            "wrap one class's embeddings as [embeddings]"
        )
    try:
        arrays = list(new_embeddings)
    except TypeError as error:
        raise InputError("new_embeddings must be a list with one (n_i, D) array per new class") from error
    if not arrays:
        raise InputError("no new classes given; pass one (n_i, D) embedding array per new class")
    return [_check_embeddings(head, array, f"new class {number}") for number, array in enumerate(arrays)]


def _check_index(head: Head, class_index: int) -> int:
    if isinstance(class_index, (bool, np.bool_)) or not isinstance(class_index, (int, np.integer)):
        raise InputError(f"class_index must be an integer, got {class_index!r}")
    index = int(class_index)
    if not 0 <= index < head.num_classes:
        raise InputError(f"class_index {index} is out of range: the head has classes 0..{head.num_classes - 1}")
    return index


def require_statistics(stats: ClassStats | None, method: str, action: str) -> ClassStats:
    """``stats`` if ``method`` can ``action`` with them, else :class:`IncompatibleModelError` saying what to do."""
    if stats is None:
        raise IncompatibleModelError(
            f"method {method!r} needs the class statistics of the existing classes to {action}, and this head "
            "has none. Re-export the base bundle with class statistics (export_bundle(..., class_stats=...), as "
            "`edgeadapt demo` does), or on the host pass examples of the old classes (replay) so that they can be "
            f"computed, or leave the method out (the default, {DEFAULT_METHOD!r}, needs no statistics) or choose "
            "--method weight_align"
        )
    if method in STATISTICS_METHODS and stats.gram is None:
        raise IncompatibleModelError(
            f"method {method!r} needs the shared Gram matrix in the class statistics to {action}, and these "
            "statistics have none. Recompute them with ClassStats.from_embeddings(..., with_gram=True) from "
            "examples of the old classes, or choose imprint_calibrated / center_l2 / weight_align / imprint"
        )
    return stats


# ============================================================================= statistics
def _features(head: Head, embeddings: np.ndarray) -> np.ndarray:
    """The head's feature normalisation in float64."""
    features = np.asarray(embeddings, dtype=np.float64)
    if head.feature_mean is not None:
        features = features - head.feature_mean.astype(np.float64)
    if head.l2_normalize:
        norms = np.sqrt(np.einsum("ij,ij->i", features, features))
        features = features / np.maximum(norms, 1e-12)[:, None]
    return features


def _append_stats(stats: ClassStats | None, arrays: list[np.ndarray]) -> ClassStats | None:
    if stats is None:
        return None
    sums = np.concatenate([stats.sums, np.stack([array.sum(axis=0) for array in arrays])])
    counts = np.concatenate([stats.counts, np.array([array.shape[0] for array in arrays], dtype=np.int64)])
    gram = None
    if stats.gram is not None:
        stacked = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        gram = stacked.T @ stacked  # one new D x D array, then one pass adding the old Gram into it
        gram += stats.gram
    stored = as_basis(stats.ridge_basis)
    basis = stored.after(len(arrays)) if stored is not None else None
    return ClassStats(sums=sums, counts=counts, gram=gram, extra=dict(stats.extra), ridge_basis=basis)


# ============================================================================= trained columns
def train_columns(
    features: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    bias: np.ndarray,
    columns: np.ndarray,
    temperature: float,
    options: AddClassOptions,
) -> tuple[np.ndarray, np.ndarray]:
    """Train ``columns`` of a linear softmax classifier, the other columns frozen.

    Full-batch Adam on class-balanced cross-entropy of ``(features @ W + b) / temperature``
    with L2 weight decay on the trained columns. ``features`` are already normalised (N, D).
    Returns float64 copies of the full weights (D, C) and bias (C,). Deterministic.

    This is not :func:`edgeadapt.head_training.train_head` (the host's trainer of a whole
    head) and cannot replace it, nor the reverse: here a few columns are trained with every
    other column frozen, full-batch and class-balanced (a handful of new examples against
    many old classes), without randomness or validation data, in float64 so that a device
    update is reproducible; the host trains every column of a new head on a whole dataset
    with shuffled mini-batches, early stopping on validation loss and warm starts.
    """
    weights = np.array(weights, dtype=np.float64)
    bias = np.array(bias, dtype=np.float64)
    columns = np.asarray(columns, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    count = weights.shape[1]
    targets = np.zeros((labels.size, count))
    targets[np.arange(labels.size), labels] = 1.0
    frequency = np.bincount(labels, minlength=count).astype(np.float64)
    sample_weight = 1.0 / frequency[labels]
    sample_weight /= sample_weight.sum()
    moment_w = np.zeros((weights.shape[0], columns.size))
    square_w = np.zeros_like(moment_w)
    moment_b = np.zeros(columns.size)
    square_b = np.zeros(columns.size)
    beta1, beta2, epsilon = 0.9, 0.999, 1e-8
    for step in range(1, options.training_steps + 1):
        probabilities = softmax((features @ weights + bias) / temperature)
        error = (probabilities - targets)[:, columns] * (sample_weight[:, None] / temperature)
        gradient_w = features.T @ error + options.weight_decay * weights[:, columns]
        gradient_b = error.sum(axis=0)
        moment_w = beta1 * moment_w + (1 - beta1) * gradient_w
        square_w = beta2 * square_w + (1 - beta2) * gradient_w**2
        moment_b = beta1 * moment_b + (1 - beta1) * gradient_b
        square_b = beta2 * square_b + (1 - beta2) * gradient_b**2
        correction1, correction2 = 1 - beta1**step, 1 - beta2**step
        weights[:, columns] -= options.learning_rate * (moment_w / correction1) / (np.sqrt(square_w / correction2) + epsilon)
        bias[columns] -= options.learning_rate * (moment_b / correction1) / (np.sqrt(square_b / correction2) + epsilon)
    return weights, bias


def _mean_norm(weights: np.ndarray) -> float:
    if weights.shape[1] == 0:  # a zero-class (headless) head: unit-norm columns
        return 1.0
    return float(np.mean(np.linalg.norm(weights.astype(np.float64), axis=0)))


def _align_weights(
    new_weights: np.ndarray, new_bias: np.ndarray, old_weights: np.ndarray, old_bias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Weight aligning: rescale new columns to the old columns' mean norm, recentre biases on the old mean."""
    new_norm = _mean_norm(new_weights)
    factor = _mean_norm(old_weights) / new_norm if new_norm > 0 else 1.0
    bias = factor * (new_bias - new_bias.mean()) + float(np.mean(old_bias))
    return new_weights * factor, bias


def _unit(vectors: np.ndarray) -> np.ndarray:
    """Columns of ``vectors`` (D, k) scaled to unit norm (zero columns stay zero)."""
    norms = np.linalg.norm(vectors, axis=0)
    return vectors / np.where(norms > 0, norms, 1.0)


def _own_example_bias(head: Head, column: np.ndarray, features: np.ndarray, others: np.ndarray,
                      quantile: float) -> float:
    """imprint_calibrated: the bias at which ``column`` beats ``others`` on 1 - ``quantile`` of ``features``.

    ``features``: the class's own examples in the head's feature space (n, D), float64.
    The margin of each example is its score ``f . column`` minus the best score (with bias)
    of the columns ``others``; the bias is minus the ``quantile`` of these margins (nudged up
    by a float32 rounding step so that ties go to the new class). The temperature divides
    every logit alike, so it does not change the comparison.
    """
    own = features @ np.asarray(column, dtype=np.float32).astype(np.float64)  # the column as stored
    if others.size == 0:
        return 0.0
    competing = features @ head.weights[:, others].astype(np.float64) + head.bias[others].astype(np.float64)
    margins = own - competing.max(axis=1)
    bias = -float(np.quantile(margins, quantile))
    return float(np.nextafter(np.float32(bias), np.float32(np.inf)))


def _imprint_calibrated_columns(head: Head, arrays: list[np.ndarray], quantile: float) -> tuple[np.ndarray, np.ndarray]:
    """New columns for imprint_calibrated, in order (each competes with the old and the earlier new ones)."""
    scale = _mean_norm(head.weights)
    current = head
    columns, biases = [], []
    for array in arrays:
        features = _features(head, array)
        column = _unit(features.mean(axis=0)[:, None])[:, 0] * scale
        bias_value = _own_example_bias(current, column, features, np.arange(current.num_classes), quantile)
        columns.append(column)
        biases.append(bias_value)
        current = _appended(current, column[:, None], np.array([bias_value]))
    return np.stack(columns, axis=1), np.array(biases)


def _require_cosine_head(head: Head, method: str) -> None:
    if head.feature_mean is None or not head.l2_normalize:
        raise IncompatibleModelError(
            f"method {method!r} needs a head trained on centred, L2-normalised features (feature_mean set and "
            "l2_normalize true; train it with HeadTrainingOptions(normalization='center_l2')); this head "
            f"{'has no feature mean' if head.feature_mean is None else 'does not L2-normalise'}. Use method "
            "'ridge' or 'weight_align' for this head"
        )


def _replay_features(head: Head, replay) -> tuple[np.ndarray, np.ndarray]:
    if replay is None:
        return np.zeros((0, head.embedding_size)), np.zeros(0, dtype=np.int64)
    try:
        embeddings, labels = replay
    except (TypeError, ValueError) as error:
        raise InputError("replay must be a pair (embeddings (n, D), labels (n,)) of old-class examples") from error
    embeddings = _check_embeddings(head, embeddings, "replay")
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != embeddings.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"replay labels must be {embeddings.shape[0]} integer class indices, got {labels.shape} {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= head.num_classes):
        raise InputError(f"replay labels must be existing class indices 0..{head.num_classes - 1}")
    return _features(head, embeddings), labels.astype(np.int64)


# ============================================================================= public API
def add_classes(
    head: Head,
    stats: ClassStats | None,
    new_embeddings: Sequence[np.ndarray],
    options: AddClassOptions = AddClassOptions(),
    *,
    replay: tuple[np.ndarray, np.ndarray] | None = None,
    calibration: np.ndarray | None = None,
) -> tuple[Head, ClassStats | None]:
    """Append one column per new class; the old columns stay bit-identical.

    ``new_embeddings``: one (n_i, D) array of raw backbone embeddings per new class, in
    order; the new classes get indices C, C+1, ... Returns the new head (C+k columns;
    columns 0..C-1, their biases and the feature normalisation are the very same values as
    in ``head``) and the statistics with k rows appended and the Gram matrix updated, or
    None when ``stats`` is None (statistics cannot cover only some classes).

    ``replay`` (keyword only): optional old-class examples (raw embeddings (n, D), class
    indices (n,)). The trained methods (weight_align, none) use them as negatives; the
    closed-form methods use the statistics instead.

    ``calibration`` (keyword only): optional raw embeddings (N, D) of ordinary photos or of
    old-class examples (the bundle's background and references). Methods that calibrate a new
    class against what it may claim use them; the others ignore them.

    Raises :class:`InputError` for an empty list, a class without examples, NaN/inf values
    or embeddings of the wrong size, and :class:`IncompatibleModelError` when the method
    needs statistics (ridge) that are missing, or a head normalisation it does not support.
    """
    options = _check_options(options)
    _check_stats(head, stats)
    arrays = _check_class_list(head, new_embeddings)
    method = options.method
    old_count = head.num_classes
    if method in STATISTICS_METHODS:
        stats = require_statistics(stats, method, "add classes")
    if method == "center_l2":
        _require_cosine_head(head, method)
    updated = _append_stats(stats, arrays)
    new_indices = np.arange(old_count, old_count + len(arrays))

    if method == "claim":
        from edgeadapt.device.fewshot import claim_columns

        if calibration is not None:
            calibration = _check_embeddings(head, calibration, "calibration embeddings")
        new_weights, new_bias = claim_columns(head, stats, arrays, calibration, options)
    elif method == "ridge":
        assert updated is not None and stats is not None and stats.gram is not None
        basis = current_basis(head, stats, options)
        means, deviations = new_class_examples(head, arrays)
        new_weights, new_bias = basis_new_columns(basis, head, means, deviations, options)
        updated.ridge_basis = basis.after(len(arrays))
    elif method == "imprint_calibrated":
        new_weights, new_bias = _imprint_calibrated_columns(head, arrays, options.own_example_quantile)
    elif method in ("imprint", "center_l2"):
        means = np.stack([_features(head, array).mean(axis=0) for array in arrays], axis=1)
        if method == "imprint":
            new_weights, new_bias = _unit(means), np.zeros(len(arrays))
        else:
            new_weights = _unit(means) * _mean_norm(head.weights)
            new_bias = np.full(len(arrays), float(np.mean(head.bias)))
    else:  # trained: weight_align, none
        replay_features, replay_labels = _replay_features(head, replay)
        features = np.concatenate([replay_features] + [_features(head, array) for array in arrays])
        labels = np.concatenate(
            [replay_labels] + [np.full(array.shape[0], index, dtype=np.int64) for index, array in zip(new_indices, arrays)]
        )
        start_weights = np.concatenate([head.weights, np.zeros((head.embedding_size, len(arrays)), np.float32)], axis=1)
        start_bias = np.concatenate([head.bias, np.zeros(len(arrays), np.float32)])
        trained_weights, trained_bias = train_columns(
            features, labels, start_weights, start_bias, new_indices, head.temperature, options
        )
        new_weights, new_bias = trained_weights[:, new_indices], trained_bias[new_indices]
        if method == "weight_align":
            new_weights, new_bias = _align_weights(new_weights, new_bias, head.weights, head.bias)

    result = _appended(head, new_weights, new_bias)
    logger.debug("added %d class(es) with method %s", len(arrays), method)
    return result, updated


def _appended(head: Head, new_weights: np.ndarray, new_bias: np.ndarray) -> Head:
    new_weights = np.asarray(new_weights, dtype=np.float64)
    new_bias = np.asarray(new_bias, dtype=np.float64).reshape(-1)
    if not (np.all(np.isfinite(new_weights)) and np.all(np.isfinite(new_bias))):
        raise IncompatibleModelError(
            "the new columns came out non-finite; the class statistics are probably degenerate "
            "(recompute them from examples) or the examples are extreme"
        )
    weights = np.concatenate([head.weights, new_weights.astype(np.float32)], axis=1)
    bias = np.concatenate([head.bias, new_bias.astype(np.float32)])
    return head.with_columns(weights, bias)


def _replaced_column(head: Head, index: int, column: np.ndarray, bias_value: float) -> Head:
    column = np.asarray(column, dtype=np.float64).reshape(-1)
    if not (np.all(np.isfinite(column)) and np.isfinite(bias_value)):
        raise IncompatibleModelError("the recomputed column came out non-finite; the class statistics are degenerate")
    weights = head.weights.copy()
    bias = head.bias.copy()
    weights[:, index] = column.astype(np.float32)
    bias[index] = np.float32(bias_value)
    return head.with_columns(weights, bias)


def add_examples(
    head: Head,
    stats: ClassStats | None,
    class_index: int,
    embeddings: np.ndarray,
    options: AddClassOptions = AddClassOptions(),
    *,
    calibration: np.ndarray | None = None,
) -> tuple[Head, ClassStats | None]:
    """Strengthen existing class ``class_index`` with more raw embeddings (n, D).

    The class's statistics row (and the Gram matrix) is updated and ONLY its column and
    bias are recomputed; every other column stays bit-identical. ridge: the calibrated
    discriminant column from the updated statistics (calibrated against the other
    columns). center_l2 / imprint: from the updated class mean (needs statistics).
    imprint_calibrated: the direction from the updated class mean (needs statistics: the
    earlier examples are known only through them), scaled to the other columns' mean norm;
    the bias is calibrated on the given examples against every other column.
    weight_align / none: the column is trained further on the new examples (warm start).
    claim: the class is recomputed like a new class added to the head without it (from its
    statistics row, or without statistics from its current direction and the new examples)
    and calibrated on ``calibration`` (keyword only, raw embeddings (N, D)) and the samples the
    statistics give; see :mod:`edgeadapt.device.fewshot`.
    """
    options = _check_options(options)
    _check_stats(head, stats)
    index = _check_index(head, class_index)
    array = _check_embeddings(head, embeddings, f"class {index}")
    method = options.method
    if method in STATISTICS_METHODS or method in ("imprint", "center_l2", "imprint_calibrated"):
        stats = require_statistics(stats, method, "strengthen a class (its column is recomputed from its statistics)")
    if method == "center_l2":
        _require_cosine_head(head, method)
    updated = None
    if stats is not None:
        sums = stats.sums.copy()
        counts = stats.counts.copy()
        sums[index] += array.sum(axis=0)
        counts[index] += array.shape[0]
        gram = None if stats.gram is None else stats.gram + array.T @ array
        stored = as_basis(stats.ridge_basis)
        basis = stored.after(1) if stored is not None else None
        updated = ClassStats(sums=sums, counts=counts, gram=gram, extra=dict(stats.extra), ridge_basis=basis)
    others = np.array([column for column in range(head.num_classes) if column != index], dtype=np.int64)

    if method == "claim":
        from edgeadapt.device.fewshot import strengthened_column

        if calibration is not None:
            calibration = _check_embeddings(head, calibration, "calibration embeddings")
        column, bias_value = strengthened_column(head, updated, index, array, calibration, options)
    elif method == "ridge":
        assert updated is not None and stats is not None
        if others.size == 0:
            raise IncompatibleModelError("a head with a single class cannot be calibrated; add a second class first")
        basis = current_basis(head, stats, options)
        column, bias_value = basis_class_column(
            basis, head, class_feature_mean(head, updated, index), int(updated.counts[index]), index < basis.classes, options)
        updated.ridge_basis = basis.after(1)
    elif method in ("imprint", "center_l2", "imprint_calibrated"):
        assert updated is not None
        model_mean = (updated.sums[index] / max(int(updated.counts[index]), 1))
        if head.feature_mean is not None:
            model_mean = model_mean - head.feature_mean.astype(np.float64)
        direction = _unit(model_mean[:, None])[:, 0]
        if method == "imprint":
            column, bias_value = direction, 0.0
        elif method == "imprint_calibrated":
            column = direction * _mean_norm(head.weights[:, others] if others.size else head.weights)
            bias_value = _own_example_bias(head, column, _features(head, array), others, options.own_example_quantile)
        else:
            reference = head.weights[:, others] if others.size else head.weights
            column = direction * _mean_norm(reference)
            bias_value = float(np.mean(head.bias[others])) if others.size else float(head.bias[index])
    else:
        features = _features(head, array)
        labels = np.full(array.shape[0], index, dtype=np.int64)
        trained_weights, trained_bias = train_columns(
            features, labels, head.weights, head.bias, np.array([index]), head.temperature, options
        )
        column, bias_value = trained_weights[:, index], float(trained_bias[index])
        if method == "weight_align" and others.size:
            factor_norm = float(np.linalg.norm(column))
            if factor_norm > 0:
                column = column * (_mean_norm(head.weights[:, others]) / factor_norm)
            bias_value = float(np.mean(head.bias[others]))
    return _replaced_column(head, index, column, bias_value), updated


def remove_class(head: Head, stats: ClassStats | None, class_index: int) -> tuple[Head, ClassStats | None]:
    """Drop class ``class_index``: its column, bias and statistics row.

    The remaining columns keep their values (classes after it move down one index). The
    Gram matrix cannot be split by class, so the removed class's share is estimated as
    ``n_c (Sw + mu_c mu_c^T)`` with the current shared covariance ``Sw`` and subtracted;
    the shared covariance estimate is unchanged by this.
    """
    _check_stats(head, stats)
    index = _check_index(head, class_index)
    if head.num_classes < 2:
        raise InputError("cannot remove the only class of a head")
    keep = np.array([column for column in range(head.num_classes) if column != index], dtype=np.int64)
    result = head.with_columns(np.ascontiguousarray(head.weights[:, keep]), np.ascontiguousarray(head.bias[keep]))
    if stats is None:
        return result, None
    gram = None
    if stats.gram is not None:
        count = int(stats.counts[index])
        gram = stats.gram.copy()
        if count > 0:
            mean = stats.sums[index] / count
            gram -= count * (within_covariance(stats) + np.outer(mean, mean))
            gram = (gram + gram.T) / 2.0
    updated = ClassStats(sums=stats.sums[keep], counts=stats.counts[keep], gram=gram, extra=dict(stats.extra))
    return result, updated


def merge_heads(
    a: Head,
    a_stats: ClassStats | None,
    b: Head,
    b_stats: ClassStats | None,
    options: AddClassOptions = AddClassOptions(),
) -> tuple[Head, ClassStats | None]:
    """Append the classes of head ``b`` to head ``a`` (a's columns stay bit-identical).

    Both heads must come from the same backbone: the caller compares the backbone
    fingerprints; here only the embedding size is checked. How b's columns enter a:

    - ``ridge``: recomputed from ``b_stats`` (class means) with the shared covariance of the
      combined statistics and calibrated against a's columns, exactly as :func:`add_classes`
      would from b's examples. Needs ``a_stats`` with a Gram matrix and ``b_stats``.
    - ``center_l2`` / ``imprint``: from b's class means when ``b_stats`` is given, otherwise
      from b's own columns (normalised, scaled to a's mean norm; center_l2 only), which then
      needs b to normalise features exactly like a.
    - ``claim``: with ``b_stats``, each of b's classes is added from its class mean as with
      :func:`add_classes` (direction and claim-budget bias against a's columns); without,
      b's own columns as with ``weight_align`` (same normalisation needed).
    - ``weight_align``: b's own columns rescaled to a's mean column norm, biases recentred
      on a's mean bias (same normalisation needed).
    - ``none``: b's columns copied unchanged (plain concatenation; same normalisation needed).

    Returns the merged head and statistics (``a_stats`` rows then ``b_stats`` rows, Gram
    matrices added; b's Gram is estimated from a's shared covariance when b has none), or
    None statistics when either side has none.
    """
    options = _check_options(options)
    if a.embedding_size != b.embedding_size:
        raise IncompatibleModelError(
            f"head a takes {a.embedding_size}-d embeddings and head b {b.embedding_size}-d: they come from different "
            "backbones and cannot be merged; train head b on embeddings of a's backbone"
        )
    _check_stats(a, a_stats, "statistics of head a")
    _check_stats(b, b_stats, "statistics of head b")
    method = options.method
    merged_stats: ClassStats | None = None
    if a_stats is not None and b_stats is not None:
        b_gram = b_stats.gram
        if a_stats.gram is not None and b_gram is None:
            covariance = within_covariance(a_stats)
            means = b_stats.means()
            b_gram = b_stats.counts.sum() * covariance + (means.T * b_stats.counts) @ means
        gram = None if a_stats.gram is None or b_gram is None else a_stats.gram + b_gram
        merged_stats = ClassStats(
            sums=np.concatenate([a_stats.sums, b_stats.sums]),
            counts=np.concatenate([a_stats.counts, b_stats.counts]),
            gram=gram,
            extra=dict(a_stats.extra),
        )

    def need_same_normalisation(reason: str) -> None:
        if not a.same_normalisation(b):
            raise IncompatibleModelError(
                f"heads a and b normalise features differently (feature mean, L2, temperature), so {reason}; "
                "give b's class statistics and use method 'ridge' (its columns are then recomputed in a's space)"
            )

    if method == "ridge":
        require_statistics(a_stats, method, "merge heads")
        if b_stats is None:
            raise IncompatibleModelError(
                "method 'ridge' merges head b through its class statistics, and b has none; export b with class "
                "statistics, or merge with method 'weight_align' (rescales b's own columns)"
            )
        if np.any(b_stats.counts <= 0):
            raise InputError("head b's statistics hold a class with zero examples; every merged class needs examples")
        assert merged_stats is not None and a_stats is not None  # (require_statistics / the check above)
        new_weights, new_bias = ridge_merge_columns(a, a_stats, b_stats, merged_stats, options)
    elif method in ("center_l2", "imprint"):
        if method == "center_l2":
            _require_cosine_head(a, method)
        if b_stats is not None:
            if np.any(b_stats.counts <= 0):
                raise InputError("head b's statistics hold a class with zero examples; every merged class needs examples")
            means = b_stats.means()
            if a.feature_mean is not None:
                means = means - a.feature_mean.astype(np.float64)
            directions = _unit(means.T)
        else:
            need_same_normalisation(f"b's own columns cannot be used by method {method!r}")
            directions = _unit(b.weights.astype(np.float64))
        if method == "imprint":
            new_weights, new_bias = directions, np.zeros(b.num_classes)
        else:
            new_weights = directions * _mean_norm(a.weights)
            new_bias = np.full(b.num_classes, float(np.mean(a.bias)))
    elif method == "claim" and b_stats is not None:
        from edgeadapt.device.fewshot import claim_columns

        if np.any(b_stats.counts <= 0):
            raise InputError("head b's statistics hold a class with zero examples; every merged class needs examples")
        new_weights, new_bias = claim_columns(a, a_stats, [mean[None, :] for mean in b_stats.means()], None, options)
    elif method == "claim":
        need_same_normalisation("b's columns cannot be weight-aligned into a (method 'claim' without b's statistics)")
        new_weights, new_bias = _align_weights(b.weights.astype(np.float64), b.bias.astype(np.float64), a.weights, a.bias)
    elif method == "imprint_calibrated":
        raise IncompatibleModelError(
            "method 'imprint_calibrated' calibrates each new bias on the new class's own examples, and a merge has "
            "only head b's columns and statistics; merge with 'ridge' (with statistics) or 'weight_align', or add b's "
            "classes from their examples with add_classes"
        )
    elif method == "weight_align":
        need_same_normalisation("b's columns cannot be weight-aligned into a")
        new_weights, new_bias = _align_weights(b.weights.astype(np.float64), b.bias.astype(np.float64), a.weights, a.bias)
    else:
        need_same_normalisation("b's columns cannot be concatenated to a")
        new_weights, new_bias = b.weights.astype(np.float64), b.bias.astype(np.float64)
    return _appended(a, new_weights, new_bias), merged_stats


def resolve_all(head: Head, stats: ClassStats | None, options: AddClassOptions = AddClassOptions()) -> Head:
    """Re-fit ALL columns jointly from the class statistics. CHANGES OLD-CLASS OUTPUTS.

    The upper-bound-quality closed form: the shrinkage discriminant of every class from
    the statistics (``options.shrinkage``, ``options.small_sample_correction``; the
    method name is not used), put on the current head's logit scale (the same calibration
    as ridge, fitted over all columns) and keeping the head's feature normalisation. Use
    it when old outputs may change, e.g. after many classes were added one at a time.
    Needs statistics with a Gram matrix and examples for every class.
    """
    options = _check_options(options)
    _check_stats(head, stats)
    stats = require_statistics(stats, "ridge", "re-solve the head")
    empty = np.flatnonzero(stats.counts <= 0)
    if empty.size:
        raise IncompatibleModelError(
            f"the class statistics hold no examples for class(es) {empty.tolist()}; a joint re-fit needs examples of "
            "every class"
        )
    new_weights, new_bias = resolve_columns(head, stats, options)
    return head.with_columns(new_weights.astype(np.float32), new_bias.astype(np.float32))


def with_ridge_basis(head: Head, stats: ClassStats | None, options: AddClassOptions = AddClassOptions()) -> ClassStats | None:
    """``stats`` with the ridge solver state attached (built when it has none), for writing a bundle.

    A bundle that carries its :class:`RidgeBasis` lets the device add a class to a large head
    in milliseconds from the first update on. Statistics without a Gram matrix, or whose basis
    cannot be built (no examples, degenerate), are returned unchanged.
    """
    if stats is None or stats.gram is None or stats.ridge_basis is not None:
        return stats
    _check_stats(head, stats)
    try:
        basis = build_ridge_basis(head, stats, _check_options(options))
    except IncompatibleModelError as error:
        logger.warning("no ridge solver state written with the statistics: %s", error)
        return stats
    return dataclasses.replace(stats, ridge_basis=basis)


def old_logits_unchanged(before: Head, after: Head, embeddings: np.ndarray) -> bool:
    """True when ``after`` gives bit-identical logits to ``before`` for ``before``'s classes."""
    if after.num_classes < before.num_classes:
        return False
    return bool(np.array_equal(before.logits(embeddings), after.logits(embeddings)[:, : before.num_classes]))


# ============================================================================= automatic method choice
def choose_method(stats: ClassStats | None, has_calibration: bool, requested: str | None) -> str:
    """The method an update uses on a head with ``stats``: ``requested``, or the best one the head supports.

    Args:
        stats: the head's class statistics, or None when the bundle carries none (e.g. imported
            without ``--data``, or a headless import).
        has_calibration: whether calibration embeddings (the bundle's background and/or
            reference embeddings) are available to the update.
        requested: the method the user chose (one of :data:`METHODS`), or None for the automatic
            choice.

    Returns:
        ``requested`` when given and supported; otherwise :data:`DEFAULT_METHOD` when ``stats``
        hold a Gram matrix, else :data:`STATISTICS_FREE_METHOD`.

    Raises:
        InputError: ``requested`` is not one of :data:`METHODS`.
        IncompatibleModelError: ``requested`` needs class statistics (with a Gram matrix) that
            the bundle does not carry; the message says what it needs and what to do.
    """
    del has_calibration  # no method of this module needs it to be chosen; the few-shot method will
    if requested is not None:
        if not isinstance(requested, str) or requested not in METHODS:
            raise InputError(f"unknown method {requested!r}; choose one of {', '.join(METHODS)}")
        if requested in STATISTICS_METHODS and (stats is None or stats.gram is None):
            what = "class statistics with a Gram matrix" if stats is None else "a Gram matrix in its class statistics"
            raise IncompatibleModelError(
                f"method {requested!r} needs {what} (per-class sums and counts of the existing classes and "
                f"sum(e e^T)), and this bundle has {'none' if stats is None else 'no Gram matrix'}. Import or export "
                "the model with class statistics (`edgeadapt import ... --data DIR`), or leave the method out to "
                f"use the automatic choice ({STATISTICS_FREE_METHOD} here), or choose one of "
                f"{', '.join(name for name in METHODS if name not in STATISTICS_METHODS)}"
            )
        return requested
    if stats is not None and stats.gram is not None:
        return DEFAULT_METHOD
    return STATISTICS_FREE_METHOD
