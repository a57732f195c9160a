"""Reference embeddings: a few raw embeddings per class that the device update gate checks.

Stored with the head (``heads/vN/reference_embeddings.npy`` and ``reference_labels.npy``,
see :mod:`edgeadapt.device.head_section`); the device also keeps the examples it learned in
the same form (``device_examples``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeadapt.device.errors import IncompatibleModelError


@dataclass
class ReferenceEmbeddings:
    """A few raw embeddings per class, kept in the bundle for the device update gate.

    Before the device commits a head update it checks that the updated head still
    predicts these old-class embeddings as before (see docs/DEVICE_UPDATES.md).
    ``embeddings`` is (K, D) float16 or float32 (float16 halves the size and is plenty for
    the gate), ``labels`` is (K,) int64 class indices into the head.
    """

    embeddings: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        embeddings = np.asarray(self.embeddings)
        if embeddings.dtype not in (np.float16, np.float32):
            embeddings = embeddings.astype(np.float32)
        self.embeddings = np.ascontiguousarray(embeddings)
        self.labels = np.ascontiguousarray(np.asarray(self.labels, dtype=np.int64).reshape(-1))
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != self.labels.shape[0]:
            raise IncompatibleModelError(
                f"reference embeddings {self.embeddings.shape} and labels {self.labels.shape} do not match"
            )
        if not np.all(np.isfinite(self.embeddings)):
            raise IncompatibleModelError("reference embeddings contain NaN or infinite values")
        if self.labels.size and self.labels.min() < 0:
            raise IncompatibleModelError("reference labels must be non-negative class indices")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def as_float32(self) -> np.ndarray:
        """The embeddings as float32 (converted once and cached: float16 conversion is slow in numpy)."""
        cached = self.__dict__.get("_float32")
        if cached is None:
            cached = np.asarray(self.embeddings, dtype=np.float32)
            self.__dict__["_float32"] = cached
        return cached

    @classmethod
    def select(
        cls, embeddings: np.ndarray, labels: np.ndarray, per_class: int = 5, seed: int = 0, dtype: str = "float16"
    ) -> "ReferenceEmbeddings":
        """Pick at most ``per_class`` embeddings of each class (deterministic in ``seed``)."""
        embeddings = np.asarray(embeddings)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if embeddings.ndim != 2 or embeddings.shape[0] != labels.shape[0]:
            raise IncompatibleModelError(f"embeddings {embeddings.shape} and labels {labels.shape} do not match")
        if per_class < 1:
            raise IncompatibleModelError(f"per_class must be at least 1, got {per_class}")
        chosen = []
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            if len(members) > per_class:
                members = np.sort(np.random.default_rng([int(seed), int(label)]).choice(members, per_class, replace=False))
            chosen.append(members)
        indices = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
        return cls(embeddings[indices].astype(np.dtype(dtype)), labels[indices])

    def per_class_count(self) -> int:
        """The largest number of references held for one class (0 when empty)."""
        return int(np.bincount(self.labels).max()) if self.labels.size else 0
