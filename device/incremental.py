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
    calibration) is kept as a :class:`~edgeadapt.device.ridge_basis.RidgeBasis` with the statistics
    and in the bundle (built by the first ridge update when the bundle was exported without it),
    so a new class costs O(D^2 n) instead of O(D^3 + D^2 C): about 10 ms instead of 0.7 s at
    1000 classes x 1280-d. A new class enters the least-squares moment
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
    choose_method,
    needs_statistics,
)
from edgeadapt.device.columns import (
    align_weights as _align_weights,
    appended as _appended,
    mean_norm as _mean_norm,
    replaced_column as _replaced_column,
    unit_columns as _unit,
)
from edgeadapt.device.head import ClassStats, Head
from edgeadapt.device.head_checks import (
    check_calibration as _check_calibration,
    check_class_list as _check_class_list,
    check_embeddings as _check_embeddings,
    check_index as _check_index,
    check_options as _check_options,
    check_stats as _check_stats,
    require_cosine_head as _require_cosine_head,
    require_statistics,
)
from edgeadapt.device.head_trainer import HeadFitSettings, fit_softmax_head
from edgeadapt.device.merging import merge_heads, resolve_all, with_ridge_basis  # noqa: F401 (re-exported)
from edgeadapt.device.ridge_basis import as_basis, current_basis
from edgeadapt.device.ridge_basis_columns import basis_class_column, basis_new_columns
from edgeadapt.device.ridge_model import class_feature_mean, new_class_examples

logger = logging.getLogger(__name__)

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


def _carried_basis(stats: ClassStats, updates: int):
    """The ridge method's stored solver state of ``stats``, having served ``updates`` more updates (or None)."""
    stored = as_basis(stats.ridge_basis)
    return stored.after(updates) if stored is not None else None


def _append_stats(stats: ClassStats | None, arrays: list[np.ndarray]) -> ClassStats | None:
    """``stats`` with one new class per array (None without statistics); the solver state is carried."""
    if stats is None:
        return None
    updated = stats.appended(arrays)
    updated.ridge_basis = _carried_basis(stats, len(arrays))
    return updated


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
    with L2 weight decay ``options.weight_decay * W`` on the trained columns, for
    ``options.training_steps`` steps at ``options.learning_rate``, in float64 (Adam epsilon
    1e-8 on the bias-corrected second moment), without randomness, so that a device update is reproducible.

    It is :func:`edgeadapt.device.head_trainer.fit_softmax_head` with these settings; the
    host's :func:`edgeadapt.training.head_training.train_head` calls the same trainer with
    its own (every column, shuffled mini-batches, float32, early stopping).

    Args:
        features: Already normalised features (N, D).
        labels: Their class indices (N,).
        weights: Starting weights (D, C); not modified.
        bias: Starting bias (C,); not modified.
        columns: Indices of the columns to train; the others come back bit-identical.
        temperature: The logits are divided by it.
        options: ``training_steps``, ``learning_rate`` and ``weight_decay`` are used.

    Returns:
        Float64 copies of the full weights (D, C) and bias (C,).

    Raises:
        InputError: The arrays do not fit together or ``columns`` is empty, repeated or out of range.
    """
    settings = HeadFitSettings(
        epochs=options.training_steps,
        learning_rate=options.learning_rate,
        decay=options.weight_decay,
        temperature=temperature,
        class_balanced=True,
        columns=columns,
        epsilon=1e-8,
        epsilon_corrected=True,
        dtype="float64",
    )
    return fit_softmax_head(features, labels, weights, bias, settings)


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
            calibration = _check_calibration(head, calibration)
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


def _column_from_class_mean(head: Head, updated: ClassStats, index: int, array: np.ndarray, others: np.ndarray,
                            options: AddClassOptions) -> tuple[np.ndarray, float]:
    """Class ``index``'s column and bias from its updated statistics mean (methods imprint, center_l2 and
    imprint_calibrated of :func:`add_examples`); ``others``: the other columns."""
    method = options.method
    model_mean = (updated.sums[index] / max(int(updated.counts[index]), 1))
    if head.feature_mean is not None:
        model_mean = model_mean - head.feature_mean.astype(np.float64)
    direction = _unit(model_mean[:, None])[:, 0]
    if method == "imprint":
        return direction, 0.0
    if method == "imprint_calibrated":
        column = direction * _mean_norm(head.weights[:, others] if others.size else head.weights)
        return column, _own_example_bias(head, column, _features(head, array), others, options.own_example_quantile)
    reference = head.weights[:, others] if others.size else head.weights
    column = direction * _mean_norm(reference)
    return column, float(np.mean(head.bias[others])) if others.size else float(head.bias[index])


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
        updated = stats.strengthened(index, array)
        updated.ridge_basis = _carried_basis(stats, 1)
    others = np.array([column for column in range(head.num_classes) if column != index], dtype=np.int64)

    if method == "claim":
        from edgeadapt.device.fewshot import strengthened_column

        if calibration is not None:
            calibration = _check_calibration(head, calibration)
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
        column, bias_value = _column_from_class_mean(head, updated, index, array, others, options)
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

    The remaining columns keep their values (classes after it move down one index); the
    statistics lose the class's row (see :meth:`ClassStats.removed`).
    """
    _check_stats(head, stats)
    index = _check_index(head, class_index)
    if head.num_classes < 2:
        raise InputError("cannot remove the only class of a head")
    keep = np.array([column for column in range(head.num_classes) if column != index], dtype=np.int64)
    result = head.with_columns(np.ascontiguousarray(head.weights[:, keep]), np.ascontiguousarray(head.bias[keep]))
    if stats is None:
        return result, None
    return result, stats.removed(index)


def old_logits_unchanged(before: Head, after: Head, embeddings: np.ndarray) -> bool:
    """True when ``after`` gives bit-identical logits to ``before`` for ``before``'s classes."""
    if after.num_classes < before.num_classes:
        return False
    return bool(np.array_equal(before.logits(embeddings), after.logits(embeddings)[:, : before.num_classes]))
