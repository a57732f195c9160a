"""The classifier head and the class statistics that travel with it (numpy only).

A head maps an embedding ``e`` (D floats, the backbone output) to class logits::

    f = e - feature_mean            (if feature_mean is set)
    f = f / ||f||                   (if l2_normalize)
    logits = (f @ weights + bias) / temperature

``weights`` is D x C float32 and ``bias`` is C float32. Each class is one column of
``weights`` (a "row" of the classifier), so adding a class appends a column and leaves
every old column, and so every old logit, bit-identical.

:class:`ClassStats` holds per-class sums and counts of the raw embeddings and the shared
second-moment (Gram) matrix, so that later updates need no old images.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from edgeadapt.device.errors import IncompatibleModelError, InputError


def _finite_check(name: str, array: np.ndarray) -> None:
    if not np.all(np.isfinite(array)):
        raise InputError(f"{name} contains NaN or infinite values; check the backbone output or the inputs")


@dataclass
class Head:
    """A float32 linear classifier with optional feature normalisation."""

    weights: np.ndarray
    bias: np.ndarray
    feature_mean: np.ndarray | None = None
    l2_normalize: bool = False
    temperature: float = 1.0

    def __post_init__(self) -> None:
        self.weights = np.ascontiguousarray(self.weights, dtype=np.float32)
        self.bias = np.ascontiguousarray(self.bias, dtype=np.float32)
        if self.weights.ndim != 2:
            raise IncompatibleModelError(f"head weights must be D x C, got shape {self.weights.shape}")
        if self.bias.shape != (self.weights.shape[1],):
            raise IncompatibleModelError(
                f"head bias has shape {self.bias.shape}, expected ({self.weights.shape[1]},) to match the weights"
            )
        if self.feature_mean is not None:
            self.feature_mean = np.ascontiguousarray(self.feature_mean, dtype=np.float32)
            if self.feature_mean.shape != (self.weights.shape[0],):
                raise IncompatibleModelError(
                    f"head feature_mean has shape {self.feature_mean.shape}, expected ({self.weights.shape[0]},)"
                )
        if not self.temperature > 0:
            raise IncompatibleModelError(f"head temperature must be positive, got {self.temperature}")
        _finite_check("head weights", self.weights)
        _finite_check("head bias", self.bias)

    @property
    def embedding_size(self) -> int:
        return int(self.weights.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.weights.shape[1])

    def check_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        """Return ``embeddings`` as a float32 (N, D) array or raise :class:`InputError`."""
        embeddings = np.asarray(embeddings)
        if embeddings.ndim == 1:
            embeddings = embeddings[None]
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_size:
            raise InputError(
                f"embeddings have shape {embeddings.shape}, but this head expects (N, {self.embedding_size})"
            )
        return embeddings.astype(np.float32, copy=False)

    def features(self, embeddings: np.ndarray) -> np.ndarray:
        """Apply the head's feature normalisation (centering, L2) to raw embeddings."""
        features = self.check_embeddings(embeddings)
        if self.feature_mean is not None:
            features = features - self.feature_mean
        if self.l2_normalize:
            norms = np.sqrt(np.einsum("ij,ij->i", features, features))
            features = features / np.maximum(norms, np.float32(1e-12))[:, None]
        return features

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """Class logits, (N, C) float32.

        The product runs in fixed-width column blocks (:func:`column_stable_matmul`), so
        the logit of a class does not depend on how many classes follow it: appending
        classes leaves every old logit bit-identical.
        """
        blocks = self.__dict__.get("_column_blocks")
        if blocks is None or self.__dict__.get("_blocks_of") is not self.weights:
            blocks = padded_column_blocks(self.weights)
            self.__dict__["_column_blocks"], self.__dict__["_blocks_of"] = blocks, self.weights
        logits = column_stable_matmul(self.features(embeddings), self.weights, blocks)
        logits += self.bias
        if self.temperature != 1.0:
            logits /= np.float32(self.temperature)
        return logits

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        """Softmax over the logits, (N, C) float32."""
        return softmax(self.logits(embeddings))

    def same_normalisation(self, other: "Head") -> bool:
        """Whether ``other`` turns embeddings into features exactly like this head (mean, L2, temperature)."""
        if self.l2_normalize != other.l2_normalize or self.temperature != other.temperature:
            return False
        if (self.feature_mean is None) != (other.feature_mean is None):
            return False
        return self.feature_mean is None or bool(np.array_equal(self.feature_mean, other.feature_mean))

    def with_columns(self, weights: np.ndarray, bias: np.ndarray) -> "Head":
        """A copy with the same normalisation and new weights/bias."""
        return replace(self, weights=weights, bias=bias)


#: Width of the column blocks of :func:`column_stable_matmul`.
COLUMN_BLOCK = 64


def padded_column_blocks(weights: np.ndarray) -> list[np.ndarray]:
    """``weights`` (D, C) split into contiguous (D, COLUMN_BLOCK) blocks, the last zero-padded."""
    weights = np.asarray(weights, dtype=np.float32)
    blocks = []
    for start in range(0, weights.shape[1], COLUMN_BLOCK):
        block = weights[:, start : start + COLUMN_BLOCK]
        padded = np.zeros((weights.shape[0], COLUMN_BLOCK), dtype=np.float32)
        padded[:, : block.shape[1]] = block
        blocks.append(padded)
    return blocks


def column_stable_matmul(features: np.ndarray, weights: np.ndarray, blocks: list[np.ndarray] | None = None) -> np.ndarray:
    """``features @ weights`` computed so that column j depends only on column j of ``weights``.

    A BLAS matrix product may pick a different kernel (and so a different summation
    order) when the number of columns changes: appending a class to the head would then
    change old logits in their last bits. Here the columns are multiplied in blocks of
    :data:`COLUMN_BLOCK`, the last block zero-padded to full width, so every block has
    the same shape whatever the class count and a column's result is the same before and
    after classes are appended. (N, D) x (D, C) -> (N, C) float32. ``blocks`` are the
    precomputed :func:`padded_column_blocks` of ``weights`` (the head caches them).
    """
    features = np.asarray(features, dtype=np.float32)
    if blocks is None:
        blocks = padded_column_blocks(weights)
    columns = weights.shape[1]
    if len(blocks) == 1:
        return (features @ blocks[0])[:, :columns]
    result = np.empty((features.shape[0], columns), dtype=np.float32)
    for number, block in enumerate(blocks):
        start = number * COLUMN_BLOCK
        width = min(COLUMN_BLOCK, columns - start)
        result[:, start : start + width] = (features @ block)[:, :width]
    return result


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=-1, keepdims=True)
    return shifted


@dataclass
class ClassStats:
    """Sufficient statistics of the raw embeddings seen for each class.

    ``sums[c]`` is the sum of class c's embeddings (float64), ``counts[c]`` their number.
    ``gram`` (optional, D x D float64) is the sum of ``e e^T`` over all examples of all
    classes; with the sums it gives the shared covariance needed by closed-form solvers.
    ``ridge_basis`` (optional): the ridge method's cached solver state derived from these
    statistics (:class:`edgeadapt.device.ridge_basis.RidgeBasis`), kept with them in the bundle.
    """

    sums: np.ndarray
    counts: np.ndarray
    gram: np.ndarray | None = None
    extra: dict = field(default_factory=dict)
    ridge_basis: Any = None

    def __post_init__(self) -> None:
        self.sums = np.asarray(self.sums, dtype=np.float64)
        self.counts = np.asarray(self.counts, dtype=np.int64)
        if self.sums.ndim != 2 or self.counts.shape != (self.sums.shape[0],):
            raise IncompatibleModelError(
                f"class statistics need sums (C, D) and counts (C,), got {self.sums.shape} and {self.counts.shape}"
            )
        if self.gram is not None:
            self.gram = np.asarray(self.gram, dtype=np.float64)
            size = self.sums.shape[1]
            if self.gram.shape != (size, size):
                raise IncompatibleModelError(f"gram matrix must be {size} x {size}, got {self.gram.shape}")

    @classmethod
    def from_embeddings(
        cls, embeddings: np.ndarray, labels: np.ndarray, num_classes: int, with_gram: bool = True
    ) -> "ClassStats":
        """Accumulate statistics from raw embeddings and integer labels."""
        embeddings = np.asarray(embeddings, dtype=np.float64)
        labels = np.asarray(labels, dtype=np.int64)
        _finite_check("embeddings", embeddings)
        if embeddings.ndim != 2 or labels.shape != (embeddings.shape[0],):
            raise InputError(f"embeddings {embeddings.shape} and labels {labels.shape} do not match")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise InputError(f"labels must lie in 0..{num_classes - 1}")
        sums = np.zeros((num_classes, embeddings.shape[1]), dtype=np.float64)
        np.add.at(sums, labels, embeddings)
        counts = np.bincount(labels, minlength=num_classes).astype(np.int64)
        gram = embeddings.T @ embeddings if with_gram else None
        return cls(sums=sums, counts=counts, gram=gram)

    @property
    def num_classes(self) -> int:
        return int(self.sums.shape[0])

    @property
    def embedding_size(self) -> int:
        return int(self.sums.shape[1])

    def means(self) -> np.ndarray:
        """Per-class mean embeddings (C, D); classes without examples give zeros."""
        return self.sums / np.maximum(self.counts, 1)[:, None]

    def overall_mean(self) -> np.ndarray:
        """Mean embedding over every example of every class."""
        return self.sums.sum(axis=0) / max(int(self.counts.sum()), 1)

    def nbytes_per_class(self) -> int:
        return int(self.sums.shape[1] * self.sums.itemsize + self.counts.itemsize)

    def nbytes_shared(self) -> int:
        return 0 if self.gram is None else int(self.gram.nbytes)
