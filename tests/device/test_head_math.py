"""Head math for adding classes (edgeadapt.device.incremental): numpy only, no TensorFlow.

Real embeddings come from the tiny fixture bundle through the device Runtime.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgeadapt.device import Bundle, ClassStats, Head, IncompatibleModelError, InputError, Runtime
from edgeadapt.device.head import COLUMN_BLOCK, column_stable_matmul
from edgeadapt.device.incremental import (
    DEFAULT_METHOD,
    METHODS,
    AddClassOptions,
    add_classes,
    add_examples,
    merge_heads,
    needs_statistics,
    old_logits_unchanged,
    remove_class,
    resolve_all,
)

SIZE = 24


def gaussian_classes(count: int, per_class: int, seed: int, size: int = SIZE, spread: float = 1.0):
    """Separable Gaussian classes of non-negative-ish embeddings (means far apart)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 3.0, size=(count, size)) + 4.0
    embeddings = np.concatenate([mean + spread * rng.normal(size=(per_class, size)) for mean in means])
    labels = np.repeat(np.arange(count), per_class)
    return embeddings.astype(np.float32), labels, means


def trained_head(embeddings, labels, count, normalisation: str = "center") -> Head:
    """A softmax-trained head (numpy, via the same trainer the trained methods use)."""
    from edgeadapt.device.incremental import train_columns

    mean = embeddings.astype(np.float64).mean(axis=0).astype(np.float32) if normalisation != "none" else None
    shell = Head(np.zeros((embeddings.shape[1], count), np.float32), np.zeros(count, np.float32), feature_mean=mean,
                 l2_normalize=normalisation == "center_l2", temperature=0.1 if normalisation == "center_l2" else 1.0)
    weights, bias = train_columns(shell.features(embeddings).astype(np.float64), labels, shell.weights, shell.bias, np.arange(count),
                                  shell.temperature, AddClassOptions(training_steps=300, learning_rate=0.05))
    return shell.with_columns(weights.astype(np.float32), bias.astype(np.float32))


@pytest.fixture(scope="module")
def toy():
    embeddings, labels, _ = gaussian_classes(5, 60, seed=1)
    old = labels < 3
    head = trained_head(embeddings[old], labels[old], 3)
    stats = ClassStats.from_embeddings(embeddings[old], labels[old], 3)
    new = [embeddings[labels == 3], embeddings[labels == 4]]
    test, test_labels, _ = gaussian_classes(5, 40, seed=1)  # same means (same seed), fresh draws below
    rng = np.random.default_rng(7)
    test = test + rng.normal(scale=0.5, size=test.shape).astype(np.float32)
    return head, stats, new, test, test_labels


# ----------------------------------------------------------------------------- append-only
def test_column_stable_matmul_keeps_old_columns_bit_identical():
    rng = np.random.default_rng(0)
    for size, classes in ((16, 3), (64, COLUMN_BLOCK), (256, 17), (1024, 90)):
        features = rng.random((33, size), dtype=np.float32)
        weights = rng.standard_normal((size, classes)).astype(np.float32)
        grown = np.concatenate([weights, rng.standard_normal((size, 7)).astype(np.float32)], axis=1)
        before = column_stable_matmul(features, weights)
        assert np.array_equal(column_stable_matmul(features, grown)[:, :classes], before)
        np.testing.assert_allclose(before, features @ weights, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_add_classes_is_append_only(toy, method):
    head, stats, new, test, _ = toy
    if method == "center_l2":
        embeddings = np.concatenate([stats.means().astype(np.float32)] * 2)  # any cosine head will do
        head = trained_head(embeddings, np.tile(np.arange(3), 2), 3, "center_l2")
    grown, updated = add_classes(head, stats, new, AddClassOptions(method=method))
    assert grown.num_classes == head.num_classes + 2
    assert np.array_equal(grown.weights[:, :3], head.weights)
    assert np.array_equal(grown.bias[:3], head.bias)
    assert grown.l2_normalize == head.l2_normalize and grown.temperature == head.temperature
    assert (grown.feature_mean is None) == (head.feature_mean is None)
    if head.feature_mean is not None:
        assert np.array_equal(grown.feature_mean, head.feature_mean)
    assert np.array_equal(grown.logits(test)[:, :3], head.logits(test))
    assert old_logits_unchanged(head, grown, test)
    assert grown.weights.dtype == np.float32 and np.all(np.isfinite(grown.weights))
    # statistics: rows appended, Gram updated with the new examples
    assert updated.num_classes == 5
    assert np.array_equal(updated.sums[:3], stats.sums) and np.array_equal(updated.counts[:3], stats.counts)
    np.testing.assert_allclose(updated.sums[3], new[0].astype(np.float64).sum(axis=0))
    assert updated.counts[3] == len(new[0]) and updated.counts[4] == len(new[1])
    expected_gram = stats.gram + sum(array.astype(np.float64).T @ array.astype(np.float64) for array in new)
    np.testing.assert_allclose(updated.gram, expected_gram)


def test_add_classes_does_not_modify_its_inputs(toy):
    head, stats, new, _, _ = toy
    copies = (head.weights.copy(), head.bias.copy(), stats.sums.copy(), stats.gram.copy(), [a.copy() for a in new])
    add_classes(head, stats, new)
    assert np.array_equal(head.weights, copies[0]) and np.array_equal(head.bias, copies[1])
    assert np.array_equal(stats.sums, copies[2]) and np.array_equal(stats.gram, copies[3])
    assert all(np.array_equal(a, b) for a, b in zip(new, copies[4]))


def test_add_classes_is_deterministic(toy):
    head, stats, new, _, _ = toy
    for method in METHODS:
        if method == "center_l2":
            continue
        first, _ = add_classes(head, stats, new, AddClassOptions(method=method))
        second, _ = add_classes(head, stats, new, AddClassOptions(method=method))
        assert np.array_equal(first.weights, second.weights) and np.array_equal(first.bias, second.bias)


def test_default_method_learns_new_classes_and_keeps_old_ones(toy):
    head, stats, new, test, labels = toy
    grown, _ = add_classes(head, stats, new)
    predictions = grown.logits(test).argmax(axis=1)
    assert np.mean(predictions[labels < 3] == labels[labels < 3]) >= 0.95
    assert np.mean(predictions[labels >= 3] == labels[labels >= 3]) >= 0.95


def test_uncalibrated_lower_bound_forgets_old_classes(toy):
    head, stats, new, test, labels = toy
    calibrated, _ = add_classes(head, stats, new)
    uncalibrated, _ = add_classes(head, stats, new, AddClassOptions(method="none"))
    old = labels < 3
    old_calibrated = np.mean(calibrated.logits(test[old]).argmax(1) == labels[old])
    old_uncalibrated = np.mean(uncalibrated.logits(test[old]).argmax(1) == labels[old])
    assert old_uncalibrated < old_calibrated


def test_add_classes_without_statistics_for_methods_that_need_none(toy):
    head, _, new, test, _ = toy
    for method in ("weight_align", "imprint", "none"):
        grown, updated = add_classes(head, None, new, AddClassOptions(method=method))
        assert updated is None and np.array_equal(grown.logits(test)[:, :3], head.logits(test))
    assert needs_statistics("ridge") and not needs_statistics("imprint")


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "arrays, message",
    [
        ([], "no new classes"),
        ([np.zeros((0, SIZE), np.float32)], "no examples"),
        ([np.full((3, SIZE), np.nan, np.float32)], "NaN"),
        ([np.full((3, SIZE), np.inf, np.float32)], "NaN or infinite"),
        ([np.ones((3, SIZE + 1), np.float32)], "embeddings"),
        ([np.ones((2, 3, SIZE), np.float32)], "shape"),
    ],
)
def test_add_classes_refuses_bad_embeddings(toy, arrays, message):
    head, stats, _, _, _ = toy
    with pytest.raises(InputError, match=message):
        add_classes(head, stats, arrays)


def test_add_classes_refuses_a_bare_array_and_unknown_method(toy):
    head, stats, new, _, _ = toy
    with pytest.raises(InputError, match="one .* array per new class"):
        add_classes(head, stats, new[0])
    with pytest.raises(InputError, match="unknown method"):
        AddClassOptions(method="magic")
    with pytest.raises(InputError, match="shrinkage"):
        AddClassOptions(shrinkage=2.0)


def test_missing_statistics_say_what_to_do(toy):
    head, stats, new, _, _ = toy
    with pytest.raises(IncompatibleModelError, match="class statistics") as error:
        add_classes(head, None, new, AddClassOptions(method="ridge"))
    assert "replay" in str(error.value) and "center_l2" in str(error.value)
    without_gram = ClassStats(stats.sums, stats.counts, gram=None)
    with pytest.raises(IncompatibleModelError, match="Gram"):
        add_classes(head, without_gram, new, AddClassOptions(method="ridge"))
    with pytest.raises(IncompatibleModelError, match="statistics"):
        resolve_all(head, None)


def test_statistics_of_another_head_are_refused(toy):
    head, stats, new, _, _ = toy
    other = ClassStats(np.zeros((4, SIZE)), np.ones(4, np.int64), gram=np.eye(SIZE))
    with pytest.raises(IncompatibleModelError, match="do not belong"):
        add_classes(head, other, new)


def test_center_l2_needs_a_cosine_head(toy):
    head, stats, new, _, _ = toy
    with pytest.raises(IncompatibleModelError, match="L2-normalised"):
        add_classes(head, stats, new, AddClassOptions(method="center_l2"))


# ----------------------------------------------------------------------------- strengthen / remove
@pytest.mark.parametrize("method", ["ridge", "imprint", "weight_align", "none"])
def test_add_examples_changes_only_that_column(toy, method):
    head, stats, new, _, _ = toy
    grown, grown_stats = add_classes(head, stats, new)
    extra = new[1][:5] + 0.1
    strengthened, updated = add_examples(grown, grown_stats, 4, extra, AddClassOptions(method=method))
    others = [0, 1, 2, 3]
    assert np.array_equal(strengthened.weights[:, others], grown.weights[:, others])
    assert np.array_equal(strengthened.bias[others], grown.bias[others])
    assert not np.array_equal(strengthened.weights[:, 4], grown.weights[:, 4])
    assert updated.counts[4] == grown_stats.counts[4] + 5
    np.testing.assert_allclose(updated.sums[4], grown_stats.sums[4] + extra.astype(np.float64).sum(axis=0))
    with pytest.raises(InputError, match="out of range"):
        add_examples(grown, grown_stats, 9, extra)
    with pytest.raises(InputError, match="NaN"):
        add_examples(grown, grown_stats, 4, np.full((2, SIZE), np.nan))


def test_remove_class_keeps_other_columns(toy):
    head, stats, new, _, _ = toy
    grown, grown_stats = add_classes(head, stats, new)
    smaller, smaller_stats = remove_class(grown, grown_stats, 1)
    keep = [0, 2, 3, 4]
    assert np.array_equal(smaller.weights, grown.weights[:, keep])
    assert np.array_equal(smaller.bias, grown.bias[keep])
    assert np.array_equal(smaller_stats.sums, grown_stats.sums[keep])
    assert smaller_stats.gram.shape == grown_stats.gram.shape
    assert np.all(np.linalg.eigvalsh(smaller_stats.gram) > -1e-6 * np.trace(smaller_stats.gram))
    with pytest.raises(InputError):
        remove_class(grown, grown_stats, 5)


# ----------------------------------------------------------------------------- merge / resolve
def test_merge_heads_from_statistics(toy):
    head, stats, new, test, labels = toy
    other_embeddings = np.concatenate(new)
    other_labels = np.repeat([0, 1], [len(new[0]), len(new[1])])
    other = trained_head(other_embeddings, other_labels, 2)
    other_stats = ClassStats.from_embeddings(other_embeddings, other_labels, 2)
    for method in ("ridge", "imprint"):
        merged, merged_stats = merge_heads(head, stats, other, other_stats, AddClassOptions(method=method))
        assert np.array_equal(merged.logits(test)[:, :3], head.logits(test))
        assert merged_stats.num_classes == 5
        np.testing.assert_allclose(merged_stats.gram, stats.gram + other_stats.gram)
    merged, _ = merge_heads(head, stats, other, other_stats)
    assert np.mean(merged.logits(test).argmax(1) == labels) >= 0.95
    # statistics are sufficient: merging b's statistics ~ adding b's examples directly
    added, _ = add_classes(head, stats, new)
    assert np.mean(merged.logits(test).argmax(1) == added.logits(test).argmax(1)) >= 0.97


def test_merge_heads_refuses_incompatible_heads(toy):
    head, stats, new, _, _ = toy
    other = Head(np.ones((SIZE + 2, 2), np.float32), np.zeros(2, np.float32))
    with pytest.raises(IncompatibleModelError, match="different backbones"):
        merge_heads(head, stats, other, None)
    raw = Head(np.ones((SIZE, 2), np.float32), np.zeros(2, np.float32))  # no feature mean: other normalisation
    with pytest.raises(IncompatibleModelError, match="statistics"):
        merge_heads(head, stats, raw, None, AddClassOptions(method="ridge"))
    with pytest.raises(IncompatibleModelError, match="normalise features differently"):
        merge_heads(head, stats, raw, None, AddClassOptions(method="none"))
    same = dataclasses.replace(raw, feature_mean=head.feature_mean)
    merged, merged_stats = merge_heads(head, stats, same, None, AddClassOptions(method="weight_align"))
    assert merged.num_classes == 5 and merged_stats is None
    assert np.array_equal(merged.weights[:, :3], head.weights)


def test_resolve_all_refits_every_column_with_the_same_normalisation(toy):
    head, stats, new, test, labels = toy
    grown, grown_stats = add_classes(head, stats, new)
    resolved = resolve_all(grown, grown_stats)
    assert resolved.num_classes == grown.num_classes
    assert not np.array_equal(resolved.weights[:, :3], grown.weights[:, :3])  # old outputs change: labelled so
    assert np.array_equal(resolved.feature_mean, grown.feature_mean)
    assert np.mean(resolved.logits(test).argmax(1) == labels) >= 0.95
    assert not old_logits_unchanged(head, resolved, test)


# ----------------------------------------------------------------------------- real embeddings
@pytest.fixture(scope="module")
def real(fixture_dir, test_images):
    """Real int8-backbone embeddings of the fixture's held-out images and its head/statistics."""
    bundle = Bundle.open(fixture_dir / "tiny.eab")
    runtime = Runtime(bundle)
    images, labels = test_images
    return bundle.load_head(), bundle.load_class_stats(), runtime.embed(images), labels


def test_real_embeddings_old_logits_bit_identical_and_new_class_learned(real):
    head, stats, embeddings, labels = real
    last = head.num_classes - 1
    base, base_stats = remove_class(head, stats, last)  # the fixture knows every class: take one out
    members = np.flatnonzero(labels == last)
    shots, held_out = members[: len(members) // 2], members[len(members) // 2 :]
    for method in METHODS:
        if method == "center_l2":
            continue  # the fixture head is not a cosine head
        grown, _ = add_classes(base, base_stats, [embeddings[shots]], AddClassOptions(method=method))
        assert np.array_equal(base.logits(embeddings), grown.logits(embeddings)[:, :last]), method
    grown, _ = add_classes(base, base_stats, [embeddings[shots]])
    predictions = grown.logits(embeddings).argmax(axis=1)
    old = labels < last
    before = np.mean(base.logits(embeddings[old]).argmax(1) == labels[old])
    assert np.mean(predictions[old] == labels[old]) >= before - 0.1
    assert np.mean(predictions[held_out] == last) >= 0.6


def test_real_embeddings_resolve_and_default_method(real):
    head, stats, embeddings, labels = real
    assert DEFAULT_METHOD in METHODS
    resolved = resolve_all(head, stats)
    assert np.mean(resolved.logits(embeddings).argmax(1) == labels) >= 0.8


# ----------------------------------------------------------------------------- imprint_calibrated
@pytest.fixture(scope="module")
def imported_like():
    """A head like an imported one: raw (not centred, not L2-normalised) features, no statistics."""
    embeddings, labels, _ = gaussian_classes(6, 60, seed=3)
    embeddings = np.maximum(embeddings, 0.0)  # post-ReLU-like, all non-negative
    old = labels < 4
    head = trained_head(embeddings[old], labels[old], 4, "none")
    new = [embeddings[labels == 4], embeddings[labels == 5]]
    test, test_labels, _ = gaussian_classes(6, 40, seed=3)
    test = np.maximum(test + np.random.default_rng(11).normal(scale=0.5, size=test.shape).astype(np.float32), 0.0)
    return head, new, test, test_labels


@pytest.mark.parametrize("fixture", ["toy", "imported_like"])
def test_imprint_calibrated_without_statistics_is_append_only(request, fixture):
    values = request.getfixturevalue(fixture)
    head, new, test = (values[0], values[2], values[3]) if fixture == "toy" else (values[0], values[1], values[2])
    grown, updated = add_classes(head, None, new, AddClassOptions(method="imprint_calibrated"))
    assert updated is None and not needs_statistics("imprint_calibrated")
    assert grown.num_classes == head.num_classes + 2
    assert np.array_equal(grown.weights[:, : head.num_classes], head.weights)
    assert np.array_equal(grown.bias[: head.num_classes], head.bias)
    assert np.array_equal(grown.logits(test)[:, : head.num_classes], head.logits(test))
    # new columns: the imprinted direction scaled to the old columns' mean norm
    old_norm = np.mean(np.linalg.norm(head.weights.astype(np.float64), axis=0))
    np.testing.assert_allclose(np.linalg.norm(grown.weights[:, head.num_classes:].astype(np.float64), axis=0),
                               old_norm, rtol=1e-5)
    direction = head.features(new[0]).astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(grown.weights[:, head.num_classes] / old_norm, direction / np.linalg.norm(direction),
                               rtol=1e-4, atol=1e-5)


def test_imprint_calibrated_recognises_new_classes_without_swamping_old_ones(imported_like):
    head, new, test, test_labels = imported_like
    old_count = head.num_classes
    old = test_labels < old_count
    before = np.mean(head.logits(test[old]).argmax(1) == test_labels[old])
    assert before >= 0.9
    grown, _ = add_classes(head, None, new, AddClassOptions(method="imprint_calibrated"))
    predictions = grown.logits(test).argmax(1)
    assert np.mean(predictions[old] == test_labels[old]) >= before - 0.05
    assert np.mean(predictions[~old] == test_labels[~old]) >= 0.85
    # each new class wins on at least 1 - q of its own training examples, against all earlier columns
    for offset, array in enumerate(new):
        index = old_count + offset
        logits = grown.logits(array)
        assert np.mean(logits[:, index] > logits[:, :index].max(axis=1)) >= 0.95 - 1e-9
    # for comparison, plain imprinting (bias 0) swamps the old classes on this raw head
    imprinted, _ = add_classes(head, None, new, AddClassOptions(method="imprint"))
    assert np.mean(imprinted.logits(test[old]).argmax(1) == test_labels[old]) < np.mean(
        predictions[old] == test_labels[old])


def test_imprint_calibrated_quantile_and_statistics(toy, imported_like):
    head, new, _, _ = imported_like
    strict, _ = add_classes(head, None, new, AddClassOptions(method="imprint_calibrated", own_example_quantile=0.0))
    loose, _ = add_classes(head, None, new, AddClassOptions(method="imprint_calibrated", own_example_quantile=0.5))
    for offset, array in enumerate(new):
        index = head.num_classes + offset
        logits = strict.logits(array)
        assert np.all(logits[:, index] >= logits[:, :index].max(axis=1))
    assert np.all(strict.bias[head.num_classes:] > loose.bias[head.num_classes:])
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(InputError, match="own_example_quantile"):
            AddClassOptions(method="imprint_calibrated", own_example_quantile=bad)
    # with statistics they are updated like for any other method
    toy_head, stats, toy_new, _, _ = toy
    _, updated = add_classes(toy_head, stats, toy_new, AddClassOptions(method="imprint_calibrated"))
    assert updated.num_classes == 5 and updated.counts[3] == len(toy_new[0])
    with pytest.raises(InputError):
        add_classes(toy_head, None, [np.full((2, SIZE + 1), 1.0)], AddClassOptions(method="imprint_calibrated"))
    with pytest.raises(InputError):
        add_classes(toy_head, None, [np.full((2, SIZE), np.nan)], AddClassOptions(method="imprint_calibrated"))


def test_imprint_calibrated_add_examples_and_merge(toy):
    head, stats, new, _, _ = toy
    options = AddClassOptions(method="imprint_calibrated")
    grown, grown_stats = add_classes(head, stats, new, options)
    more = new[0][:10] + np.float32(0.1)
    strengthened, updated = add_examples(grown, grown_stats, 3, more, options)
    keep = [0, 1, 2, 4]
    assert np.array_equal(strengthened.weights[:, keep], grown.weights[:, keep])
    assert np.array_equal(strengthened.bias[keep], grown.bias[keep])
    assert updated.counts[3] == grown_stats.counts[3] + 10
    logits = strengthened.logits(more)
    assert np.mean(logits[:, 3] > np.delete(logits, 3, axis=1).max(axis=1)) >= 0.9
    with pytest.raises(IncompatibleModelError, match="class statistics"):
        add_examples(grown, None, 3, more, options)
    with pytest.raises(IncompatibleModelError, match="own examples"):
        merge_heads(head, stats, grown, grown_stats, options)
