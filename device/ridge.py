"""Closed-form ridge / linear-discriminant head math from class statistics (numpy only).

The ``ridge`` method of :mod:`edgeadapt.device.incremental` lives wholly here, behind the public
functions :func:`ridge_merge_columns`, :func:`resolve_columns` and :func:`within_covariance`: the Gaussian model of
the stored class statistics (class means, shared within-class covariance), the two closed
forms (class-balanced least squares and the shrinkage discriminant), their calibration
against the head's existing columns, and :class:`RidgeBasis`, the cached solver state that
makes adding a class to a large head cheap (see its docstring).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeadapt.device.errors import BundleError, IncompatibleModelError
from edgeadapt.device.head import ClassStats, Head
from edgeadapt.device.stats_extras import EXTRA_KEY, StoredExtra, register_statistics_extra

if TYPE_CHECKING:
    from edgeadapt.device.add_options import AddClassOptions

logger = logging.getLogger(__name__)

#: ridge: a new class's own covariance is shrunk towards the shared one with weight
#: ``prior / (n + prior)`` (n its example count), so one or two examples borrow the shared shape.
KNOWN_COVARIANCE_PRIOR = 10.0


def _scatter(stats: ClassStats) -> tuple[np.ndarray, float]:
    """Pooled within-class scatter (symmetrised) of the raw embeddings and its degrees of freedom.

    From the Gram matrix and the sums: ``G - sum_c n_c mu_c mu_c^T`` over the classes with
    examples (one symmetric rank-k product), and ``N - (number of classes with examples)``.
    """
    counts = stats.counts.astype(np.float64)
    present = counts > 0
    weighted = stats.sums[present] / np.sqrt(counts[present])[:, None]  # sqrt(n_c) mu_c
    scatter = stats.gram - weighted.T @ weighted
    return (scatter + scatter.T) / 2.0, float(counts.sum()) - float(present.sum())


def _scatter_added(
    scatter: np.ndarray, degrees: float, gram: np.ndarray, sums: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, float]:
    """:func:`_scatter` after classes with Gram ``gram``, sums ``sums`` (k, D) and counts (k,) are appended."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weighted = sums[present] / np.sqrt(counts[present])[:, None]
    added = gram - weighted.T @ weighted
    return scatter + (added + added.T) / 2.0, degrees + float(counts.sum()) - float(present.sum())


def _covariance_from_scatter(scatter: np.ndarray, degrees: float) -> np.ndarray:
    return scatter / max(degrees, 1.0)


def within_covariance(stats: ClassStats) -> np.ndarray:
    """Pooled within-class covariance of the raw embeddings, from the Gram matrix and the sums."""
    return _covariance_from_scatter(*_scatter(stats))


@dataclass
class _FeatureModel:
    """Class means and shared covariance in the head's feature space (Gaussian model)."""

    means: np.ndarray  # (C, D)
    counts: np.ndarray  # (C,)
    covariance: np.ndarray  # (D, D)


def _feature_model(head: Head, stats: ClassStats, within: np.ndarray | None = None) -> _FeatureModel:
    """The stored statistics expressed in the head's feature space.

    Centering is linear, so centred statistics are exact. L2 normalisation is not: a class
    mean becomes ``(mu_c - m) / r_c`` with ``r_c^2 = |mu_c - m|^2 + tr(Sw)`` (the class's
    mean squared radius under the shared covariance) and the covariance ``Sw / r^2`` with
    ``r^2`` the mean squared radius of all examples (exact from the Gram matrix).
    ``within``: the raw within-class covariance of ``stats`` when already known.
    """
    covariance = within_covariance(stats) if within is None else within
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
    return _FeatureModel(means=means, counts=counts, covariance=covariance)


def new_class_examples(head: Head, arrays: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Feature-space means (k, D) of new classes and their examples minus the mean, from raw examples.

    Computed the way :func:`_feature_model` models the stored classes (for an L2 head:
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
    """Class ``index``'s mean in the head's feature space, as :func:`_feature_model` gives it, in O(D C)."""
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


def _shrunk(covariance: np.ndarray, shrinkage: float) -> np.ndarray:
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


def _spd_inverse(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive definite matrix from one Cholesky factorisation (exactly symmetric).

    Raises ``np.linalg.LinAlgError`` when ``matrix`` is not positive definite.
    """
    factor_inverse = _lower_inverse(np.linalg.cholesky(matrix))
    return factor_inverse.T @ factor_inverse


def _discriminant(
    means: np.ndarray, counts: np.ndarray, covariance: np.ndarray, options: AddClassOptions
) -> tuple[np.ndarray, np.ndarray]:
    """Shrinkage linear discriminant columns (D, k) and biases (k,) for class ``means`` (k, D)."""
    shrunk = _shrunk(covariance, options.shrinkage)
    try:
        # one Cholesky factorisation; tr(S^-1 Sw) then needs no D right-hand sides
        inverse = _spd_inverse(shrunk)
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


@dataclass
class _Moments:
    """First and second moment of the Gaussian model of some classes (for :func:`_alignment`)."""

    first: np.ndarray  # (D,) mean of the class means
    second: np.ndarray  # (D, D) shared covariance + mean of m m^T


def _class_moments(model: _FeatureModel, classes: np.ndarray, mean_gram: np.ndarray | None = None) -> _Moments:
    """The model's moments over ``classes`` (``mean_gram``: ``M^T M`` of their means when already known)."""
    means = model.means[classes]
    if mean_gram is None:
        mean_gram = means.T @ means
    return _Moments(first=means.mean(axis=0), second=model.covariance + mean_gram / len(classes))


def _check_scale(scale: float) -> None:
    if not np.isfinite(scale) or scale <= 0:
        raise IncompatibleModelError(
            "the head's columns do not agree with its class statistics (the fitted logit scale is "
            f"{scale:.3g}); the statistics probably belong to another head or backbone. Recompute the statistics "
            "from examples of the old classes, or re-solve the head (resolve_all) before adding classes"
        )


def _alignment(
    weights: np.ndarray, bias: np.ndarray, reference_weights: np.ndarray, reference_bias: np.ndarray,
    model: _FeatureModel | None, classes: np.ndarray, moments: _Moments | None = None,
    projected: np.ndarray | None = None,
) -> tuple[float, np.ndarray, float]:
    """Fit ``weights ~ s * reference + v 1^T``, ``bias ~ s * reference_bias + beta``.

    ``s`` is the class-balanced least-squares match of the column-centred logits of the two
    heads over the Gaussian model of ``classes`` (``v`` and ``beta`` are the per-input and
    global offsets that softmax leaves free). Returns (s, v, beta). ``moments``: the
    model's moments over ``classes`` (:func:`_class_moments`) when already computed;
    ``projected``: ``moments.second`` times the column-centred ``reference_weights`` when
    already known (the cached solver state updates it cheaply).
    """
    count = weights.shape[1]
    mean_weights, mean_reference = weights.mean(axis=1), reference_weights.mean(axis=1)
    if count >= 2:
        if moments is None:
            assert model is not None
            moments = _class_moments(model, classes)
        first = moments.first
        centred = weights - mean_weights[:, None]
        centred_bias = bias - bias.mean()
        reference = reference_weights - mean_reference[:, None]
        reference_centred_bias = reference_bias - reference_bias.mean()
        if projected is None:  # once: both inner products below take the reference on the right
            projected = moments.second @ reference
        first_reference = first @ reference

        denominator = float(
            np.sum(reference * projected)
            + first_reference @ reference_centred_bias
            + first_reference @ reference_centred_bias
            + reference_centred_bias @ reference_centred_bias
        )
        numerator = float(
            np.sum(centred * projected)
            + first @ centred @ reference_centred_bias
            + first_reference @ centred_bias
            + centred_bias @ reference_centred_bias
        )
        scale = numerator / denominator if denominator > 0 else 0.0
    else:
        norm = float(np.linalg.norm(reference_weights))
        scale = float(np.linalg.norm(weights)) / norm if norm > 0 else 0.0
        mean_weights = np.zeros_like(mean_weights)
        mean_reference = np.zeros_like(mean_reference)
    _check_scale(scale)
    offset = mean_weights - scale * mean_reference
    offset_bias = float(bias.mean() - scale * reference_bias.mean()) if count >= 2 else float(bias[0] - scale * reference_bias[0])
    return scale, offset, offset_bias


def _moment_matrix(means: np.ndarray, mean_gram: np.ndarray, covariance_sum: np.ndarray,
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


def _least_squares(
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
    moment = _moment_matrix(means, means.T @ means if mean_gram is None else mean_gram, covariance_sum, options)
    try:
        solution = np.linalg.solve(moment, augmented.T)
    except np.linalg.LinAlgError as error:
        raise IncompatibleModelError(f"the class moments are singular ({error}); the statistics are degenerate") from error
    return solution[:size], solution[size]


def _closed_form(
    head: Head,
    model: _FeatureModel,
    covariances: list[np.ndarray | None],
    targets: np.ndarray,
    references: np.ndarray,
    options: AddClassOptions,
) -> tuple[np.ndarray, np.ndarray]:
    """The ridge method's columns for classes ``targets`` of ``model``, on the head's logit scale.

    Two closed forms from the same moments, each calibrated against the head's columns
    ``references`` (:func:`_alignment`), then blended per class: a class with n examples
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
    discriminant = _discriminant(means, model.counts[every], model.covariance, options)
    least_squares = _least_squares(means, [covariances[index] for index in every], model.covariance, options,
                                   mean_gram=usable_gram + target_means.T @ target_means)
    head_weights = head.weights[:, usable].astype(np.float64)
    head_bias = head.bias[usable].astype(np.float64)
    moments = _class_moments(model, usable, usable_gram)
    for weights, bias in (least_squares, discriminant):
        scale, offset, offset_bias = _alignment(
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
    model = _feature_model(head, stats, within)
    covariances: list[np.ndarray | None] = [None] * stats.num_classes
    if known_covariance is not None:
        covariances = [known_covariance] * stats.num_classes
    if target_covariance is not None:
        for index in targets:
            covariances[int(index)] = target_covariance
    return _closed_form(head, model, covariances, targets, references, options)


# ============================================================================= cached solver state
#: Manifest names of the basis arrays (files ``heads/vN/<name>.npy``).
BASIS_ARRAYS = (
    "ridge_discriminant_inverse", "ridge_least_squares_inverse", "ridge_calibration", "ridge_second_moment",
    "ridge_old_solution", "ridge_old_projection", "ridge_classes", "ridge_alignment_classes",
    "ridge_alignment_features",
)


def head_signature(head: Head, classes: int) -> tuple[float, float, float]:
    """A cheap fingerprint of the first ``classes`` columns and the normalisation of ``head``.

    Sums in float64; a head that was re-solved or retrained gives a different signature
    (compared with a relative tolerance, so summation order across machines does not matter).
    """
    center = 0.0 if head.feature_mean is None else float(np.sum(head.feature_mean, dtype=np.float64))
    return (
        float(np.sum(head.weights[:, :classes], dtype=np.float64)),
        float(np.sum(head.bias[:classes], dtype=np.float64)),
        center + float(head.l2_normalize) * 1e3 + float(head.temperature),
    )


def _stored(matrix: np.ndarray, symmetric: bool = False) -> np.ndarray:
    """``matrix`` rounded to float32, how the basis is stored (and used, so a loaded basis is the built one)."""
    rounded = np.asarray(matrix, dtype=np.float32)
    if symmetric:
        rounded = (rounded + rounded.T) * np.float32(0.5)
    return np.ascontiguousarray(rounded)


def _settings(options: "AddClassOptions") -> tuple[float, float, float]:
    return (float(options.shrinkage), float(options.small_sample_correction), float(options.regularization))


def _inverse(matrix: np.ndarray, what: str) -> np.ndarray:
    try:
        return _spd_inverse(matrix)
    except np.linalg.LinAlgError:
        try:  # not positive definite (degenerate statistics): the general inverse decides
            return np.linalg.inv(matrix)
        except np.linalg.LinAlgError as error:
            raise IncompatibleModelError(f"the {what} of the class statistics is singular ({error})") from error


@dataclass(frozen=True)
class RidgeBasis:
    """The ridge method's solver state for one head and its class statistics.

    Adding a class to a head of C classes with D-d embeddings costs O(D^3 + D^2 C) when the
    closed forms are solved from scratch (0.7 s at 1000 x 1280). Almost all of that work
    depends only on the classes already in the head, so it is done once and kept (U: the
    head's classes with examples, ``classes_used``):

    * ``discriminant_inverse``: ``S^-1``, the inverse of the shrunk shared within-class
      covariance (D x D), and ``effective = tr(S^-1 Sw)`` for the small-sample correction;
    * ``least_squares_inverse``: ``A^-1``, the inverse of the class-balanced second-moment
      matrix of ``[features, 1]`` over the U classes plus the ridge ((D+1) x (D+1));
    * ``old_solution``: the least-squares columns of the U classes, ``A^-1 [m_c; 1]``
      ((D+1) x U), ``old_projection``: ``second_moment`` times them, column-centred (D x U),
      and ``second_moment``/``first_moment``: the moments of the U classes' Gaussian model,
      which fit the logit scale of the least-squares columns to the head's columns;
    * ``calibration``: for each closed form (row 0 least squares, row 1 discriminant) the
      logit scale ``s``, bias offset ``beta`` and column offset ``v`` that map it onto the
      head's columns (``[s, beta, v...]``), fitted over the U columns.

    A new class with n examples then costs O(D^2 (n + 1) + D U (n + 1)): its discriminant
    column is ``S^-1 m``; its second moment enters ``A`` by the Woodbury identity (rank
    n + 1), which gives its least-squares column AND the old classes' updated columns, so
    the least-squares calibration is refitted exactly as a from-scratch solve would; both
    are mapped onto the head's logit scale and blended. The shared covariance stays that of
    the basis classes (later classes have few examples and do not change it) until the basis
    is rebuilt from the current statistics: when ``updates`` reaches its
    :meth:`refresh_limit`, when the head's basis columns changed (``signature``) or when
    the ridge settings differ. The result is a deterministic function of the head, the
    statistics and this state, on the host and on the device alike.

    Stored as float32: about ``12 D^2 + 8 D U`` bytes (30 MB at 1000 x 1280, 0.8 MB at 4 x 256),
    shared by the bundle versions that did not rebuild it.
    """

    classes: int
    updates: int
    signature: tuple[float, float, float]
    settings: tuple[float, float, float]
    effective: float
    discriminant_inverse: np.ndarray  # (D, D) float32
    least_squares_inverse: np.ndarray  # (D + 1, D + 1) float32
    calibration: np.ndarray  # (3, D + 2) float64: the two fits, then [0, 0, first moment]
    second_moment: np.ndarray  # (D, D) float32
    old_solution: np.ndarray  # (D + 1, U) float32
    old_projection: np.ndarray  # (D, U) float32
    classes_used: np.ndarray  # (U,) int64
    alignment_classes: np.ndarray  # (4, U) float64: see _alignment_terms
    alignment_features: np.ndarray  # (2, D) float64
    alignment_scalars: tuple[float, float, float, float]

    @property
    def first_moment(self) -> np.ndarray:
        """Mean of the basis classes' feature means (D,)."""
        return self.calibration[2, 2:]

    @property
    def embedding_size(self) -> int:
        return int(self.discriminant_inverse.shape[0])

    def refresh_limit(self, refresh_fraction: float, minimum: int = 1) -> int:
        """How many updates this basis serves before it is rebuilt (0 when the fraction is 0)."""
        if refresh_fraction <= 0:
            return 0
        return max(int(minimum), int(math.ceil(refresh_fraction * self.classes)))

    def is_fresh_for(self, head: Head, options: "AddClassOptions") -> bool:
        """Whether this basis may serve the next update of ``head`` with ``options``."""
        if self.updates >= self.refresh_limit(options.basis_refresh_fraction, options.basis_refresh_minimum):
            return False
        if self.embedding_size != head.embedding_size or self.classes > head.num_classes:
            return False
        if self.settings != _settings(options):
            return False
        signature = head_signature(head, self.classes)
        return bool(np.allclose(signature, self.signature, rtol=1e-9, atol=1e-9))

    def after(self, updates: int) -> "RidgeBasis":
        """The same basis, having served ``updates`` more updates (its arrays are shared)."""
        return replace(self, updates=self.updates + int(updates))

    @property
    def nbytes(self) -> int:
        return sum(int(array.nbytes) for array in self.arrays().values())

    # ------------------------------------------------------------------ bundle round trip
    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays as stored in a bundle (the very objects: unchanged ones are shared between versions)."""
        return {
            "ridge_discriminant_inverse": self.discriminant_inverse,
            "ridge_least_squares_inverse": self.least_squares_inverse,
            "ridge_calibration": self.calibration,
            "ridge_second_moment": self.second_moment,
            "ridge_old_solution": self.old_solution,
            "ridge_old_projection": self.old_projection,
            "ridge_classes": self.classes_used,
            "ridge_alignment_classes": self.alignment_classes,
            "ridge_alignment_features": self.alignment_features,
        }

    def metadata(self) -> dict[str, Any]:
        return {
            "classes": self.classes,
            "updates": self.updates,
            "signature": list(self.signature),
            "shrinkage": self.settings[0],
            "small_sample_correction": self.settings[1],
            "regularization": self.settings[2],
            "effective": self.effective,
            "alignment": list(self.alignment_scalars),
        }

    @classmethod
    def from_parts(cls, metadata: dict[str, Any], arrays: dict[str, np.ndarray]) -> "RidgeBasis":
        """Rebuild from :meth:`metadata` and :meth:`arrays` as stored in a bundle."""
        try:
            discriminant = np.asarray(arrays["ridge_discriminant_inverse"])
            least_squares = np.asarray(arrays["ridge_least_squares_inverse"])
            stored_calibration = np.asarray(arrays["ridge_calibration"])
            second = np.asarray(arrays["ridge_second_moment"])
            solution = np.asarray(arrays["ridge_old_solution"])
            projection = np.asarray(arrays["ridge_old_projection"])
            used = np.asarray(arrays["ridge_classes"], dtype=np.int64)
            size, count = discriminant.shape[0], used.shape[0]
            expected = {
                "ridge_discriminant_inverse": (discriminant, (size, size)),
                "ridge_least_squares_inverse": (least_squares, (size + 1, size + 1)),
                "ridge_second_moment": (second, (size, size)),
                "ridge_old_solution": (solution, (size + 1, count)),
                "ridge_old_projection": (projection, (size, count)),
            }
            for name, (array, shape) in expected.items():
                if array.shape != shape or array.dtype != np.float32:
                    raise ValueError(f"{name} is {array.dtype} {array.shape}, expected float32 {shape}")
            if stored_calibration.shape != (3, size + 2) or stored_calibration.dtype != np.float64 or used.ndim != 1:
                raise ValueError(f"calibration {stored_calibration.shape}, classes {used.shape}")
            alignment_classes = np.asarray(arrays["ridge_alignment_classes"])
            alignment_features = np.asarray(arrays["ridge_alignment_features"])
            if alignment_classes.shape != (4, count) or alignment_features.shape != (2, size):
                raise ValueError(f"alignment terms {alignment_classes.shape}, {alignment_features.shape}")
            scalars = tuple(float(value) for value in metadata["alignment"])
            if len(scalars) != 4:
                raise ValueError(f"{len(scalars)} alignment scalars, expected 4")
            return cls(
                classes=int(metadata["classes"]),
                updates=int(metadata["updates"]),
                signature=tuple(float(value) for value in metadata["signature"]),  # type: ignore[arg-type]
                settings=(float(metadata["shrinkage"]), float(metadata["small_sample_correction"]),
                          float(metadata["regularization"])),
                effective=float(metadata["effective"]),
                discriminant_inverse=discriminant,
                least_squares_inverse=least_squares,
                calibration=stored_calibration,
                second_moment=second,
                old_solution=solution,
                old_projection=projection,
                classes_used=used,
                alignment_classes=alignment_classes,
                alignment_features=alignment_features,
                alignment_scalars=scalars,  # type: ignore[arg-type]
            )
        except (KeyError, TypeError, ValueError) as error:
            raise IncompatibleModelError(
                f"the bundle's ridge solver state is malformed ({error}); re-export the bundle, or delete the "
                "'ridge_basis' entry of its statistics so it is rebuilt"
            ) from error


def _centred_columns(weights: np.ndarray) -> np.ndarray:
    return weights - weights.mean(axis=1, keepdims=True)


def build_ridge_basis(head: Head, stats: ClassStats, options: "AddClassOptions") -> RidgeBasis:
    """Solve the closed forms once for every column of ``head`` with examples in ``stats``.

    O(D^3 + D^2 C). ``stats`` must hold a Gram matrix and one row per head column.
    """
    model = _feature_model(head, stats)
    usable = np.flatnonzero(model.counts[: head.num_classes] > 0)
    if usable.size == 0:
        raise IncompatibleModelError(
            "the class statistics hold no examples for the existing classes, so new columns cannot be "
            "calibrated against them; recompute the statistics from examples of the old classes"
        )
    means = model.means[usable]
    counts = model.counts[usable]
    size = means.shape[1]
    discriminant_inverse = _stored(_inverse(_shrunk(model.covariance, options.shrinkage), "shared covariance"), True)
    inverse64 = discriminant_inverse.astype(np.float64)
    effective = float(np.sum(inverse64 * model.covariance.T))
    discriminant_weights = inverse64 @ means.T
    quadratic = np.einsum("dk,kd->k", discriminant_weights, means)
    discriminant_bias = -0.5 * (quadratic - options.small_sample_correction * effective / np.maximum(counts, 1.0))

    mean_gram = means.T @ means
    moment = _moment_matrix(means, mean_gram, usable.size * model.covariance, options)
    least_squares_inverse = _stored(_inverse(moment, "class second-moment matrix"), True)
    augmented = np.concatenate([means, np.ones((usable.size, 1))], axis=1)
    solution = _stored(least_squares_inverse.astype(np.float64) @ augmented.T).astype(np.float64)

    moments = _class_moments(model, usable, mean_gram)
    second = _stored(moments.second, True)
    moments = _Moments(first=moments.first, second=second.astype(np.float64))
    projection = _stored(moments.second @ _centred_columns(solution[:size]))

    head_weights = head.weights[:, usable].astype(np.float64)
    head_bias = head.bias[usable].astype(np.float64)
    calibration = np.zeros((3, size + 2))
    calibration[2, 2:] = moments.first
    fits = (
        _alignment(head_weights, head_bias, solution[:size], solution[size], None, usable, moments,
                   projected=projection.astype(np.float64)),
        _alignment(head_weights, head_bias, discriminant_weights, discriminant_bias, None, usable, moments),
    )
    for row, (scale_fit, offset, offset_bias) in enumerate(fits):
        calibration[row, 0] = scale_fit
        calibration[row, 1] = offset_bias
        calibration[row, 2:] = offset
    terms = _alignment_terms(solution, projection.astype(np.float64), head_weights, head_bias, moments.first)
    logger.debug("built a ridge basis over %d classes (%d-d)", usable.size, size)
    return RidgeBasis(
        classes=head.num_classes,
        updates=0,
        signature=head_signature(head, head.num_classes),
        settings=_settings(options),
        effective=effective,
        discriminant_inverse=discriminant_inverse,
        least_squares_inverse=least_squares_inverse,
        calibration=calibration,
        second_moment=second,
        old_solution=_stored(solution),
        old_projection=projection,
        classes_used=usable.astype(np.int64),
        alignment_classes=terms[0],
        alignment_features=terms[1],
        alignment_scalars=terms[2],
    )


def _alignment_terms(
    solution: np.ndarray, projection: np.ndarray, weights: np.ndarray, bias: np.ndarray, first: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, float]]:
    """What :func:`_alignment` needs of the basis classes' least-squares columns ``solution`` ((D+1) x U,
    with ``projection`` = second moment x their centred weights) and the head's columns, so that a
    low-rank change of the solution refits the logit scale in O(D U r) (:func:`_low_rank_alignment`)."""
    size = projection.shape[0]
    reference_mean = solution[:size].mean(axis=1)
    reference = solution[:size] - reference_mean[:, None]
    weights_mean = weights.mean(axis=1)
    centred = weights - weights_mean[:, None]
    reference_bias_mean = float(solution[size].mean())
    bias_mean = float(bias.mean())
    classes = np.stack([solution[size] - reference_bias_mean, first @ reference, first @ centred, bias - bias_mean])
    features = np.stack([reference_mean, weights_mean])
    scalars = (float(np.sum(reference * projection)), float(np.sum(centred * projection)), reference_bias_mean, bias_mean)
    return classes, features, scalars


def _low_rank_alignment(
    basis: RidgeBasis, weights: np.ndarray, moved: np.ndarray, change: np.ndarray,
) -> tuple[float, np.ndarray, float]:
    """:func:`_alignment` of the head's columns against the basis classes' least-squares columns after
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
    _check_scale(scale)
    reference_bias_mean = reference_bias_mean0 - float(bias_row @ change_mean)
    return scale, weights_mean - scale * reference_mean, bias_mean - scale * reference_bias_mean


def as_basis(extra: Any) -> RidgeBasis | None:
    """``extra`` (the statistics' ``ridge_basis``) as a :class:`RidgeBasis`, or None.

    A basis read from a bundle before this module registered its loader is a
    :class:`~edgeadapt.device.stats_extras.StoredExtra`; it is rebuilt here.

    Raises:
        BundleError: When the stored solver state is malformed.
    """
    if isinstance(extra, RidgeBasis) or extra is None:
        return extra
    if isinstance(extra, StoredExtra) and extra.key == EXTRA_KEY:
        try:
            return RidgeBasis.from_parts(extra.metadata(), extra.arrays())
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as error:
            raise BundleError(f"the stored ridge solver state is malformed ({error}); re-export the bundle") from error
    return None


def current_basis(head: Head, stats: ClassStats, options: "AddClassOptions") -> RidgeBasis:
    """The statistics' stored basis when it may serve this update of ``head``, else a new one."""
    basis = as_basis(stats.ridge_basis)
    if isinstance(basis, RidgeBasis) and basis.is_fresh_for(head, options):
        return basis
    return build_ridge_basis(head, stats, options)


def _blend(fitted: list[tuple[np.ndarray, np.ndarray]], counts: np.ndarray,
           options: "AddClassOptions") -> tuple[np.ndarray, np.ndarray]:
    """Blend the calibrated least-squares (first) and discriminant (second) columns by example count."""
    counts = np.asarray(counts, dtype=np.float64)
    share = counts / (counts + options.few_shot_examples) if options.few_shot_examples > 0 else np.ones_like(counts)
    return share * fitted[0][0] + (1.0 - share) * fitted[1][0], share * fitted[0][1] + (1.0 - share) * fitted[1][1]


def _mapped(basis: RidgeBasis, row: int, weights: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale, offset_bias, offset = basis.calibration[row, 0], basis.calibration[row, 1], basis.calibration[row, 2:]
    return scale * weights + offset[:, None], scale * bias + offset_bias


def _discriminant_columns(basis: RidgeBasis, means: np.ndarray, counts: np.ndarray,
                          options: "AddClassOptions") -> tuple[np.ndarray, np.ndarray]:
    weights = (basis.discriminant_inverse @ means.T.astype(np.float32)).astype(np.float64)
    quadratic = np.einsum("dk,kd->k", weights, means)
    bias = -0.5 * (quadratic - options.small_sample_correction * basis.effective / np.maximum(counts, 1.0))
    return weights, bias


def _refitted_least_squares(
    basis: RidgeBasis, head: Head, means: np.ndarray, factors: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated least-squares columns of new classes whose second moments are folded into ``A``.

    ``factors`` (r, D+1): rows whose outer products add up to the new classes' second
    moments of ``[features, 1]``. The old classes' columns move with ``A``; the logit
    scale is refitted on them as a from-scratch solve would, in O(D^2 r + D U r).
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
        projection = second.astype(np.float64) @ _centred_columns(old[:size])
    else:  # many examples: (A + V V^T)^-1 b = (I + P V^T)^-1 A^-1 b, and a direct projection
        system = np.eye(size + 1) + projected @ factors
        solved = np.linalg.solve(system, np.concatenate([right, basis.old_solution.astype(np.float64)], axis=1))
        right, old = solved[:, : augmented.shape[1]], solved[:, augmented.shape[1]:]
        projection = second.astype(np.float64) @ _centred_columns(old[:size])
    usable = basis.classes_used
    moments = _Moments(first=basis.first_moment, second=np.empty((0, 0)))  # second enters through ``projection``
    scale, offset, offset_bias = _alignment(
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
    least_squares = _refitted_least_squares(basis, head, means, np.concatenate(rows))
    discriminant = _mapped(basis, 1, *_discriminant_columns(basis, means, counts, options))
    return _blend([least_squares, discriminant], counts, options)


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
        least_squares = _refitted_least_squares(basis, head, means, np.append(means[0], 1.0)[None, :])
    discriminant = _mapped(basis, 1, *_discriminant_columns(basis, means, counts, options))
    weights, bias = _blend([least_squares, discriminant], counts, options)
    return weights[:, 0], float(bias[0])


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
    scatter, scatter_degrees = _scatter(a_stats)
    known = _feature_model(a, a_stats, _covariance_from_scatter(scatter, scatter_degrees)).covariance
    scatter, scatter_degrees = _scatter_added(
        scatter, scatter_degrees, merged_stats.gram - a_stats.gram, b_stats.sums, b_stats.counts
    )
    target = None
    degrees = int(b_stats.counts.sum()) - b_stats.num_classes
    if b_stats.gram is not None and degrees > 0:
        # b's own within-class covariance, shrunk towards a's as for a new class with few examples
        weight = KNOWN_COVARIANCE_PRIOR / (degrees + KNOWN_COVARIANCE_PRIOR)
        target = (1.0 - weight) * _feature_model(a, b_stats).covariance + weight * known
    return _ridge_columns(a, merged_stats, new_indices, np.arange(a.num_classes), options,
                          known_covariance=known, target_covariance=target,
                          within=_covariance_from_scatter(scatter, scatter_degrees))


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
    model = _feature_model(head, stats)
    every = np.arange(head.num_classes)
    covariances: list[np.ndarray | None] = [None] * head.num_classes
    blended = []
    mean_gram = model.means.T @ model.means  # shared by the least squares and the alignment
    moments = _class_moments(model, every, mean_gram)
    head_weights, head_bias = head.weights.astype(np.float64), head.bias.astype(np.float64)
    for weights, bias in (
        _least_squares(model.means, covariances, model.covariance, options, mean_gram=mean_gram),
        _discriminant(model.means, model.counts, model.covariance, options),
    ):
        scale, offset, offset_bias = _alignment(head_weights, head_bias, weights, bias, model, every, moments)
        blended.append((scale * weights + offset[:, None], scale * bias + offset_bias))
    counts = model.counts
    share = counts / (counts + options.few_shot_examples) if options.few_shot_examples > 0 else np.ones_like(counts)
    new_weights = share * blended[0][0] + (1.0 - share) * blended[1][0]
    new_bias = share * blended[0][1] + (1.0 - share) * blended[1][1]
    if not (np.all(np.isfinite(new_weights)) and np.all(np.isfinite(new_bias))):
        raise IncompatibleModelError("the re-solved head came out non-finite; the class statistics are degenerate")
    return new_weights, new_bias


register_statistics_extra(EXTRA_KEY, BASIS_ARRAYS, RidgeBasis.from_parts)
