"""adapt_input: new input size / channel count with the old weights, exact where promised, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import keras  # noqa: E402

from edgeadapt.training.backbones import BackboneOptions, build_classifier  # noqa: E402
from edgeadapt import EdgeAdaptError, IncompatibleModelError, InputError, InputSpec  # noqa: E402
from edgeadapt.training.input_adaptation import (  # noqa: E402
    LUMA_WEIGHTS,
    adapt_input,
    adapt_input_with_report,
    input_spec_for_model,
    minimum_input_size,
)

TINY = BackboneOptions(stem_filters=8, blocks=(("conv", 8, 2), ("separable", 16, 2)), dropout=0.0)


def _randomise_batch_norm(model, seed: int = 3) -> None:
    """Non-trivial BatchNorm statistics, so that inference-mode BN is really exercised."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            size = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.3, size).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size).astype(np.float32))
            layer.beta.assign(rng.normal(0, 0.2, size).astype(np.float32))


def _classifier(shape, seed: int = 0):
    keras.utils.set_random_seed(seed)
    model = build_classifier(shape, 3, TINY)
    _randomise_batch_norm(model)
    return model


@pytest.fixture(scope="module")
def gray_model():
    return _classifier((32, 32, 1))


@pytest.fixture(scope="module")
def rgb_model():
    return _classifier((32, 32, 3), seed=1)


def _images(shape, count: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1.0, 1.0, size=(count, *shape)).astype(np.float32)


def _snapshot(model):
    return [np.array(weight) for weight in model.get_weights()], tuple(model.inputs[0].shape)


def _unchanged(model, snapshot) -> bool:
    weights, shape = snapshot
    return tuple(model.inputs[0].shape) == shape and all(
        np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))


def _flatten_model(shape=(16, 16, 3)):
    keras.utils.set_random_seed(5)
    return keras.Sequential([
        keras.Input(shape),
        keras.layers.Conv2D(4, 3, name="conv"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(3, name="logits"),
    ], name="flat_net")


# ----------------------------------------------------------------------------- behaviour
def test_resolution_change_reuses_every_weight_unchanged(rgb_model):
    before = _snapshot(rgb_model)
    adapted, report = adapt_input_with_report(rgb_model, height=48, width=40)
    assert tuple(adapted.inputs[0].shape) == (None, 48, 40, 3)
    assert adapted is not rgb_model
    old, new = rgb_model.get_weights(), adapted.get_weights()
    assert len(old) == len(new) and all(np.array_equal(a, b) for a, b in zip(old, new))
    assert not report.channel_adapted_layers and not report.reinitialised_layers
    assert adapted(_images((48, 40, 3))).shape == (3, 3)
    assert _unchanged(rgb_model, before)


@pytest.mark.parametrize("spread", ["equal", "luma"])
def test_gray_to_rgb_gives_the_same_output_on_replicated_gray(gray_model, spread):
    adapted, report = adapt_input_with_report(gray_model, channels=3, spread=spread)
    gray = _images((32, 32, 1))
    expected = np.asarray(gray_model(gray, training=False))
    actual = np.asarray(adapted(np.repeat(gray, 3, axis=3), training=False))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
    assert report.channel_adapted_layers == ["stem_conv"]
    old_kernel = gray_model.get_layer("stem_conv").get_weights()[0]
    new_kernel = adapted.get_layer("stem_conv").get_weights()[0]
    weights = np.full(3, 1 / 3) if spread == "equal" else np.asarray(LUMA_WEIGHTS)
    for channel in range(3):
        np.testing.assert_allclose(new_kernel[:, :, channel], old_kernel[:, :, 0] * weights[channel], rtol=1e-6)


def test_luma_spread_on_colour_equals_gray_model_on_luma_image(gray_model):
    adapted = adapt_input(gray_model, channels=3, spread="luma")
    pixels = np.random.default_rng(4).integers(0, 256, size=(2, 32, 32, 3)).astype(np.float32)
    spec = InputSpec(height=32, width=32)
    luma = (pixels @ np.asarray(LUMA_WEIGHTS, np.float32))[..., None]
    expected = np.asarray(gray_model(luma * spec.scale + spec.offset, training=False))
    actual = np.asarray(adapted(pixels * spec.scale + spec.offset, training=False))
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


def test_rgb_to_gray_sums_the_kernel_exactly_for_gray_images(rgb_model):
    adapted = adapt_input(rgb_model, channels=1)
    gray = _images((32, 32, 1), seed=2)
    expected = np.asarray(rgb_model(np.repeat(gray, 3, axis=3), training=False))
    np.testing.assert_allclose(np.asarray(adapted(gray, training=False)), expected, rtol=1e-5, atol=1e-6)


def test_size_and_channels_together(gray_model):
    adapted = adapt_input(gray_model, height=64, width=48, channels=3)
    assert tuple(adapted.inputs[0].shape) == (None, 64, 48, 3)
    # every layer after the first convolution keeps its weights bit for bit
    for layer in gray_model.layers:
        if layer.get_weights() and layer.name != "stem_conv":
            for a, b in zip(layer.get_weights(), adapted.get_layer(layer.name).get_weights()):
                assert np.array_equal(a, b)


def test_sequential_and_nested_models_are_adapted():
    keras.utils.set_random_seed(2)
    inner = keras.Sequential([keras.Input((20, 20, 3)), keras.layers.Conv2D(6, 3, name="conv"),
                              keras.layers.GlobalAveragePooling2D(name="pool")], name="features")
    inputs = keras.Input((20, 20, 3))
    model = keras.Model(inputs, keras.layers.Dense(2, name="logits")(inner(inputs)), name="outer")
    adapted = adapt_input(model, height=28, width=28, channels=1)
    gray = _images((20, 20, 1))
    reference = np.asarray(model(np.repeat(gray, 3, axis=3)))
    same_size = adapt_input(model, channels=1)
    np.testing.assert_allclose(np.asarray(same_size(gray)), reference, rtol=1e-5, atol=1e-6)
    assert adapted(_images((28, 28, 1))).shape == (3, 2)


def test_flatten_dense_names_the_layer_and_offers_the_fix():
    model = _flatten_model()
    before = _snapshot(model)
    with pytest.raises(IncompatibleModelError) as caught:
        adapt_input(model, height=24, width=24)
    message = str(caught.value)
    assert "'logits'" in message and "'flatten'" in message and "replace_flatten=True" in message
    assert _unchanged(model, before)
    # channels alone do not touch the Dense layer
    assert tuple(adapt_input(model, channels=1).inputs[0].shape) == (None, 16, 16, 1)


def test_replace_flatten_swaps_in_global_pooling_with_a_spatial_sum_kernel():
    model = _flatten_model()
    adapted, report = adapt_input_with_report(model, height=24, width=24, replace_flatten=True)
    assert report.replaced_flatten_layers == ["flatten"] and report.reinitialised_layers == ["logits"]
    assert type(adapted.get_layer("flatten")).__name__ == "GlobalAveragePooling2D"
    # exact for spatially uniform feature maps: a constant image through a 3x3 convolution
    same_size = adapt_input(model, replace_flatten=True)
    constant = np.full((2, 16, 16, 3), 0.25, np.float32) * np.array([1.0, -2.0, 0.5], np.float32)
    np.testing.assert_allclose(np.asarray(same_size(constant)), np.asarray(model(constant)), rtol=1e-4, atol=1e-5)
    assert adapted(_images((24, 24, 3))).shape == (3, 3)


def test_minimum_size_and_input_spec(rgb_model):
    assert minimum_input_size(rgb_model) == (4, 4)  # stride-1 stem below 64 px, then 2 x 2
    keras.utils.set_random_seed(0)
    assert minimum_input_size(build_classifier((64, 64, 3), 3, TINY)) == (8, 8)  # stride-2 stem
    spec = input_spec_for_model(adapt_input(rgb_model, height=40, width=48, channels=1),
                                InputSpec(height=32, width=32, scale=1 / 255, offset=0.0))
    assert (spec.height, spec.width, spec.channels, spec.color_order) == (40, 48, 1, "GRAY")
    assert spec.scale == pytest.approx(1 / 255) and spec.offset == 0.0


# ----------------------------------------------------------------------------- bad input
def test_channels_other_than_1_or_3_are_refused_naming_the_first_layer(rgb_model):
    before = _snapshot(rgb_model)
    for channels in (2, 4):
        with pytest.raises(InputError, match="stem_conv.*1 \\(grayscale\\) <-> 3 \\(RGB\\)"):
            adapt_input(rgb_model, channels=channels)
    assert _unchanged(rgb_model, before)


def test_size_below_the_minimum_says_the_minimum(rgb_model):
    before = _snapshot(rgb_model)
    with pytest.raises(InputError, match="minimum input size .*4x4"):
        adapt_input(rgb_model, height=3, width=32)
    assert _unchanged(rgb_model, before)


def test_model_without_convolution_is_refused():
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(2)], name="mlp")
    with pytest.raises(IncompatibleModelError, match="no convolution"):
        adapt_input(model, height=16, width=16)


def test_non_keras_files_are_refused(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    for path in (text, broken, tmp_path / "missing.keras"):
        with pytest.raises(IncompatibleModelError):
            adapt_input(path, height=32, width=32)


def test_model_file_round_trip_and_cli(tmp_path, rgb_model, capsys):
    from edgeadapt.cli import main

    source = tmp_path / "model.keras"
    rgb_model.save(source)
    before = source.read_bytes()
    output = tmp_path / "adapted.keras"
    assert main(["adapt-input", str(source), "--image-size", "48x40", "--channels", "1", "--out", str(output)]) == 0
    adapted = keras.models.load_model(output, compile=False)
    assert tuple(adapted.inputs[0].shape) == (None, 48, 40, 1)
    assert source.read_bytes() == before
    assert "stem_conv" in capsys.readouterr().out
    # errors are typed, printed on one line, exit status 1; the old --size spelling still works, with a warning
    assert main(["adapt-input", str(source), "--channels", "2", "--out", str(tmp_path / "x.keras")]) == 1
    assert main(["adapt-input", str(source), "--size", "2x2", "--out", str(tmp_path / "y.keras")]) == 1
    errors = capsys.readouterr().err
    assert "4x4" in errors and "--size is deprecated; use --image-size" in errors
    assert not (tmp_path / "x.keras").exists() and not (tmp_path / "y.keras").exists()


def test_errors_share_the_base_type(rgb_model):
    with pytest.raises(EdgeAdaptError):
        adapt_input(rgb_model, channels=5)


# ----------------------------------------------------------------------------- device side
@pytest.mark.parametrize("source_shape, target, image", [
    ((32, 32, 1), (40, 48, 3), "gray"),   # gray model -> RGB bundle, fed a small grayscale frame
    ((32, 32, 3), (24, 28, 1), "rgb"),    # RGB model -> gray bundle, fed a large colour frame
])
def test_bundle_of_adapted_model_makes_the_runtime_resize_and_convert(tmp_path, source_shape, target, image):
    pytest.importorskip("ai_edge_litert")
    from edgeadapt.converters import BundleExportOptions, export_bundle
    from edgeadapt.device.preprocessing import prepare_image
    from edgeadapt import Runtime
    from edgeadapt import split_classifier

    adapted = adapt_input(_classifier(source_shape, seed=4), height=target[0], width=target[1], channels=target[2])
    split = split_classifier(adapted)
    spec = input_spec_for_model(adapted)
    rng = np.random.default_rng(9)
    calibration = rng.integers(0, 256, size=(8, *spec.shape)).astype(np.uint8)
    export_bundle(tmp_path / "adapted.eab", backbone=split.backbone, head=split.head, input_spec=spec,
                  class_names=["a", "b", "c"], calibration_images=calibration,
                  options=BundleExportOptions(formats=("tflite",), quantize=False, measure_parity=False))
    runtime = Runtime.open(tmp_path / "adapted.eab")
    assert runtime.input_spec.shape == target
    frame = (rng.integers(0, 256, size=(17, 23)) if image == "gray"
             else rng.integers(0, 256, size=(90, 70, 3))).astype(np.uint8)
    prepared = prepare_image(frame, spec)
    assert prepared.shape == target
    expected = np.asarray(split.backbone(prepared[None].astype(np.float32) * spec.scale + spec.offset, training=False))
    np.testing.assert_allclose(runtime.embed(frame), expected, rtol=1e-4, atol=1e-4)
    assert runtime.predict(frame)[0].label in ("a", "b", "c")
