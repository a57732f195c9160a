"""fine_tune: the three strategies, frozen BatchNorm, two learning rates, early stopping, scale-out, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import keras  # noqa: E402

from edgeadapt.training.backbones import BackboneOptions, block_names  # noqa: E402
from edgeadapt import IncompatibleModelError, InputError, SplitOptions  # noqa: E402
from edgeadapt.training.finetune import FineTuneOptions, fine_tune  # noqa: E402
from edgeadapt.training.finetune_keras import backbone_blocks, early_stopping, scaled_adam  # noqa: E402
from edgeadapt import ClassifierTrainingOptions, SyntheticOptions, synthetic_dataset, train_classifier  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = BackboneOptions(stem_filters=8, blocks=(("conv", 8, 1), ("conv", 16, 2), ("separable", 32, 2)))
QUICK = dict(head_epochs=6, epochs=2, batch_size=32, verbose=0)


@pytest.fixture(scope="module")
def dataset():
    return synthetic_dataset(SyntheticOptions(num_classes=4, images_per_class=30, image_size=16, seed=1),
                             SplitOptions(seed=1))


@pytest.fixture(scope="module")
def base(dataset):
    """A small classifier 'pretrained' on the first two classes."""
    two = dataset.select_classes(dataset.class_names[:2])
    return train_classifier(two, ClassifierTrainingOptions(epochs=2, seed=0, verbose=0, backbone=TINY))


def _layer_weights(model, name):
    return [np.array(w) for w in model.get_layer(name).get_weights()]


def _batch_norm_names(model):
    return [layer.name for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


# ----------------------------------------------------------------------------- options
def test_options_parse_and_validate():
    options = FineTuneOptions.from_string("top_layers:3", head_learning_rate=2e-3)
    assert (options.strategy, options.unfreeze_blocks, options.label) == ("top_layers", 3, "top_layers:3")
    assert options.effective_backbone_learning_rate == pytest.approx(2e-4)  # 10x below the head's
    assert options.batch_norm_inference and not FineTuneOptions.full().batch_norm_inference
    assert FineTuneOptions.top_layers(2) == FineTuneOptions(strategy="top_layers", unfreeze_blocks=2)
    for bad in ("partial", "top_layers:x", "full:2", "top_layers:0"):
        with pytest.raises(InputError):
            FineTuneOptions.from_string(bad)
    with pytest.raises(InputError):
        FineTuneOptions(batch_norm="frozen")


def test_blocks_of_the_built_in_backbone(base):
    assert block_names(base) == ["stem", "block1", "block2", "block3"]
    blocks = backbone_blocks(base)
    assert blocks[-1][0] == "block3_depthwise" and "block3_pointwise_bn" in blocks[-1]
    generic = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, name="a"),
                                keras.layers.BatchNormalization(name="a_bn"), keras.layers.ReLU(name="a_relu"),
                                keras.layers.Conv2D(4, 3, name="b"), keras.layers.GlobalAveragePooling2D(name="gap")])
    assert backbone_blocks(generic) == [["a", "a_bn", "a_relu"], ["b", "gap"]]


# ----------------------------------------------------------------------------- strategies
@pytest.mark.slow
def test_head_only_keeps_the_backbone_and_its_fingerprint(base, dataset):
    before = [np.array(w) for w in base.get_weights()]
    result = fine_tune(base, dataset, FineTuneOptions.head_only(**QUICK))
    assert not result.backbone_changed and result.backbone_fingerprint == result.previous_backbone_fingerprint
    assert result.head.weights.shape == (32, 4) and result.class_names == dataset.class_names
    assert result.class_stats.num_classes == 4 and result.class_stats.counts.sum() == len(dataset.train)
    scores = np.asarray(result.model(dataset.test.images[:3].astype(np.float32) / 127.5 - 1.0))
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-5)
    assert 0.0 <= result.evaluate(dataset.test.images, dataset.test.labels) <= 1.0
    assert all(np.array_equal(a, b) for a, b in zip(before, base.get_weights()))  # input model untouched
    again = fine_tune(base, dataset, FineTuneOptions.head_only(**QUICK))  # the seed makes it reproducible
    np.testing.assert_array_equal(again.head.weights, result.head.weights)


@pytest.mark.slow
def test_top_layers_trains_only_the_top_blocks_with_batchnorm_frozen(base, dataset):
    before = [np.array(w) for w in base.get_weights()]
    result = fine_tune(base, dataset, FineTuneOptions.top_layers(1, head_learning_rate=5e-3, **QUICK))
    assert result.trainable_layers == ["block3_depthwise", "block3_pointwise"]
    assert result.backbone_changed and result.history["backbone"]["loss"]
    tuned = result.backbone
    for name in ("stem_conv", "block1_conv", "block2_conv"):  # frozen blocks: bit-identical
        for a, b in zip(_layer_weights(base, name), _layer_weights(tuned, name)):
            assert np.array_equal(a, b)
    assert not np.array_equal(_layer_weights(base, "block3_pointwise")[0], _layer_weights(tuned, "block3_pointwise")[0])
    for name in _batch_norm_names(base):  # BatchNorm in inference mode: statistics and scale/offset kept
        for a, b in zip(_layer_weights(base, name), _layer_weights(tuned, name)):
            assert np.array_equal(a, b), name
    # class statistics describe the new backbone's embeddings
    embeddings = result.embeddings(dataset.train.images)
    means = np.stack([embeddings[dataset.train.labels == c].mean(axis=0) for c in range(4)])
    np.testing.assert_allclose(result.class_stats.means(), means, rtol=1e-4, atol=1e-5)
    assert all(np.array_equal(a, b) for a, b in zip(before, base.get_weights()))


def _without_validation(dataset):
    import dataclasses

    from edgeadapt.data.image_folders import ImageSet

    return dataclasses.replace(dataset, validation=ImageSet(dataset.train.images[:0], dataset.train.labels[:0]))


@pytest.mark.slow
def test_full_unfreezes_everything_and_batchnorm_learns(base, dataset):
    # no validation data: no early stopping, so the last epoch's weights are kept
    result = fine_tune(base, _without_validation(dataset),
                       FineTuneOptions.full(head_learning_rate=5e-3, validation_fraction=0.0, **QUICK))
    assert "stem_conv" in result.trainable_layers and "stem_conv_bn" in result.trainable_layers
    assert result.backbone_changed
    moving_mean_before = _layer_weights(base, "stem_conv_bn")[2]
    assert not np.array_equal(moving_mean_before, _layer_weights(result.backbone, "stem_conv_bn")[2])


def test_backbone_learns_ten_times_slower_than_the_head():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    slow_layer, fast_layer = keras.layers.Dense(4, name="slow"), keras.layers.Dense(2, name="fast")
    model = keras.Model(inputs, fast_layer(slow_layer(inputs)))
    before = [np.array(w) for w in model.get_weights()]
    optimizer = scaled_adam(1e-2, {id(v) for v in slow_layer.trainable_variables}, 0.1)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(np.random.default_rng(0).normal(size=(8, 4)), np.ones((8, 2)), batch_size=8, epochs=1, verbose=0)
    steps = [np.abs(np.array(a) - b).max() for a, b in zip(model.get_weights(), before)]
    # Adam's first step moves every weight by about the learning rate
    assert steps[0] == pytest.approx(1e-3, rel=0.05) and steps[2] == pytest.approx(1e-2, rel=0.05)


def test_early_stopping_restores_the_starting_weights_when_training_only_hurts():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(5.0), loss="mse")
    x = np.random.default_rng(1).normal(size=(32, 3)).astype(np.float32)
    y = x @ np.array([[1.0], [2.0], [-1.0]], np.float32)
    model.layers[0].set_weights([np.array([[1.0], [2.0], [-1.0]], np.float32), np.zeros(1, np.float32)])
    start = [np.array(w) for w in model.get_weights()]
    initial = model.evaluate(x, y, verbose=0)
    noisy = y + np.random.default_rng(2).normal(0, 5.0, size=y.shape).astype(np.float32)
    model.fit(x, noisy, validation_data=(x, y), epochs=3, verbose=0, callbacks=[early_stopping(1, initial)])
    assert all(np.array_equal(a, b) for a, b in zip(start, model.get_weights()))


@pytest.mark.slow  # fine-tunes a model
def test_validation_is_carved_out_when_the_dataset_has_none(dataset, base, caplog):
    with caplog.at_level("INFO", logger="edgeadapt.training.finetune"):
        result = fine_tune(base, _without_validation(dataset), FineTuneOptions.head_only(**QUICK))
    assert "holding out" in caplog.text
    assert result.class_stats.counts.sum() < len(dataset.train)


@pytest.mark.slow
def test_mirrored_strategy_and_time_budget(base, dataset):
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    options = FineTuneOptions.top_layers(2, **{**QUICK, "epochs": 50}, max_seconds=2.0)
    result = fine_tune(base, dataset, options, distribution_strategy=strategy)
    assert len(result.history["backbone"]["loss"]) < 50  # the time budget stopped it
    assert result.backbone_changed
    # the returned backbone holds plain variables: usable and exportable outside the strategy
    assert result.backbone(np.zeros((1, 16, 16, 3), np.float32)).shape == (1, 32)


def test_bad_input(base, dataset, tmp_path):
    from edgeadapt import adapt_input

    with pytest.raises(InputError, match="blocks"):
        fine_tune(base, dataset, FineTuneOptions.top_layers(9, **QUICK))
    bigger = adapt_input(base, height=24, width=24)
    with pytest.raises(IncompatibleModelError, match="adapt"):
        fine_tune(bigger, dataset, FineTuneOptions.head_only(**QUICK))
    text = tmp_path / "model.txt"
    text.write_text("no")
    with pytest.raises(IncompatibleModelError):
        fine_tune(text, dataset, FineTuneOptions.head_only(**QUICK))


@pytest.mark.slow
def test_cli_train_writes_a_bundle_with_the_new_fingerprint(base, dataset, tmp_path, capsys, caplog):
    pytest.importorskip("ai_edge_litert")
    from edgeadapt.cli import main
    from edgeadapt.data.image_folders import write_image_folder
    from edgeadapt import Bundle

    model_path = tmp_path / "base.keras"
    base.save(model_path)
    images = np.concatenate([dataset.train.images, dataset.validation.images, dataset.test.images])
    labels = np.concatenate([dataset.train.labels, dataset.validation.labels, dataset.test.labels])
    folder = write_image_folder(tmp_path / "data", dataset.class_names, images, labels)
    output = tmp_path / "tuned.eab"
    code = main(["train", "--data", str(folder), "--model", str(model_path), "--strategy", "top_layers:1",
                 "--epochs", "1", "--head-epochs", "4", "--out", str(output), "--formats", "tflite",
                 "--keras-verbose", "0", "--json-out", str(tmp_path / "report.json"), "--save-model",
                 str(tmp_path / "tuned.keras"), "--ridge-solver-state"])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    bundle = Bundle.open(output)
    assert bundle.manifest.backbone_fingerprint == report["backbone_fingerprint"]
    assert report["backbone_changed"] and report["strategy"] == "top_layers:1"
    assert bundle.manifest.class_names == sorted(dataset.class_names)  # folder order
    assert "not compatible" in capsys.readouterr().out
    assert (tmp_path / "tuned.keras").is_file()
    # --ridge-solver-state reached the exporter: the state is stored, or (a head trained for a few epochs may not
    # agree with its statistics) the exporter said why not
    assert bundle.load_class_stats().ridge_basis is not None or "no ridge solver state written" in caplog.text


@pytest.mark.slow
def test_multiworker_example_runs_two_processes(tmp_path):
    """examples/multiworker_two_process.py: two MultiWorkerMirroredStrategy workers on 127.0.0.1."""
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    completed = subprocess.run(
        [sys.executable, str(REPO / "examples" / "multiworker_two_process.py"), "--out", str(tmp_path),
         "--timeout", "100"],
        capture_output=True, text=True, timeout=120, env=environment)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    report = json.loads((tmp_path / "result.json").read_text())
    assert report["replicas"] == 2 and 0.0 <= report["test_accuracy"] <= 1.0  # launch() checked the fingerprints
    assert (tmp_path / "finetuned.keras").is_file()
