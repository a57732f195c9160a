"""The ridge method's two closed forms from class moments (numpy only).

The class-balanced least squares (ridge regression of one-hot targets on ``[features, 1]``
from each class's second moment) and the shrinkage linear discriminant (shared covariance
shrunk towards its mean diagonal), with the symmetric positive definite inverse they share.
Their columns are on their own scale: :mod:`edgeadapt.device.ridge_calibration` maps them
onto a head's logit scale.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edgeadapt.device.errors import IncompatibleModelError

if TYPE_CHECKING:
    from edgeadapt.device.add_options import AddClassOptions


def shrunk_covariance(covariance: np.ndarray, shrinkage: float) -> np.ndarray:
    size = covariance.shape[0]
    scale = float(np.trace(covariance)) / size
    if not scale > 0:
        scale = 1.0
    shrunk = (1.0 - shrinkage) * covariance
    shrunk[np.diag_indices(size)] += shrinkage * scale + 1e-6 * scale
    return shrunk


def _lower_inverse(lower: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular matrix by blocks (numpy has no triangular solve), in matrix products."""
    size = lower.shape[0]
    if size <= 128:
        return np.tril(np.linalg.inv(lower))
    half = size // 2
    top = _lower_inverse(lower[:half, :half])
    bottom = _lower_inverse(lower[half:, half:])
    inverse = np.zeros_like(lower)
    inverse[:half, :half] = top
    inverse[half:, half:] = bottom
    inverse[half:, :half] = -(bottom @ (lower[half:, :half] @ top))
    return inverse


def spd_inverse(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive definite matrix from one Cholesky factorisation (exactly symmetric).

    Raises ``np.linalg.LinAlgError`` when ``matrix`` is not positive definite.
    """
    factor_inverse = _lower_inverse(np.linalg.cholesky(matrix))
    return factor_inverse.T @ factor_inverse


def discriminant_fit(
    means: np.ndarray, counts: np.ndarray, covariance: np.ndarray, options: AddClassOptions
) -> tuple[np.ndarray, np.ndarray]:
    """Shrinkage linear discriminant columns (D, k) and biases (k,) for class ``means`` (k, D)."""
    shrunk = shrunk_covariance(covariance, options.shrinkage)
    try:
        # one Cholesky factorisation; tr(S^-1 Sw) then needs no D right-hand sides
        inverse = spd_inverse(shrunk)
        weights = inverse @ means.T
        effective = float(np.sum(inverse * covariance.T))
    except np.linalg.LinAlgError:
        try:  # not positive definite (degenerate statistics): the general solver decides
            solved = np.linalg.solve(shrunk, np.concatenate([means.T, covariance], axis=1))
        except np.linalg.LinAlgError as error:
            raise IncompatibleModelError(f"the shared covariance of the class statistics is singular ({error})") from error
        weights = solved[:, : means.shape[0]]
        effective = float(np.trace(solved[:, means.shape[0] :]))
    quadratic = np.einsum("dk,kd->k", weights, means)
    correction = options.small_sample_correction * effective / np.maximum(counts, 1.0)
    bias = -0.5 * (quadratic - correction)
    return weights, bias


def moment_matrix(means: np.ndarray, mean_gram: np.ndarray, covariance_sum: np.ndarray,
                   options: AddClassOptions) -> np.ndarray:
    """``sum_c E_c[[x; 1][x; 1]^T] + l I`` ((D+1) x (D+1)) of classes with ``means`` (k, D), given
    ``means^T means`` and the sum of their covariances; the ridge ``l`` is relative to the mean diagonal."""
    size = means.shape[1]
    moment = np.empty((size + 1, size + 1))
    moment[:size, :size] = mean_gram + covariance_sum
    column = means.sum(axis=0)
    moment[:size, size] = column
    moment[size, :size] = column
    moment[size, size] = float(means.shape[0])
    scale = float(np.trace(moment[:size, :size])) / size
    moment[np.arange(size), np.arange(size)] += options.regularization * (scale if scale > 0 else 1.0)
    return moment


def least_squares_fit(
    means: np.ndarray, covariances: list[np.ndarray | None], shared: np.ndarray, options: AddClassOptions,
    mean_gram: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced ridge regression of one-hot targets on [features, 1], from class moments.

    Each class enters with weight 1 through its second moment ``m m^T + cov`` (its own
    covariance when known, else the shared one), so the normal equations need no examples:
    ``W = (sum_c E_c[x x^T] + l I)^-1 [m_c; 1]_c``. Returns columns (D, k) and biases (k,).
    ``mean_gram``: ``means^T means`` when already known.
    """
    size = means.shape[1]
    augmented = np.concatenate([means, np.ones((means.shape[0], 1))], axis=1)
    # sum of the per-class covariances: each distinct matrix once, times how many classes use it
    distinct: dict[int, list] = {}
    for covariance in covariances:
        matrix = shared if covariance is None else covariance
        entry = distinct.setdefault(id(matrix), [matrix, 0])
        entry[1] += 1
    covariance_sum = np.zeros((size, size))
    for matrix, repeats in distinct.values():
        covariance_sum += matrix if repeats == 1 else repeats * matrix
    moment = moment_matrix(means, means.T @ means if mean_gram is None else mean_gram, covariance_sum, options)
    try:
        solution = np.linalg.solve(moment, augmented.T)
    except np.linalg.LinAlgError as error:
        raise IncompatibleModelError(f"the class moments are singular ({error}); the statistics are degenerate") from error
    return solution[:size], solution[size]
