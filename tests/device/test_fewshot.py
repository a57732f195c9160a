"""The default few-shot method ``claim`` (edgeadapt.device.fewshot) on synthetic embeddings."""

from __future__ import annotations

import numpy as np
import pytest

from edgeadapt.device.errors import InputError
from edgeadapt.device.head import ClassStats, Head
from edgeadapt.device.incremental import DEFAULT_METHOD, AddClassOptions, add_classes, add_examples, choose_method
from edgeadapt.device.prototype_column import prototype_column

SIZE = 24


def clusters(count: int, per_class: int, seed: int = 0, spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian classes with a shared, anisotropic covariance (so whitening matters)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3.0, (count, SIZE))
    scales = np.linspace(0.3, 2.5, SIZE) * spread
    embeddings = np.concatenate([centre + rng.normal(0, 1, (per_class, SIZE)) * scales for centre in centres])
    labels = np.repeat(np.arange(count), per_class)
    return embeddings.astype(np.float32), labels


def base_head(embeddings: np.ndarray, labels: np.ndarray, classes: int) -> tuple[Head, ClassStats]:
    """A linear head from class means (what a trained head looks like), with its statistics."""
    stats = ClassStats.from_embeddings(embeddings, labels, classes, with_gram=True)
    mean = embeddings.mean(axis=0)
    means = stats.means() - mean
    weights = means.T.astype(np.float32)
    bias = (-0.5 * np.sum(means * means, axis=1)).astype(np.float32)
    return Head(weights=weights, bias=bias, feature_mean=mean.astype(np.float32)), stats


@pytest.fixture(scope="module")
def world():
    embeddings, labels = clusters(8, 200)
    old = labels < 5
    head, stats = base_head(embeddings[old], labels[old], 5)
    return embeddings, labels, head, stats


def shots_of(embeddings, labels, classes, k, seed=1):
    rng = np.random.default_rng(seed)
    return [embeddings[rng.choice(np.flatnonzero(labels == c), k, replace=False)] for c in classes]


def test_claim_is_the_default_with_and_without_statistics(world):
    _, _, _, stats = world
    assert DEFAULT_METHOD == "claim"
    assert choose_method(stats, False, None) == "claim" and choose_method(None, True, None) == "claim"


def test_new_classes_are_learned_and_old_columns_stay_identical(world):
    embeddings, labels, head, stats = world
    shots = shots_of(embeddings, labels, [5, 6, 7], 5)
    new_head, new_stats = add_classes(head, stats, shots)
    assert np.array_equal(new_head.weights[:, :5], head.weights) and np.array_equal(new_head.bias[:5], head.bias)
    assert new_stats.num_classes == 8
    predictions = new_head.logits(embeddings).argmax(axis=1)
    recall = np.mean([np.mean(predictions[labels == c] == c) for c in (5, 6, 7)])
    old = np.mean([np.mean(predictions[labels == c] == c) for c in range(5)])
    before = np.mean([np.mean(head.logits(embeddings).argmax(axis=1)[labels == c] == c) for c in range(5)])
    assert recall >= 0.8, recall
    assert old >= before - 0.08, (old, before)  # three classes, each claiming at most 2%


def test_order_of_classes_in_one_call_does_not_matter(world):
    embeddings, labels, head, stats = world
    shots = shots_of(embeddings, labels, [5, 6, 7], 3)
    forward, _ = add_classes(head, stats, shots)
    backward, _ = add_classes(head, stats, shots[::-1])
    assert np.array_equal(forward.weights[:, 5:], backward.weights[:, 5:][:, ::-1])
    assert np.array_equal(forward.bias[5:], backward.bias[5:][::-1])


def test_the_claim_budget_bounds_what_a_class_takes_from_the_calibration_set(world):
    embeddings, labels, head, _ = world
    calibration = embeddings[labels < 5][::2]
    for budget in (0.01, 0.05):
        new_head, _ = add_classes(head, None, shots_of(embeddings, labels, [5], 5),
                                  AddClassOptions(claim_budget=budget), calibration=calibration)
        claimed = np.mean(new_head.logits(calibration).argmax(axis=1) == 5)
        assert claimed <= budget + 2 / len(calibration), (budget, claimed)  # float32 logits at the boundary
    # the knob works in the expected direction on held-out new-class photos
    recalls = []
    for budget in (0.005, 0.2):
        new_head, _ = add_classes(head, None, shots_of(embeddings, labels, [5], 5),
                                  AddClassOptions(claim_budget=budget), calibration=calibration)
        recalls.append(np.mean(new_head.logits(embeddings[labels == 5]).argmax(axis=1) == 5))
    assert recalls[0] <= recalls[1]


def test_a_class_learned_from_one_photo_recognises_that_photo(world):
    embeddings, labels, head, stats = world
    for seed in range(5):
        shot = shots_of(embeddings, labels, [6], 1, seed=seed)
        for statistics in (stats, None):
            new_head, _ = add_classes(head, statistics, shot, AddClassOptions(claim_budget=0.001),
                                      calibration=embeddings[labels < 5])
            assert new_head.logits(shot[0]).argmax(axis=1)[0] == 5
    # also when the photo looks like an old class: the floor raises the bias until it wins there
    lookalike = embeddings[labels == 0][:1] * 0.98
    new_head, _ = add_classes(head, None, [lookalike], AddClassOptions(claim_budget=0.001),
                              calibration=embeddings[labels < 5])
    assert new_head.logits(lookalike).argmax(axis=1)[0] == 5


def test_without_statistics_the_column_is_the_c_librarys_prototype(world):
    embeddings, labels, head, _ = world
    shots = shots_of(embeddings, labels, [5], 4)
    background = embeddings[labels < 5][::5]
    new_head, _ = add_classes(head, None, shots, calibration=background)
    column, bias = prototype_column(head, shots[0], background, claim_budget=0.02)
    assert np.array_equal(new_head.weights[:, 5], column)
    assert abs(float(new_head.bias[5]) - bias) <= 1e-5 * max(1.0, abs(bias))


def test_with_statistics_the_direction_is_whitened(world):
    embeddings, labels, head, stats = world
    shots = shots_of(embeddings, labels, [5], 20)
    with_stats, _ = add_classes(head, stats, shots)
    without, _ = add_classes(head, None, shots, calibration=embeddings[labels < 5][::3])
    cosine = float(with_stats.weights[:, 5] @ without.weights[:, 5]
                   / np.linalg.norm(with_stats.weights[:, 5]) / np.linalg.norm(without.weights[:, 5]))
    assert cosine < 0.99  # a different (whitened) direction, not the prototype
    test = embeddings[labels >= 5]
    test_labels = labels[labels >= 5]
    recall_with = np.mean(with_stats.logits(test).argmax(axis=1)[test_labels == 5] == 5)
    assert recall_with >= 0.8


def test_zero_class_head_learns_its_first_classes():
    embeddings, labels = clusters(3, 30, seed=5)
    empty = Head(weights=np.zeros((SIZE, 0), np.float32), bias=np.zeros(0, np.float32))
    head, _ = add_classes(empty, None, shots_of(embeddings, labels, [0], 2))
    assert head.num_classes == 1 and head.bias[0] == 0.0
    head, _ = add_classes(head, None, shots_of(embeddings, labels, [1, 2], 2))
    predictions = head.logits(embeddings).argmax(axis=1)
    assert np.mean(predictions == labels) >= 0.9


def test_strengthening_recomputes_only_that_class(world):
    embeddings, labels, head, stats = world
    grown, grown_stats = add_classes(head, stats, shots_of(embeddings, labels, [5], 2))
    for statistics in (grown_stats, None):
        more = shots_of(embeddings, labels, [5], 10, seed=9)[0]
        strengthened, _ = add_examples(grown, statistics, 5, more, calibration=embeddings[labels < 5][::4])
        assert np.array_equal(strengthened.weights[:, :5], grown.weights[:, :5])
        assert not np.array_equal(strengthened.weights[:, 5], grown.weights[:, 5])
        recall = np.mean(strengthened.logits(embeddings[labels == 5]).argmax(axis=1) == 5)
        assert recall >= 0.6, recall


def test_the_same_inputs_give_the_same_columns(world):
    embeddings, labels, head, stats = world
    shots = shots_of(embeddings, labels, [7], 5)
    first, _ = add_classes(head, stats, shots)
    second, _ = add_classes(head, stats, shots)
    assert np.array_equal(first.weights, second.weights) and np.array_equal(first.bias, second.bias)


@pytest.mark.parametrize("budget", [0.0, 1.0, -0.1, float("nan")])
def test_claim_budget_outside_the_open_unit_interval_is_refused(budget):
    with pytest.raises(InputError, match="claim_budget"):
        AddClassOptions(claim_budget=budget)


def test_non_finite_calibration_is_refused(world):
    embeddings, labels, head, stats = world
    calibration = embeddings[:10].copy()
    calibration[3, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        add_classes(head, stats, shots_of(embeddings, labels, [5], 3), calibration=calibration)


def test_joining_the_calibration_blocks_of_many_updates_changes_no_column(world, monkeypatch):
    """The calibration cache extends its blocks update after update and joins the small ones past
    MAX_CALIBRATION_BLOCKS; the heads must be what never joining them gives."""
    from edgeadapt.device import fewshot

    def twelve_updates() -> Head:
        fewshot.clear_cache()
        embeddings, labels, head, stats = world
        rng = np.random.default_rng(3)
        calibration = embeddings[labels < 5][::4]
        for step in range(12):  # as the updater does: each new class's examples join the calibration set
            shots = [embeddings[labels == 5 + step % 3][rng.choice(200, 4, replace=False)] + np.float32(0.01 * step)]
            head, stats = add_classes(head, stats, shots, calibration=calibration)
            calibration = np.concatenate([calibration, shots[0]])
        return head

    assert fewshot.MAX_CALIBRATION_BLOCKS < 12
    joined = twelve_updates()
    monkeypatch.setattr(fewshot, "MAX_CALIBRATION_BLOCKS", 1000)
    separate = twelve_updates()
    np.testing.assert_allclose(joined.weights, separate.weights, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(joined.bias, separate.bias, rtol=1e-6, atol=1e-6)
