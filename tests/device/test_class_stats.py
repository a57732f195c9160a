"""ClassStats owns its updates: appended, strengthened, removed, merged (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeadapt.device import IncompatibleModelError, InputError
from edgeadapt.device.head import ClassStats

DIMENSION = 6


def _examples(seed: int, classes: int, per_class: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 3.0, (classes, DIMENSION))
    labels = np.repeat(np.arange(classes), per_class)
    return centres[labels] + rng.normal(0.0, 1.0, (labels.size, DIMENSION)), labels


def _same(a: ClassStats, b: ClassStats) -> None:
    np.testing.assert_allclose(a.sums, b.sums, rtol=1e-12, atol=1e-9)
    np.testing.assert_array_equal(a.counts, b.counts)
    if b.gram is None:
        assert a.gram is None
    else:
        np.testing.assert_allclose(a.gram, b.gram, rtol=1e-12, atol=1e-9)


def test_appended_equals_statistics_of_all_examples_and_leaves_the_original_alone():
    embeddings, labels = _examples(1, 5)
    old = ClassStats.from_embeddings(embeddings[labels < 3], labels[labels < 3], 3)
    before = (old.sums.copy(), old.counts.copy(), old.gram.copy())
    grown = old.appended([embeddings[labels == 3], embeddings[labels == 4]])
    _same(grown, ClassStats.from_embeddings(embeddings, labels, 5))
    assert grown.ridge_basis is None
    for kept, original in zip((old.sums, old.counts, old.gram), before):
        np.testing.assert_array_equal(kept, original)


def test_strengthened_adds_to_one_row_and_the_gram_matrix():
    embeddings, labels = _examples(2, 4)
    first, second = embeddings[: len(embeddings) // 2], embeddings[len(embeddings) // 2 :]
    first_labels, second_labels = labels[: len(labels) // 2], labels[len(labels) // 2 :]
    stats = ClassStats.from_embeddings(first, first_labels, 4)
    for label in range(4):
        stats = stats.strengthened(label, second[second_labels == label])
    _same(stats, ClassStats.from_embeddings(embeddings, labels, 4))


def test_removed_drops_the_row_and_keeps_the_shared_covariance():
    embeddings, labels = _examples(3, 5)
    stats = ClassStats.from_embeddings(embeddings, labels, 5)
    smaller = stats.removed(2)
    keep = labels != 2
    exact = ClassStats.from_embeddings(embeddings[keep], np.where(labels[keep] > 2, labels[keep] - 1, labels[keep]), 4)
    np.testing.assert_allclose(smaller.sums, exact.sums)
    np.testing.assert_array_equal(smaller.counts, exact.counts)
    # the Gram share of the removed class is estimated: the pooled covariance estimate stays the same
    np.testing.assert_allclose(smaller.within_covariance(), stats.within_covariance(), rtol=1e-9, atol=1e-9)
    assert stats.num_classes == 5


def test_merged_with_and_without_a_gram_matrix():
    embeddings, labels = _examples(4, 5, per_class=40)
    a_rows, b_rows = labels < 3, labels >= 3
    a = ClassStats.from_embeddings(embeddings[a_rows], labels[a_rows], 3)
    b = ClassStats.from_embeddings(embeddings[b_rows], labels[b_rows] - 3, 2)
    _same(a.merged(b), ClassStats.from_embeddings(embeddings, labels, 5))
    # b without a Gram matrix: its share is estimated from a's covariance (same true covariance here)
    estimated = a.merged(ClassStats(sums=b.sums, counts=b.counts))
    np.testing.assert_allclose(estimated.sums, a.merged(b).sums)
    exact_covariance = ClassStats.from_embeddings(embeddings, labels, 5).within_covariance()
    assert np.linalg.norm(estimated.within_covariance() - exact_covariance) < 0.25 * np.linalg.norm(exact_covariance)
    # a without a Gram matrix: the merged statistics have none
    assert ClassStats(sums=a.sums, counts=a.counts).merged(b).gram is None


def test_within_covariance_matches_numpy_on_centred_examples():
    embeddings, labels = _examples(5, 3, per_class=30)
    stats = ClassStats.from_embeddings(embeddings, labels, 3)
    centred = embeddings - stats.means()[labels]
    expected = centred.T @ centred / (labels.size - 3)
    np.testing.assert_allclose(stats.within_covariance(), expected, rtol=1e-9, atol=1e-9)


def test_bad_updates_raise_clear_errors():
    embeddings, labels = _examples(6, 3)
    stats = ClassStats.from_embeddings(embeddings, labels, 3)
    with pytest.raises(InputError, match="out of range"):
        stats.removed(3)
    with pytest.raises(InputError, match="out of range"):
        stats.strengthened(-1, embeddings[:2])
    with pytest.raises(InputError, match=r"must be \(n, 6\)"):
        stats.appended([np.zeros((2, 5))])
    with pytest.raises(InputError, match="NaN or infinite"):
        stats.strengthened(0, np.full((1, DIMENSION), np.nan))
    with pytest.raises(IncompatibleModelError, match="same backbone"):
        stats.merged(ClassStats(sums=np.zeros((1, 4)), counts=np.ones(1, dtype=np.int64)))
    with pytest.raises(IncompatibleModelError, match="Gram matrix"):
        ClassStats(sums=stats.sums, counts=stats.counts).within_covariance()
