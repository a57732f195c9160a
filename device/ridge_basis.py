"""The ridge method's cached solver state, :class:`RidgeBasis`: build, freshness, bundle round trip (numpy only).

The state holds the inverses and calibration that depend only on a head's existing classes,
so adding a class costs a low-rank update instead of a full solve (see the class docstring);
:mod:`edgeadapt.device.ridge_basis_columns` computes new columns from it. The bundle stores it
with the class statistics as named arrays (registered here as a statistics extra).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeadapt.device.errors import BundleError, IncompatibleModelError
from edgeadapt.device.head import ClassStats, Head
from edgeadapt.device.ridge_calibration import Moments, centred_columns, class_moments, fit_alignment
from edgeadapt.device.ridge_closed_forms import moment_matrix, shrunk_covariance, spd_inverse
from edgeadapt.device.ridge_model import feature_model
from edgeadapt.device.stats_extras import EXTRA_KEY, StoredExtra, register_statistics_extra

if TYPE_CHECKING:
    from edgeadapt.device.add_options import AddClassOptions

logger = logging.getLogger(__name__)


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
        return spd_inverse(matrix)
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


def build_ridge_basis(head: Head, stats: ClassStats, options: "AddClassOptions") -> RidgeBasis:
    """Solve the closed forms once for every column of ``head`` with examples in ``stats``.

    O(D^3 + D^2 C). ``stats`` must hold a Gram matrix and one row per head column.
    """
    model = feature_model(head, stats)
    usable = np.flatnonzero(model.counts[: head.num_classes] > 0)
    if usable.size == 0:
        raise IncompatibleModelError(
            "the class statistics hold no examples for the existing classes, so new columns cannot be "
            "calibrated against them; recompute the statistics from examples of the old classes"
        )
    means = model.means[usable]
    counts = model.counts[usable]
    size = means.shape[1]
    discriminant_inverse = _stored(_inverse(shrunk_covariance(model.covariance, options.shrinkage), "shared covariance"), True)
    inverse64 = discriminant_inverse.astype(np.float64)
    effective = float(np.sum(inverse64 * model.covariance.T))
    discriminant_weights = inverse64 @ means.T
    quadratic = np.einsum("dk,kd->k", discriminant_weights, means)
    discriminant_bias = -0.5 * (quadratic - options.small_sample_correction * effective / np.maximum(counts, 1.0))

    mean_gram = means.T @ means
    moment = moment_matrix(means, mean_gram, usable.size * model.covariance, options)
    least_squares_inverse = _stored(_inverse(moment, "class second-moment matrix"), True)
    augmented = np.concatenate([means, np.ones((usable.size, 1))], axis=1)
    solution = _stored(least_squares_inverse.astype(np.float64) @ augmented.T).astype(np.float64)

    moments = class_moments(model, usable, mean_gram)
    second = _stored(moments.second, True)
    moments = Moments(first=moments.first, second=second.astype(np.float64))
    projection = _stored(moments.second @ centred_columns(solution[:size]))

    head_weights = head.weights[:, usable].astype(np.float64)
    head_bias = head.bias[usable].astype(np.float64)
    calibration = np.zeros((3, size + 2))
    calibration[2, 2:] = moments.first
    fits = (
        fit_alignment(head_weights, head_bias, solution[:size], solution[size], None, usable, moments,
                   projected=projection.astype(np.float64)),
        fit_alignment(head_weights, head_bias, discriminant_weights, discriminant_bias, None, usable, moments),
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
    """What :func:`fit_alignment` needs of the basis classes' least-squares columns ``solution`` ((D+1) x U,
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


register_statistics_extra(EXTRA_KEY, BASIS_ARRAYS, RidgeBasis.from_parts)
