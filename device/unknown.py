"""Optional "unknown" rejection: answer "none of the known classes" instead of a wrong class.

The score of an embedding is the cosine similarity between its centered feature and the
prototype (the centered mean embedding, from the bundle's class statistics) of the class the
head predicts. An image whose score is below a calibrated threshold is "unknown".

Why this stays valid when classes are added: the score of an image depends only on the
predicted class's own prototype and on a center that is frozen at calibration time, not on
how many classes exist or on their softmax competition. Adding a class appends a prototype
(its mean embedding, stored by the update) and leaves every old prototype, and so every old
score and the threshold, unchanged. (A softmax-probability threshold would drift: each new
class takes probability mass from the old ones.)

Stored in the bundle (manifest ``head.unknown``)::

    "unknown": {"method": "prototype_cosine", "threshold": 0.41, "center": "heads/v3/unknown_center.npy",
                "accept_rate": 0.95, "calibrated_examples": 60, "calibrated_in_version": 3}

numpy only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeadapt.device.errors import IncompatibleModelError, InputError, UpdateError
from edgeadapt.device.head import ClassStats, Head

logger = logging.getLogger(__name__)

METHOD = "prototype_cosine"
UNKNOWN_LABEL = "unknown"
DEFAULT_ACCEPT_RATE = 0.95


def _normalize_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix))
    return matrix / np.maximum(norms, 1e-12)[:, None]


@dataclass
class UnknownRejection:
    """A calibrated unknown-rejection rule: reject when the prototype cosine is below ``threshold``."""

    threshold: float
    center: np.ndarray
    accept_rate: float = DEFAULT_ACCEPT_RATE
    calibrated_examples: int = 0
    method: str = METHOD

    def __post_init__(self) -> None:
        self.center = np.ascontiguousarray(np.asarray(self.center, dtype=np.float32).reshape(-1))
        if self.method != METHOD:
            raise IncompatibleModelError(f"unknown-rejection method {self.method!r} is not supported (only {METHOD!r})")
        if not np.isfinite(self.threshold) or not -1.0 <= float(self.threshold) <= 1.0:
            raise IncompatibleModelError(f"unknown-rejection threshold must be a cosine in [-1, 1], got {self.threshold}")
        if not np.all(np.isfinite(self.center)):
            raise IncompatibleModelError("unknown-rejection center contains NaN or infinite values")

    def prototypes(self, stats: ClassStats) -> np.ndarray:
        """Unit-length centered class means (C, D); a class without examples gets a zero prototype."""
        if stats.embedding_size != self.center.shape[0]:
            raise IncompatibleModelError(
                f"the unknown-rejection center is {self.center.shape[0]}-d but the class statistics are "
                f"{stats.embedding_size}-d"
            )
        means = stats.means().astype(np.float32) - self.center
        prototypes = _normalize_rows(means)
        prototypes[stats.counts == 0] = 0.0
        return prototypes

    def scores(self, head: Head, stats: ClassStats, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(predicted class index, prototype cosine) of each embedding, both (N,)."""
        embeddings = head.check_embeddings(embeddings)
        if stats.num_classes != head.num_classes:
            raise IncompatibleModelError(
                f"class statistics have {stats.num_classes} classes but the head has {head.num_classes}"
            )
        predicted = head.logits(embeddings).argmax(axis=1)
        features = _normalize_rows(embeddings - self.center)
        prototypes = self.prototypes(stats)
        cosine = np.einsum("ij,ij->i", features, prototypes[predicted])
        return predicted, cosine.astype(np.float32)

    def is_unknown(self, head: Head, stats: ClassStats, embeddings: np.ndarray) -> np.ndarray:
        """Boolean (N,): True where the embedding is of none of the known classes."""
        return self.scores(head, stats, embeddings)[1] < np.float32(self.threshold)

    def section(self, center_path: str, version: int) -> dict[str, Any]:
        """The manifest ``head.unknown`` section (the center is stored in ``center_path``)."""
        return {
            "method": self.method,
            "threshold": float(self.threshold),
            "center": center_path,
            "accept_rate": float(self.accept_rate),
            "calibrated_examples": int(self.calibrated_examples),
            "calibrated_in_version": int(version),
        }


def calibrate_unknown(
    head: Head,
    stats: ClassStats | None,
    embeddings: np.ndarray,
    accept_rate: float = DEFAULT_ACCEPT_RATE,
    unknown_embeddings: np.ndarray | None = None,
    center: np.ndarray | None = None,
) -> UnknownRejection:
    """Calibrate the threshold on embeddings of known classes (held out from the statistics if possible).

    Without ``unknown_embeddings`` the threshold accepts ``accept_rate`` of the known
    embeddings. With examples of unknown things it maximises the balanced accuracy
    (known accepted + unknown rejected) / 2 among thresholds that still accept at least
    half of the known embeddings. ``center`` defaults to the head's feature mean, else the
    mean of all examples in the statistics.
    """
    if stats is None:
        raise UpdateError(
            "unknown rejection needs the bundle's class statistics (class means); this bundle has none: "
            "re-export it with class statistics"
        )
    if not 0.5 <= float(accept_rate) < 1.0:
        raise InputError(f"accept_rate must be in [0.5, 1), got {accept_rate}")
    known = head.check_embeddings(embeddings)
    if known.shape[0] < 2:
        raise InputError("calibrating unknown rejection needs at least 2 examples of known classes")
    if not np.all(np.isfinite(known)):
        raise InputError("calibration embeddings contain NaN or infinite values")
    if center is None:
        center = head.feature_mean if head.feature_mean is not None else stats.overall_mean()
    rule = UnknownRejection(threshold=0.0, center=center, accept_rate=float(accept_rate),
                            calibrated_examples=int(known.shape[0]))
    _, known_scores = rule.scores(head, stats, known)
    threshold = float(np.quantile(known_scores.astype(np.float64), 1.0 - float(accept_rate)))
    if unknown_embeddings is not None:
        others = head.check_embeddings(unknown_embeddings)
        if others.shape[0]:
            _, unknown_scores = rule.scores(head, stats, others)
            candidates = np.unique(np.concatenate([known_scores, unknown_scores]).astype(np.float64))
            best, best_value = threshold, -1.0
            for candidate in candidates:
                accepted = float(np.mean(known_scores >= candidate))
                if accepted < 0.5:
                    continue
                value = (accepted + float(np.mean(unknown_scores < candidate))) / 2.0
                if value > best_value:
                    best, best_value = float(candidate), value
            threshold = best
    rule.threshold = float(np.clip(threshold, -1.0, 1.0))
    logger.info("unknown rejection calibrated on %d known examples: threshold %.4f", known.shape[0], rule.threshold)
    return rule


def load_unknown(bundle: Any) -> UnknownRejection | None:
    """The unknown-rejection rule stored in a :class:`~edgeadapt.device.bundle.Bundle`, or None."""
    section = bundle.manifest.data["head"].get("unknown")
    if not section:
        return None
    return UnknownRejection(
        threshold=float(section["threshold"]),
        center=bundle._load_array(section["center"]),
        accept_rate=float(section.get("accept_rate", DEFAULT_ACCEPT_RATE)),
        calibrated_examples=int(section.get("calibrated_examples", 0)),
        method=section.get("method", METHOD),
    )


class UnknownAwareClassifier:
    """Wraps a :class:`~edgeadapt.device.runtime.Runtime`: top-1 class or ``"unknown"``.

    >>> classifier = UnknownAwareClassifier(runtime)      # reads the rule stored in the bundle
    >>> classifier.classify(["a.jpg", "b.jpg"])           # [("daisy", 0.93, 0.71), ("unknown", 0.55, 0.12)]
    """

    def __init__(self, runtime: Any, rule: UnknownRejection | None = None, unknown_label: str = UNKNOWN_LABEL):
        self.runtime = runtime
        self.unknown_label = unknown_label
        self.rule = rule if rule is not None else load_unknown(runtime.bundle)
        if self.rule is None:
            raise UpdateError(
                f"bundle {runtime.bundle.path} has no calibrated unknown rejection; calibrate it first "
                "(HeadUpdater.calibrate_unknown or `edgeadapt-device calibrate-unknown`)"
            )
        self._stats_version: int | None = None
        self._stats: ClassStats | None = None

    def _current_stats(self) -> ClassStats:
        version = self.runtime.manifest.version
        if self._stats is None or self._stats_version != version:
            stats = self.runtime.bundle.load_class_stats()
            if stats is None:
                raise UpdateError("unknown rejection needs class statistics, and this bundle has none")
            self._stats, self._stats_version = stats, version
        return self._stats

    def classify(self, images: Any) -> list[tuple[str, float, float]]:
        """For each image: (label or ``unknown_label``, softmax score of the top class, prototype cosine)."""
        from edgeadapt.device.head import softmax

        head = self.runtime.head
        names = self.runtime.class_names
        embeddings = self.runtime.embed(images)
        predicted, cosine = self.rule.scores(head, self._current_stats(), embeddings)
        probabilities = softmax(head.logits(embeddings))
        results = []
        for row, index, score in zip(probabilities, predicted, cosine):
            label = names[int(index)] if score >= self.rule.threshold else self.unknown_label
            results.append((label, float(row[int(index)]), float(score)))
        return results

