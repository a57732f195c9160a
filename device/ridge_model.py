"""The ridge method's Gaussian model of stored class statistics (numpy only).

From a head's class statistics (sums, counts, Gram matrix): the pooled within-class scatter
and covariance of the raw embeddings, and the class means and shared covariance in the head's
feature space (centred, and L2-normalised for a cosine head), plus new classes' examples
expressed the same way. The closed forms (:mod:`edgeadapt.device.ridge_closed_forms`) and the
cached solver state (:mod:`edgeadapt.device.ridge_basis`) start from this model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeadapt.device.head import ClassStats, Head


def scatter_with_added(
    scatter: np.ndarray, degrees: float, gram: np.ndarray, sums: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, float]:
    """:meth:`ClassStats.pooled_scatter` after classes with Gram ``gram``, sums ``sums`` (k, D) and counts (k,) are appended."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weighted = sums[present] / np.sqrt(counts[present])[:, None]
    added = gram - weighted.T @ weighted
    return scatter + (added + added.T) / 2.0, degrees + float(counts.sum()) - float(present.sum())


def covariance_from_scatter(scatter: np.ndarray, degrees: float) -> np.ndarray:
    return scatter / max(degrees, 1.0)


@dataclass
class FeatureModel:
    """Class means and shared covariance in the head's feature space (Gaussian model)."""

    means: np.ndarray  # (C, D)
    counts: np.ndarray  # (C,)
    covariance: np.ndarray  # (D, D)


def feature_model(head: Head, stats: ClassStats, within: np.ndarray | None = None) -> FeatureModel:
    """The stored statistics expressed in the head's feature space.

    Centering is linear, so centred statistics are exact. L2 normalisation is not: a class
    mean becomes ``(mu_c - m) / r_c`` with ``r_c^2 = |mu_c - m|^2 + tr(Sw)`` (the class's
    mean squared radius under the shared covariance) and the covariance ``Sw / r^2`` with
    ``r^2`` the mean squared radius of all examples (exact from the Gram matrix).
    ``within``: the raw within-class covariance of ``stats`` when already known.
    """
    covariance = stats.within_covariance() if within is None else within
    counts = stats.counts.astype(np.float64)
    means = stats.sums / np.maximum(counts, 1.0)[:, None]
    center = np.zeros(stats.embedding_size) if head.feature_mean is None else head.feature_mean.astype(np.float64)
    means = means - center
    if head.l2_normalize:
        total = max(float(counts.sum()), 1.0)
        overall = stats.sums.sum(axis=0) / total
        mean_square = float(np.trace(stats.gram)) / total - 2.0 * float(center @ overall) + float(center @ center)
        spread = float(np.trace(covariance))
        radii = np.sqrt(np.maximum(np.einsum("ij,ij->i", means, means) + spread, 1e-24))
        means = means / radii[:, None]
        covariance = covariance / max(mean_square, 1e-24)
    return FeatureModel(means=means, counts=counts, covariance=covariance)


def new_class_examples(head: Head, arrays: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Feature-space means (k, D) of new classes and their examples minus the mean, from raw examples.

    Computed the way :func:`feature_model` models the stored classes (for an L2 head:
    centred values divided by the class's root-mean-square radius).
    """
    center = np.zeros(head.embedding_size) if head.feature_mean is None else head.feature_mean.astype(np.float64)
    means, deviations = [], []
    for array in arrays:
        centred = np.asarray(array, dtype=np.float64) - center
        if head.l2_normalize:
            radius = np.sqrt(max(float(np.mean(np.einsum("ij,ij->i", centred, centred))), 1e-24))
            centred = centred / radius
        mean = centred.mean(axis=0)
        means.append(mean)
        deviations.append(centred - mean)
    return np.stack(means), deviations


def class_feature_mean(head: Head, stats: ClassStats, index: int) -> np.ndarray:
    """Class ``index``'s mean in the head's feature space, as :func:`feature_model` gives it, in O(D C)."""
    count = max(float(stats.counts[index]), 1.0)
    mean = stats.sums[index] / count
    if head.feature_mean is not None:
        mean = mean - head.feature_mean.astype(np.float64)
    if head.l2_normalize:
        counts = stats.counts.astype(np.float64)
        present = counts > 0
        class_means = stats.sums[present] / counts[present][:, None]
        scatter_trace = float(np.trace(stats.gram)) - float(np.sum(counts[present] * np.einsum("ij,ij->i", class_means, class_means)))
        spread = scatter_trace / max(float(counts.sum()) - float(present.sum()), 1.0)
        mean = mean / np.sqrt(max(float(mean @ mean) + spread, 1e-24))
    return mean
