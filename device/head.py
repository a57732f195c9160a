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
from typing import Any, Sequence

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
    statistics (:class:`edgeadapt.device.ridge_basis.RidgeBasis`), kept with them in the bundle
    when the bundle stores it (optional on the host, see ``BundleExportOptions.ridge_solver_state``).
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

    def pooled_scatter(self) -> tuple[np.ndarray, float]:
        """Pooled within-class scatter (symmetrised) of the raw embeddings and its degrees of freedom.

        From the Gram matrix and the sums: ``G - sum_c n_c mu_c mu_c^T`` over the classes with
        examples (one symmetric rank-k product), and ``N - (number of classes with examples)``.

        Raises:
            IncompatibleModelError: When the statistics have no Gram matrix.
        """
        gram = self._require_gram("the pooled scatter")
        counts = self.counts.astype(np.float64)
        present = counts > 0
        weighted = self.sums[present] / np.sqrt(counts[present])[:, None]  # sqrt(n_c) mu_c
        scatter = gram - weighted.T @ weighted
        return (scatter + scatter.T) / 2.0, float(counts.sum()) - float(present.sum())

    def within_covariance(self) -> np.ndarray:
        """Pooled within-class covariance (D, D) of the raw embeddings, from the Gram matrix and the sums.

        Raises:
            IncompatibleModelError: When the statistics have no Gram matrix.
        """
        scatter, degrees = self.pooled_scatter()
        return scatter / max(degrees, 1.0)

    # ------------------------------------------------------------------ updates (each returns new statistics)
    def appended(self, arrays: Sequence[np.ndarray]) -> "ClassStats":
        """These statistics with one new class per array of raw embeddings (n_k, D), in order.

        The new rows hold each array's sum and count; the Gram matrix (when kept) gains every new
        example. The solver state in ``ridge_basis`` is not carried over (its owner decides).
        ``extra`` is copied.

        Args:
            arrays: One float array (n_k, D) of raw embeddings per new class.

        Returns:
            New statistics with ``num_classes + len(arrays)`` rows; ``self`` is unchanged.

        Raises:
            InputError: When an array is not (n, D) with this embedding size, or is not finite.
        """
        arrays = [self._checked_examples(array, f"new class {number}") for number, array in enumerate(arrays)]
        if not arrays:
            return replace(self, extra=dict(self.extra), ridge_basis=None)
        sums = np.concatenate([self.sums, np.stack([array.sum(axis=0) for array in arrays])])
        counts = np.concatenate([self.counts, np.array([array.shape[0] for array in arrays], dtype=np.int64)])
        gram = None
        if self.gram is not None:
            stacked = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            gram = stacked.T @ stacked  # one new D x D array, then one pass adding the old Gram into it
            gram += self.gram
        return ClassStats(sums=sums, counts=counts, gram=gram, extra=dict(self.extra))

    def strengthened(self, index: int, array: np.ndarray) -> "ClassStats":
        """These statistics with more raw embeddings ``array`` (n, D) added to class ``index``.

        Args:
            index: The class that gains the examples (0-based).
            array: Raw embeddings (n, D).

        Returns:
            New statistics (class ``index``'s row and the Gram matrix updated); ``self`` is unchanged.
            The solver state in ``ridge_basis`` is not carried over.

        Raises:
            InputError: When ``index`` is out of range or ``array`` is not (n, D) and finite.
        """
        index = self._checked_index(index)
        array = self._checked_examples(array, f"class {index}")
        sums = self.sums.copy()
        counts = self.counts.copy()
        sums[index] += array.sum(axis=0)
        counts[index] += array.shape[0]
        gram = None if self.gram is None else self.gram + array.T @ array
        return ClassStats(sums=sums, counts=counts, gram=gram, extra=dict(self.extra))

    def removed(self, index: int) -> "ClassStats":
        """These statistics without class ``index`` (later classes move down one row).

        The Gram matrix cannot be split by class, so the removed class's share is estimated as
        ``(n_c - 1) Sw + n_c mu_c mu_c^T`` with the current shared covariance ``Sw`` and subtracted;
        the shared covariance estimate (scatter over its degrees of freedom) is unchanged by this.

        Args:
            index: The class to drop (0-based).

        Returns:
            New statistics with one row fewer; ``self`` is unchanged.

        Raises:
            InputError: When ``index`` is out of range.
        """
        index = self._checked_index(index)
        keep = np.array([row for row in range(self.num_classes) if row != index], dtype=np.int64)
        gram = None
        if self.gram is not None:
            count = int(self.counts[index])
            gram = self.gram.copy()
            if count > 0:
                mean = self.sums[index] / count
                # the class's own scatter has n_c - 1 degrees of freedom: (n_c - 1) Sw is its expected value
                gram -= (count - 1) * self.within_covariance() + count * np.outer(mean, mean)
                gram = (gram + gram.T) / 2.0
        return ClassStats(sums=self.sums[keep], counts=self.counts[keep], gram=gram, extra=dict(self.extra))

    def merged(self, other: "ClassStats") -> "ClassStats":
        """These rows then ``other``'s rows, the Gram matrices added.

        When ``other`` has no Gram matrix but these statistics do, its Gram matrix is estimated
        from this shared covariance and its class means (``N_b Sw + sum_c n_c mu_c mu_c^T``);
        when these have none, the result has none.

        Args:
            other: Statistics of the classes to append, over the same embedding size.

        Returns:
            New statistics with ``num_classes + other.num_classes`` rows; ``extra`` is this one's.

        Raises:
            IncompatibleModelError: When the embedding sizes differ.
        """
        if other.embedding_size != self.embedding_size:
            raise IncompatibleModelError(
                f"cannot merge statistics of {other.embedding_size}-d embeddings into {self.embedding_size}-d ones; "
                "both must come from the same backbone"
            )
        other_gram = other.gram
        if self.gram is not None and other_gram is None:
            means = other.means()
            other_gram = other.counts.sum() * self.within_covariance() + (means.T * other.counts) @ means
        gram = None if self.gram is None or other_gram is None else self.gram + other_gram
        return ClassStats(
            sums=np.concatenate([self.sums, other.sums]),
            counts=np.concatenate([self.counts, other.counts]),
            gram=gram,
            extra=dict(self.extra),
        )

    def _require_gram(self, what: str) -> np.ndarray:
        if self.gram is None:
            raise IncompatibleModelError(
                f"{what} needs the statistics' Gram matrix, which these statistics do not keep; "
                "rebuild them from embeddings with with_gram=True"
            )
        return self.gram

    def _checked_index(self, index: int) -> int:
        if not isinstance(index, (int, np.integer)) or not 0 <= int(index) < self.num_classes:
            raise InputError(f"class index {index!r} is out of range: the statistics hold {self.num_classes} classes")
        return int(index)

    def _checked_examples(self, array: np.ndarray, what: str) -> np.ndarray:
        array = np.asarray(array, dtype=np.float64)
        if array.ndim != 2 or array.shape[1] != self.embedding_size:
            raise InputError(
                f"{what}: embeddings must be (n, {self.embedding_size}), got shape {array.shape}"
            )
        _finite_check(f"{what} embeddings", array)
        return array

    def nbytes_per_class(self) -> int:
        return int(self.sums.shape[1] * self.sums.itemsize + self.counts.itemsize)

    def nbytes_shared(self) -> int:
        return 0 if self.gram is None else int(self.gram.nbytes)
