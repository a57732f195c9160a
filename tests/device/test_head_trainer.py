"""The one head trainer (device/head_trainer.py): what the device and the host both rely on."""

from __future__ import annotations

import numpy as np
import pytest

from edgeadapt.device.add_options import AddClassOptions
from edgeadapt.device.errors import InputError
from edgeadapt.device.head_trainer import HeadFitSettings, cross_entropy, fit_softmax_head
from edgeadapt.device.incremental import train_columns

DIMENSION, CLASSES = 12, 4


def separable(per_class: int = 40, seed: int = 0, spread: float = 0.6):
    """Gaussian classes with means far apart: a linear head can classify them almost perfectly."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(100).normal(0.0, 2.0, size=(CLASSES, DIMENSION))
    labels = np.repeat(np.arange(CLASSES), per_class)
    features = means[labels] + spread * rng.normal(size=(labels.size, DIMENSION))
    order = rng.permutation(labels.size)
    return features[order], labels[order]


def start(seed: int = 1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(DIMENSION, CLASSES)), rng.normal(size=CLASSES)


def accuracy(weights, bias, features, labels) -> float:
    return float(np.mean((features @ weights + bias).argmax(axis=1) == labels))


# ----------------------------------------------------------------------------- behaviour
def test_frozen_columns_stay_bit_identical_and_trained_ones_move():
    features, labels = separable()
    weights, bias = start()
    for dtype in ("float64", "float32"):
        settings = HeadFitSettings(
            columns=(1, 3),
            epochs=30,
            learning_rate=0.05,
            decay=1e-3,
            class_balanced=True,
            dtype=dtype,
            batch_size=16 if dtype == "float32" else None,
        )
        trained_w, trained_b = fit_softmax_head(features, labels, weights, bias, settings)
        assert trained_w.dtype == trained_b.dtype == np.dtype(dtype)
        expected_w, expected_b = weights.astype(dtype), bias.astype(dtype)
        assert np.array_equal(trained_w[:, [0, 2]], expected_w[:, [0, 2]])
        assert np.array_equal(trained_b[[0, 2]], expected_b[[0, 2]])
        assert not np.allclose(trained_w[:, [1, 3]], expected_w[:, [1, 3]])
        assert not np.allclose(trained_b[[1, 3]], expected_b[[1, 3]])


def test_inputs_are_not_modified():
    features, labels = separable()
    weights, bias = start()
    copies = features.copy(), labels.copy(), weights.copy(), bias.copy()
    fit_softmax_head(features, labels, weights, bias, HeadFitSettings(epochs=5, learning_rate=0.1))
    for before, after in zip(copies, (features, labels, weights, bias)):
        assert np.array_equal(before, after)


def test_full_batch_is_deterministic():
    features, labels = separable()
    weights, bias = start()
    settings = HeadFitSettings(epochs=50, learning_rate=0.05, class_balanced=True, seed=0)
    first = fit_softmax_head(features, labels, weights, bias, settings)
    # The seed only shuffles mini-batches: without them it changes nothing.
    second = fit_softmax_head(features, labels, weights, bias, HeadFitSettings(**{**settings.__dict__, "seed": 9}))
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])


def test_mini_batches_follow_the_seed():
    features, labels = separable()
    weights, bias = start()

    def fit(seed: int):
        settings = HeadFitSettings(epochs=5, batch_size=16, learning_rate=0.01, dtype="float32", seed=seed)
        return fit_softmax_head(features, labels, weights, bias, settings)

    same, again, other = fit(3), fit(3), fit(4)
    assert np.array_equal(same[0], again[0]) and np.array_equal(same[1], again[1])
    assert not np.array_equal(same[0], other[0])


@pytest.mark.parametrize("batch_size, dtype", [(None, "float64"), (16, "float32")])
def test_learns_a_separable_problem(batch_size, dtype):
    features, labels = separable()
    test, test_labels = separable(seed=5)
    zeros_w, zeros_b = np.zeros((DIMENSION, CLASSES)), np.zeros(CLASSES)
    settings = HeadFitSettings(
        epochs=200 if batch_size is None else 30, batch_size=batch_size, learning_rate=0.05, decay=1e-4, dtype=dtype
    )
    weights, bias = fit_softmax_head(features, labels, zeros_w, zeros_b, settings)
    assert accuracy(weights, bias, test, test_labels) >= 0.95
    assert cross_entropy(weights, bias, test, test_labels) < cross_entropy(zeros_w, zeros_b, test, test_labels) / 4


def test_temperature_divides_the_logits():
    features, labels = separable()
    weights, bias = start()
    assert cross_entropy(weights, bias, features, labels, temperature=2.0) == pytest.approx(
        cross_entropy(weights / 2.0, bias / 2.0, features, labels)
    )


def test_early_stopping_restores_the_best_weights():
    # Few noisy training examples and a high learning rate: the validation loss rises after a while.
    features, labels = separable(per_class=4, spread=2.5, seed=1)
    validation = separable(per_class=50, spread=2.5, seed=2)
    weights, bias = np.zeros((DIMENSION, CLASSES)), np.zeros(CLASSES)
    losses: list[float] = []
    settings = HeadFitSettings(epochs=400, learning_rate=0.05, patience=5)
    trained_w, trained_b = fit_softmax_head(
        features, labels, weights, bias, settings, validation, on_epoch=lambda epoch, loss: losses.append(loss)
    )
    assert 5 < len(losses) < 400  # stopped early
    assert min(losses[-5:]) >= min(losses[:-5]) - 1e-6  # the last `patience` epochs did not improve
    returned = cross_entropy(trained_w, trained_b, *validation)
    assert returned <= losses[-1]
    assert returned == pytest.approx(min(losses))

    # Without restore_best the last epoch's weights come back.
    last_w, last_b = fit_softmax_head(
        features, labels, weights, bias, HeadFitSettings(**{**settings.__dict__, "restore_best": False}), validation
    )
    assert cross_entropy(last_w, last_b, *validation) == pytest.approx(losses[-1])


def test_on_epoch_sees_every_epoch_without_validation():
    features, labels = separable()
    weights, bias = start()
    seen = []
    fit_softmax_head(
        features, labels, weights, bias, HeadFitSettings(epochs=7), on_epoch=lambda *call: seen.append(call)
    )
    assert seen == [(epoch, None) for epoch in range(1, 8)]


def test_class_balance_weighs_every_class_equally():
    # 3 examples of class 0, 60 of class 1 at the same point: balanced, the two columns tie.
    # (A large epsilon keeps Adam from blowing the rounding noise of a zero gradient up to full steps.)
    features = np.ones((63, 2))
    labels = np.array([0] * 3 + [1] * 60)
    zeros_w, zeros_b = np.zeros((2, 2)), np.zeros(2)
    settings = HeadFitSettings(epochs=20, learning_rate=0.01, epsilon=1e-3)
    balanced = fit_softmax_head(
        features, labels, zeros_w, zeros_b, HeadFitSettings(**{**settings.__dict__, "class_balanced": True})
    )
    plain = fit_softmax_head(features, labels, zeros_w, zeros_b, settings)
    assert abs(balanced[1][0] - balanced[1][1]) < 1e-9
    assert plain[1][1] > plain[1][0] + 0.1


def test_train_columns_is_the_device_setting():
    features, labels = separable()
    weights, bias = start()
    options = AddClassOptions(training_steps=40, learning_rate=0.05, weight_decay=1e-3)
    through_wrapper = train_columns(features, labels, weights, bias, np.array([0, 2]), 0.5, options)
    settings = HeadFitSettings(
        columns=(0, 2),
        epochs=40,
        learning_rate=0.05,
        decay=1e-3,
        temperature=0.5,
        class_balanced=True,
        epsilon=1e-8,
        epsilon_corrected=True,
        dtype="float64",
    )
    direct = fit_softmax_head(features, labels, weights, bias, settings)
    assert np.array_equal(through_wrapper[0], direct[0]) and np.array_equal(through_wrapper[1], direct[1])
    assert np.array_equal(through_wrapper[0][:, [1, 3]], weights[:, [1, 3]])


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("epochs", 0, "epochs must be a whole number of at least 1"),
        ("epochs", 2.5, "epochs must be a whole number"),
        ("batch_size", 0, "batch_size must be a whole number of at least 1"),
        ("patience", 0, "patience must be a whole number of at least 1"),
        ("learning_rate", 0.0, "learning_rate must be a finite positive number"),
        ("learning_rate", float("nan"), "learning_rate must be a finite positive number"),
        ("temperature", -1.0, "temperature must be a finite positive number"),
        ("epsilon", 0.0, "epsilon must be a finite positive number"),
        ("decay", -1e-4, "decay must be a finite non-negative number"),
        ("dtype", "float16", "dtype must be one of"),
        ("columns", (), "columns must be a non-empty 1-d sequence"),
        ("columns", (0.5,), "columns must be a non-empty 1-d sequence"),
        ("columns", (1, 1), "columns lists a column more than once"),
        ("columns", (-1,), "columns must be non-negative"),
    ],
)
def test_bad_settings_raise_input_error(field, value, message):
    with pytest.raises(InputError, match=message):
        HeadFitSettings(**{field: value})


def test_columns_become_a_tuple():
    assert HeadFitSettings(columns=np.array([2, 0])).columns == (2, 0)


def _bad_inputs():
    features, labels = separable(per_class=3)
    weights, bias = start()
    return [
        ((features[:, :, None], labels, weights, bias), "training features .* and labels .* do not match"),
        ((features, labels[:-1], weights, bias), "do not match"),
        ((features[:0], labels[:0], weights, bias), "no training features"),
        ((np.where(features > 1, np.nan, features), labels, weights, bias), "NaN or infinite"),
        ((features, labels.astype(float), weights, bias), "labels must be integer class indices"),
        ((features, labels + 1, weights, bias), r"training labels must lie in 0\.\.3"),
        ((features, labels - 1, weights, bias), r"training labels must lie in 0\.\.3"),
        ((features, labels, weights[:-1], bias), "do not fit 12-d features"),
        ((features, labels, weights, bias[:-1]), "do not fit 12-d features"),
        ((features, labels, weights[:, :0], bias[:0]), "the head has no columns"),
        ((features, labels, weights * np.inf, bias), "starting weights or bias contain NaN"),
    ]


@pytest.mark.parametrize("index", range(11))
def test_bad_arrays_raise_input_error(index):
    arguments, message = _bad_inputs()[index]
    with pytest.raises(InputError, match=message):
        fit_softmax_head(*arguments, HeadFitSettings(epochs=1))


def test_bad_columns_and_validation_raise_input_error():
    features, labels = separable(per_class=3)
    weights, bias = start()
    with pytest.raises(InputError, match=r"columns must lie in 0\.\.3 \(the head has 4 columns\), got 4"):
        fit_softmax_head(features, labels, weights, bias, HeadFitSettings(columns=(0, 4)))
    with pytest.raises(InputError, match="validation features have 11 dimensions"):
        fit_softmax_head(features, labels, weights, bias, HeadFitSettings(epochs=1), (features[:, 1:], labels))
    with pytest.raises(InputError, match=r"validation labels must lie in 0\.\.3"):
        fit_softmax_head(features, labels, weights, bias, HeadFitSettings(epochs=1), (features, labels + 4))
    with pytest.raises(InputError, match="columns"):  # the device wrapper checks through the same settings
        train_columns(features, labels, weights, bias, np.array([], dtype=np.int64), 1.0, AddClassOptions())
