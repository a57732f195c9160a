"""The ridge method's whole-head operations: merge a head's classes, re-solve every column (numpy only).

The ``ridge`` method of :mod:`edgeadapt.device.incremental` computes columns from the stored
class statistics alone. Its parts, one concept per module:

* :mod:`edgeadapt.device.ridge_model`: the Gaussian model of the statistics (class means,
  shared within-class covariance) in the head's feature space;
* :mod:`edgeadapt.device.ridge_closed_forms`: the two closed forms (class-balanced least squares
  and the shrinkage discriminant);
* :mod:`edgeadapt.device.ridge_calibration`: their calibration against the head's existing columns;
* :mod:`edgeadapt.device.ridge_basis` and :mod:`edgeadapt.device.ridge_basis_columns`: the cached
  solver state that makes adding a class to a large head cheap, and the columns it gives.

This module puts them together for whole heads, behind :func:`ridge_merge_columns` (merge
method ``ridge``) and :func:`resolve_columns` (``resolve_all``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edgeadapt.device.errors import IncompatibleModelError
from edgeadapt.device.head import ClassStats, Head
from edgeadapt.device.ridge_calibration import class_moments, fit_alignment
from edgeadapt.device.ridge_closed_forms import discriminant_fit, least_squares_fit
from edgeadapt.device.ridge_model import (
    FeatureModel,
    covariance_from_scatter,
    feature_model,
    scatter_with_added,
)

if TYPE_CHECKING:
    from edgeadapt.device.add_options import AddClassOptions


#: ridge: a new class's own covariance is shrunk towards the shared one with weight
#: ``prior / (n + prior)`` (n its example count), so one or two examples borrow the shared shape.
KNOWN_COVARIANCE_PRIOR = 10.0


def _closed_form(
    head: Head,
    model: FeatureModel,
    covariances: list[np.ndarray | None],
    targets: np.ndarray,
    references: np.ndarray,
    options: AddClassOptions,
) -> tuple[np.ndarray, np.ndarray]:
    """The ridge method's columns for classes ``targets`` of ``model``, on the head's logit scale.

    Two closed forms from the same moments, each calibrated against the head's columns
    ``references`` (:func:`fit_alignment`), then blended per class: a class with n examples
    takes ``n / (n + few_shot_examples)`` from the least-squares solution (discriminative,
    best with many examples) and the rest from the shared-covariance discriminant (stable
    with few examples).
    """
    usable = references[model.counts[references] > 0]
    if usable.size == 0:
        raise IncompatibleModelError(
            "the class statistics hold no examples for the existing classes, so new columns cannot be "
            "calibrated against them; recompute the statistics from examples of the old classes"
        )
    every = np.concatenate([usable, targets])
    means = model.means[every]
    usable_means = means[: usable.size]
    target_means = means[usable.size :]
    usable_gram = usable_means.T @ usable_means  # shared by the least squares and the alignment
    fitted = []
    discriminant = discriminant_fit(means, model.counts[every], model.covariance, options)
    least_squares = least_squares_fit(means, [covariances[index] for index in every], model.covariance, options,
                                   mean_gram=usable_gram + target_means.T @ target_means)
    head_weights = head.weights[:, usable].astype(np.float64)
    head_bias = head.bias[usable].astype(np.float64)
    moments = class_moments(model, usable, usable_gram)
    for weights, bias in (least_squares, discriminant):
        scale, offset, offset_bias = fit_alignment(
            head_weights, head_bias, weights[:, : usable.size], bias[: usable.size], model, usable, moments
        )
        fitted.append((scale * weights[:, usable.size :] + offset[:, None], scale * bias[usable.size :] + offset_bias))
    counts = model.counts[targets]
    share = counts / (counts + options.few_shot_examples) if options.few_shot_examples > 0 else np.ones_like(counts)
    weights = share * fitted[0][0] + (1.0 - share) * fitted[1][0]
    bias = share * fitted[0][1] + (1.0 - share) * fitted[1][1]
    return weights, bias


def _ridge_columns(
    head: Head,
    stats: ClassStats,
    targets: np.ndarray,
    references: np.ndarray,
    options: AddClassOptions,
    known_covariance: np.ndarray | None = None,
    target_covariance: np.ndarray | None = None,
    within: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated ridge columns for rows ``targets`` of ``stats`` (which already include them).

    ``known_covariance``: the feature-space covariance to use for the classes without an
    own covariance (default: the shared covariance of ``stats``), e.g. the one of the
    statistics before the new classes were folded in. ``target_covariance``: the same for
    ``targets`` (e.g. the within-class covariance of a merged head's own statistics).
    ``within``: the raw within-class covariance of ``stats`` when already known.
    """
    model = feature_model(head, stats, within)
    covariances: list[np.ndarray | None] = [None] * stats.num_classes
    if known_covariance is not None:
        covariances = [known_covariance] * stats.num_classes
    if target_covariance is not None:
        for index in targets:
            covariances[int(index)] = target_covariance
    return _closed_form(head, model, covariances, targets, references, options)




# ----------------------------------------------------------------------------- whole-head operations
def ridge_merge_columns(a: Head, a_stats: ClassStats, b_stats: ClassStats, merged_stats: ClassStats,
                        options: "AddClassOptions") -> tuple[np.ndarray, np.ndarray]:
    """The columns of head b's classes in head a's space, from the statistics (merge method ``ridge``).

    b's own within-class covariance (when its statistics have a Gram matrix) is shrunk towards
    a's, as for a new class with few examples; the columns are calibrated against a's.

    Args:
        a: The head that receives b's classes.
        a_stats: a's class statistics (with a Gram matrix).
        b_stats: b's class statistics (every class with examples).
        merged_stats: a's rows then b's rows, Gram matrices added (with a Gram matrix).
        options: The solver settings.

    Returns:
        float64 weights (D, b's classes) and bias for the new columns.

    Raises:
        IncompatibleModelError: When the statistics are degenerate.
    """
    if a_stats.gram is None or merged_stats.gram is None:
        raise IncompatibleModelError("method 'ridge' needs the shared Gram matrix in the class statistics")
    new_indices = np.arange(a.num_classes, a.num_classes + b_stats.num_classes)
    scatter, scatter_degrees = a_stats.pooled_scatter()
    known = feature_model(a, a_stats, covariance_from_scatter(scatter, scatter_degrees)).covariance
    scatter, scatter_degrees = scatter_with_added(
        scatter, scatter_degrees, merged_stats.gram - a_stats.gram, b_stats.sums, b_stats.counts
    )
    target = None
    degrees = int(b_stats.counts.sum()) - b_stats.num_classes
    if b_stats.gram is not None and degrees > 0:
        # b's own within-class covariance, shrunk towards a's as for a new class with few examples
        weight = KNOWN_COVARIANCE_PRIOR / (degrees + KNOWN_COVARIANCE_PRIOR)
        target = (1.0 - weight) * feature_model(a, b_stats).covariance + weight * known
    return _ridge_columns(a, merged_stats, new_indices, np.arange(a.num_classes), options,
                          known_covariance=known, target_covariance=target,
                          within=covariance_from_scatter(scatter, scatter_degrees))


def resolve_columns(head: Head, stats: ClassStats, options: "AddClassOptions") -> tuple[np.ndarray, np.ndarray]:
    """Every column re-fitted jointly from the statistics, on the head's logit scale (``resolve_all``).

    The blend of the class-balanced least squares and the shrinkage discriminant (by each
    class's example count), each calibrated against the current columns.

    Args:
        head: The current head (its columns set the logit scale).
        stats: Its class statistics (with a Gram matrix, examples for every class).
        options: The solver settings.

    Returns:
        float64 weights (D, C) and bias (C,).

    Raises:
        IncompatibleModelError: When the result is not finite (degenerate statistics).
    """
    model = feature_model(head, stats)
    every = np.arange(head.num_classes)
    covariances: list[np.ndarray | None] = [None] * head.num_classes
    blended = []
    mean_gram = model.means.T @ model.means  # shared by the least squares and the alignment
    moments = class_moments(model, every, mean_gram)
    head_weights, head_bias = head.weights.astype(np.float64), head.bias.astype(np.float64)
    for weights, bias in (
        least_squares_fit(model.means, covariances, model.covariance, options, mean_gram=mean_gram),
        discriminant_fit(model.means, model.counts, model.covariance, options),
    ):
        scale, offset, offset_bias = fit_alignment(head_weights, head_bias, weights, bias, model, every, moments)
        blended.append((scale * weights + offset[:, None], scale * bias + offset_bias))
    counts = model.counts
    share = counts / (counts + options.few_shot_examples) if options.few_shot_examples > 0 else np.ones_like(counts)
    new_weights = share * blended[0][0] + (1.0 - share) * blended[1][0]
    new_bias = share * blended[0][1] + (1.0 - share) * blended[1][1]
    if not (np.all(np.isfinite(new_weights)) and np.all(np.isfinite(new_bias))):
        raise IncompatibleModelError("the re-solved head came out non-finite; the class statistics are degenerate")
    return new_weights, new_bias


