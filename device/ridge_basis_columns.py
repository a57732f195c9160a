"""Ridge columns from the cached solver state (:class:`~edgeadapt.device.ridge_basis.RidgeBasis`), numpy only.

A new class's discriminant column is ``S^-1 m``; its second moment enters the least-squares
matrix by the Woodbury identity, which also moves the basis classes' least-squares columns, so
the logit scale is refitted on them exactly as a from-scratch solve would (in O(D U r), without
forming them). Both are mapped onto the head's logit scale and blended by example count.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from edgeadapt.device.head import Head
from edgeadapt.device.ridge_basis import RidgeBasis
from edgeadapt.device.ridge_calibration import Moments, blend_by_count, centred_columns, check_scale, fit_alignment

if TYPE_CHECKING:
    from edgeadapt.device.add_options import AddClassOptions


def _low_rank_alignment(
    basis: RidgeBasis, weights: np.ndarray, moved: np.ndarray, change: np.ndarray,
) -> tuple[float, np.ndarray, float]:
    """:func:`fit_alignment` of the head's columns against the basis classes' least-squares columns after
    they moved by ``-P change`` (P = ``moved``'s source, see below), without forming them.

    ``moved``: (P_w, S P_w) with P = A^-1 V ((D+1) x r) split into its weight rows P_w and bias row,
    S the second moment; ``change`` (r x U). ``weights``: the head's basis columns (D x U).
    """
    projection_rows, bias_row, second_projection = moved
    reference_bias0, first_reference0, first_centred, centred_bias = basis.alignment_classes
    reference_mean0, weights_mean = basis.alignment_features
    reference_projection0, centred_projection0, reference_bias_mean0, bias_mean = basis.alignment_scalars
    change_mean = change.mean(axis=1)
    centred_change = change - change_mean[:, None]
    # the r x U products: each reads one stored D x U array once
    rows_projection = (projection_rows.T.astype(np.float32) @ basis.old_projection).astype(np.float64)
    second_weights = (second_projection.T.astype(np.float32) @ weights).astype(np.float64)
    second_weights -= (second_projection.T @ weights_mean)[:, None]  # (S P_w)^T times the centred head columns
    reference_mean = reference_mean0 - projection_rows @ change_mean
    reference_bias = reference_bias0 - bias_row @ centred_change
    first_reference = first_reference0 - (basis.first_moment @ projection_rows) @ centred_change
    cross = projection_rows.T @ second_projection  # P_w^T S P_w (r x r)
    reference_projection = (reference_projection0 - 2.0 * float(np.sum(centred_change * rows_projection))
                            + float(np.sum(centred_change * (cross @ centred_change))))
    centred_projection = centred_projection0 - float(np.sum(centred_change * second_weights))
    denominator = reference_projection + 2.0 * float(first_reference @ reference_bias) + float(reference_bias @ reference_bias)
    numerator = (centred_projection + float(first_centred @ reference_bias) + float(first_reference @ centred_bias)
                 + float(centred_bias @ reference_bias))
    scale = numerator / denominator if denominator > 0 else 0.0
    check_scale(scale)
    reference_bias_mean = reference_bias_mean0 - float(bias_row @ change_mean)
    return scale, weights_mean - scale * reference_mean, bias_mean - scale * reference_bias_mean


def _mapped(basis: RidgeBasis, row: int, weights: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale, offset_bias, offset = basis.calibration[row, 0], basis.calibration[row, 1], basis.calibration[row, 2:]
    return scale * weights + offset[:, None], scale * bias + offset_bias


def _discriminant_columns(basis: RidgeBasis, means: np.ndarray, counts: np.ndarray,
                          options: "AddClassOptions") -> tuple[np.ndarray, np.ndarray]:
    weights = (basis.discriminant_inverse @ means.T.astype(np.float32)).astype(np.float64)
    quadratic = np.einsum("dk,kd->k", weights, means)
    bias = -0.5 * (quadratic - options.small_sample_correction * basis.effective / np.maximum(counts, 1.0))
    return weights, bias


def refitted_least_squares(
    basis: RidgeBasis, head: Head, means: np.ndarray, factors: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated least-squares columns of new classes whose second moments are folded into ``A``.

    The old classes' columns move with ``A``; the logit scale is refitted on them as a
    from-scratch solve would, in O(D^2 r + D U r) (Woodbury for small r).

    Args:
        basis: The cached ridge solver state of the head.
        head: The head the basis was built for.
        means: The new classes' feature means (k, D).
        factors: Rows (r, D+1) whose outer products add up to the new classes' second moments
            of ``[features, 1]``.

    Returns:
        The new classes' weights (D, k) and biases (k,), float64, on the head's logit scale.
    """
    size = means.shape[1]
    augmented = np.concatenate([means, np.ones((means.shape[0], 1))], axis=1).T  # (D+1, k)
    inverse = basis.least_squares_inverse
    right = (inverse @ augmented.astype(np.float32)).astype(np.float64)  # A^-1 b
    factors32 = np.ascontiguousarray(factors.T, dtype=np.float32)  # V (D+1, r)
    projected = (inverse @ factors32).astype(np.float64)  # P = A^-1 V
    second = basis.second_moment
    if factors.shape[0] <= (size + 1) // 3:  # Woodbury: (A + V V^T)^-1 = A^-1 - P (I + V^T P)^-1 P^T
        inner = np.eye(factors.shape[0]) + factors @ projected
        # with x0 = A^-1 b: (A + V V^T)^-1 b = x0 - P (I + V^T P)^-1 V^T x0, for the new and the old columns
        # (x0 of the old columns: the stored A^-1 [m_c; 1])
        old_products = (factors32.T @ basis.old_solution).astype(np.float64)
        both = np.linalg.solve(inner, np.concatenate([factors @ right, old_products], axis=1))
        right = right - projected @ both[:, : augmented.shape[1]]
        change = both[:, augmented.shape[1]:]  # old columns move by -P change
        usable = basis.classes_used
        if usable.size >= 2:
            moved = (second @ projected[:size].astype(np.float32)).astype(np.float64)  # S P_w
            weights = head.weights[:, : usable.size] if usable[-1] == usable.size - 1 else head.weights[:, usable]
            scale, offset, offset_bias = _low_rank_alignment(
                basis, weights, (projected[:size], projected[size], moved), change)
            return scale * right[:size] + offset[:, None], scale * right[size] + offset_bias
        old = basis.old_solution.astype(np.float64) - projected @ change
        projection = second.astype(np.float64) @ centred_columns(old[:size])
    else:  # many examples: (A + V V^T)^-1 b = (I + P V^T)^-1 A^-1 b, and a direct projection
        system = np.eye(size + 1) + projected @ factors
        solved = np.linalg.solve(system, np.concatenate([right, basis.old_solution.astype(np.float64)], axis=1))
        right, old = solved[:, : augmented.shape[1]], solved[:, augmented.shape[1]:]
        projection = second.astype(np.float64) @ centred_columns(old[:size])
    usable = basis.classes_used
    moments = Moments(first=basis.first_moment, second=np.empty((0, 0)))  # second enters through ``projection``
    scale, offset, offset_bias = fit_alignment(
        head.weights[:, usable].astype(np.float64), head.bias[usable].astype(np.float64), old[:size], old[size],
        None, usable, moments, projected=projection,
    )
    return scale * right[:size] + offset[:, None], scale * right[size] + offset_bias


def basis_new_columns(
    basis: RidgeBasis, head: Head, means: np.ndarray, deviations: list[np.ndarray], options: "AddClassOptions",
) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated ridge columns (D, k) and biases (k,) of new classes, from their feature-space examples.

    ``means`` (k, D): each new class's mean feature; ``deviations``: each class's examples
    minus its mean (n_i, D). A class's second moment ``m m^T + dev^T dev / n`` enters the
    least-squares moment matrix (class-balanced, like every basis class).
    """
    counts = np.array([array.shape[0] for array in deviations], dtype=np.float64)
    rows = []
    for mean, deviation, count in zip(means, deviations, counts):
        rows.append(np.append(mean, 1.0)[None, :])
        if deviation.shape[0] > 1:
            scaled = deviation / math.sqrt(count)
            rows.append(np.concatenate([scaled, np.zeros((scaled.shape[0], 1))], axis=1))
    least_squares = refitted_least_squares(basis, head, means, np.concatenate(rows))
    discriminant = _mapped(basis, 1, *_discriminant_columns(basis, means, counts, options))
    return blend_by_count([least_squares, discriminant], counts, options)


def basis_class_column(
    basis: RidgeBasis, head: Head, mean: np.ndarray, count: int, in_basis: bool, options: "AddClassOptions",
) -> tuple[np.ndarray, float]:
    """The calibrated ridge column and bias of one existing class with feature mean ``mean``.

    ``in_basis``: the class is one of the basis classes (its second moment is already in
    the least-squares matrix, and the basis calibration applies); otherwise its mean's
    moment is folded in like a new class's.
    """
    means = np.asarray(mean, dtype=np.float64)[None, :]
    counts = np.array([float(count)])
    if in_basis:
        right = (basis.least_squares_inverse @ np.append(means[0], 1.0).astype(np.float32)).astype(np.float64)
        least_squares = _mapped(basis, 0, right[:-1, None], right[-1:])
    else:
        least_squares = refitted_least_squares(basis, head, means, np.append(means[0], 1.0)[None, :])
    discriminant = _mapped(basis, 1, *_discriminant_columns(basis, means, counts, options))
    weights, bias = blend_by_count([least_squares, discriminant], counts, options)
    return weights[:, 0], float(bias[0])
