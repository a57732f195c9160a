"""Calibration of the ridge method's closed-form columns against a head's existing columns (numpy only).

A closed form's columns are on their own logit scale. :func:`alignment` fits the scale and
the softmax-free offsets that map them onto the head's columns over the Gaussian model of the
head's classes (:class:`Moments`); :func:`blend` mixes the calibrated least-squares and
discriminant columns by each class's example count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edgeadapt.device.errors import IncompatibleModelError
from edgeadapt.device.ridge_model import FeatureModel

if TYPE_CHECKING:
    from edgeadapt.device.add_options import AddClassOptions


@dataclass
class Moments:
    """First and second moment of the Gaussian model of some classes (for :func:`fit_alignment`)."""

    first: np.ndarray  # (D,) mean of the class means
    second: np.ndarray  # (D, D) shared covariance + mean of m m^T


def class_moments(model: FeatureModel, classes: np.ndarray, mean_gram: np.ndarray | None = None) -> Moments:
    """The model's moments over ``classes`` (``mean_gram``: ``M^T M`` of their means when already known)."""
    means = model.means[classes]
    if mean_gram is None:
        mean_gram = means.T @ means
    return Moments(first=means.mean(axis=0), second=model.covariance + mean_gram / len(classes))


def check_scale(scale: float) -> None:
    if not np.isfinite(scale) or scale <= 0:
        raise IncompatibleModelError(
            "the head's columns do not agree with its class statistics (the fitted logit scale is "
            f"{scale:.3g}); the statistics probably belong to another head or backbone. Recompute the statistics "
            "from examples of the old classes, or re-solve the head (resolve_all) before adding classes"
        )


def fit_alignment(
    weights: np.ndarray, bias: np.ndarray, reference_weights: np.ndarray, reference_bias: np.ndarray,
    model: FeatureModel | None, classes: np.ndarray, moments: Moments | None = None,
    projected: np.ndarray | None = None,
) -> tuple[float, np.ndarray, float]:
    """Fit ``weights ~ s * reference + v 1^T``, ``bias ~ s * reference_bias + beta``.

    ``s`` is the class-balanced least-squares match of the column-centred logits of the two
    heads over the Gaussian model of ``classes`` (``v`` and ``beta`` are the per-input and
    global offsets that softmax leaves free). Returns (s, v, beta). ``moments``: the
    model's moments over ``classes`` (:func:`class_moments`) when already computed;
    ``projected``: ``moments.second`` times the column-centred ``reference_weights`` when
    already known (the cached solver state updates it cheaply).
    """
    count = weights.shape[1]
    mean_weights, mean_reference = weights.mean(axis=1), reference_weights.mean(axis=1)
    if count >= 2:
        if moments is None:
            assert model is not None
            moments = class_moments(model, classes)
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
    check_scale(scale)
    offset = mean_weights - scale * mean_reference
    offset_bias = float(bias.mean() - scale * reference_bias.mean()) if count >= 2 else float(bias[0] - scale * reference_bias[0])
    return scale, offset, offset_bias


def blend_by_count(fitted: list[tuple[np.ndarray, np.ndarray]], counts: np.ndarray,
           options: "AddClassOptions") -> tuple[np.ndarray, np.ndarray]:
    """Blend the calibrated least-squares (first) and discriminant (second) columns by example count."""
    counts = np.asarray(counts, dtype=np.float64)
    share = counts / (counts + options.few_shot_examples) if options.few_shot_examples > 0 else np.ones_like(counts)
    return share * fitted[0][0] + (1.0 - share) * fitted[1][0], share * fitted[0][1] + (1.0 - share) * fitted[1][1]


def centred_columns(weights: np.ndarray) -> np.ndarray:
    return weights - weights.mean(axis=1, keepdims=True)
