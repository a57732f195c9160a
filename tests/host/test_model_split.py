"""Backbone/head split, head training on cached embeddings, embedding cache."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from edgeadapt import IncompatibleModelError, InputError, InputSpec, compute_embeddings  # noqa: E402
from edgeadapt.data.embeddings import EmbeddingCache  # noqa: E402
from edgeadapt.training.head_training import HeadTrainingOptions, train_head  # noqa: E402
from edgeadapt import split_classifier  # noqa: E402
from edgeadapt.training.model_split import backbone_fingerprint  # noqa: E402


def small_classifier(activation="softmax", flatten=False):
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.Flatten()(x) if flatten else keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dense(12, activation="relu", name="features")(x)
    outputs = keras.layers.Dense(4, activation=activation, name="classifier")(x)
    return keras.Model(inputs, outputs)


def test_split_copies_final_dense_and_reproduces_outputs():
    model = small_classifier()
    split = split_classifier(model)
    kernel, bias = model.get_layer("classifier").get_weights()
    assert np.array_equal(split.head.weights, kernel) and np.array_equal(split.head.bias, bias)
    assert split.embedding_size == 12 and split.embedding_layer == "features"
    images = np.random.default_rng(0).normal(size=(5, 16, 16, 3)).astype(np.float32)
    embeddings = split.backbone(images).numpy()
    np.testing.assert_allclose(split.head.probabilities(embeddings), model(images).numpy(), rtol=1e-4, atol=1e-6)


def test_split_at_named_layer_without_linear_head():
    split = split_classifier(small_classifier(), embedding_layer="pool")
    assert split.head is None and split.embedding_size == 8


def test_split_keras_file_round_trip(tmp_path):
    model = small_classifier()
    path = tmp_path / "model.keras"
    model.save(path)
    split = split_classifier(path)
    assert np.array_equal(split.head.weights, model.get_layer("classifier").get_weights()[0])


@pytest.mark.parametrize("problem", ["activation", "no_dense", "unknown_layer", "not_keras", "missing"])
def test_split_errors(problem, tmp_path):
    with pytest.raises(IncompatibleModelError) as error:
        if problem == "activation":
            split_classifier(small_classifier(activation="relu"))
        elif problem == "no_dense":
            inputs = keras.Input((8, 8, 3))
            split_classifier(keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs)))
        elif problem == "unknown_layer":
            split_classifier(small_classifier(), embedding_layer="nope")
        elif problem == "not_keras":
            bogus = tmp_path / "model.tflite"
            bogus.write_bytes(b"TFL3")
            split_classifier(bogus)
        else:
            split_classifier(tmp_path / "absent.keras")
    assert str(error.value)


def test_fingerprint_changes_with_weights():
    split = split_classifier(small_classifier())
    first = backbone_fingerprint(split.backbone)
    assert first == backbone_fingerprint(split.backbone) and first.startswith("sha256:")
    layer = split.backbone.get_layer("conv")
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel + 0.01, bias])
    assert backbone_fingerprint(split.backbone) != first


def separable_embeddings(seed=0, per_class=60, classes=4, size=16):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=3.0, size=(classes, size))
    labels = np.repeat(np.arange(classes), per_class)
    return (centers[labels] + rng.normal(size=(len(labels), size))).astype(np.float32), labels


def test_train_head_on_embeddings_reaches_accuracy():
    train, train_labels = separable_embeddings(0)
    test, test_labels = separable_embeddings(0)  # same centres, new noise draw below
    test = test + np.random.default_rng(1).normal(scale=0.5, size=test.shape).astype(np.float32)
    head = train_head(train, train_labels, 4, HeadTrainingOptions(epochs=40), validation=(test, test_labels))
    assert head.weights.shape == (16, 4)
    assert np.mean(head.logits(test).argmax(1) == test_labels) >= 0.95


def test_train_head_rejects_bad_embeddings():
    embeddings, labels = separable_embeddings()
    with pytest.raises(InputError, match="NaN"):
        bad = embeddings.copy()
        bad[0, 0] = np.nan
        train_head(bad, labels, 4)
    with pytest.raises(InputError, match="do not match"):
        train_head(embeddings, labels[:-1], 4)


def test_embedding_cache_runs_backbone_once(tmp_path):
    split = split_classifier(small_classifier())
    spec = InputSpec(16, 16)
    images = np.random.default_rng(0).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    fingerprint = backbone_fingerprint(split.backbone)
    cache = EmbeddingCache(tmp_path)
    first = cache.embeddings(split.backbone, fingerprint, images, spec)
    np.testing.assert_allclose(first, compute_embeddings(split.backbone, images, spec), rtol=1e-5)
    assert len(list(tmp_path.glob("*.npy"))) == 1
    # A cache hit never touches the backbone: passing None proves it.
    second = cache.embeddings(None, fingerprint, images, spec)
    assert np.array_equal(first, second)
    other = cache.embeddings(split.backbone, fingerprint, images[:5], spec)
    assert other.shape == (5, 12) and len(list(tmp_path.glob("*.npy"))) == 2
