"""Real TFLite and ONNX conversions of a tiny Keras CNN (each conversion runs once per module)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("ai_edge_litert")

from edgeadapt.converters.calibration import normalized_batches, select_calibration_images  # noqa: E402
from edgeadapt.converters.model_info import (  # noqa: E402
    ExportedModel,
    inspect_model,
    onnx_operator_names,
    tflite_custom_operator_names,
    tflite_operator_names,
)
from edgeadapt.converters import OnnxExportOptions, TFLiteExportOptions, export_onnx, export_tflite  # noqa: E402
from edgeadapt import ConversionError, InputError, InputSpec  # noqa: E402
from edgeadapt.device.preprocessing import InputQuantizer  # noqa: E402

pytestmark = pytest.mark.slow

SPEC = InputSpec(height=32, width=32, channels=3)
EMBEDDING_SIZE = 16


def _generated_images(count: int, seed: int) -> np.ndarray:
    """Smooth colour gradients with blobs and noise: image-like uint8 pictures."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:32, 0:32] / 31.0
    images = np.empty((count, 32, 32, 3), dtype=np.uint8)
    for index in range(count):
        picture = np.zeros((32, 32, 3))
        for channel in range(3):
            a, b, c = rng.uniform(-1, 1, 3)
            picture[:, :, channel] = 0.5 + 0.4 * (a * rows + b * columns + c * rows * columns)
        center = rng.uniform(0, 1, 2)
        blob = np.exp(-((rows - center[0]) ** 2 + (columns - center[1]) ** 2) / rng.uniform(0.01, 0.08))
        picture += blob[:, :, None] * rng.uniform(-0.5, 0.5, 3)
        picture += rng.normal(0, 0.03, picture.shape)
        images[index] = np.clip(picture * 255, 0, 255).astype(np.uint8)
    return images


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def _build_backbone():
    import keras

    keras.utils.set_random_seed(1234)
    layers = keras.layers
    inputs = keras.Input((32, 32, 3))
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False)(inputs)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU(6.0)(x)
    x = layers.Conv2D(64, 1, use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    x = layers.Conv2D(96, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(EMBEDDING_SIZE)(x)
    model = keras.Model(inputs, outputs, name="tiny_backbone")
    # Non-trivial batch-norm statistics, so inference-mode BN really matters.
    rng = np.random.default_rng(7)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.2, channels).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels).astype(np.float32))
            layer.gamma.assign(rng.uniform(0.8, 1.2, channels).astype(np.float32))
            layer.beta.assign(rng.normal(0, 0.1, channels).astype(np.float32))
    return model


@pytest.fixture(scope="module")
def backbone():
    return _build_backbone()


@pytest.fixture(scope="module")
def calibration_images() -> np.ndarray:
    return _generated_images(64, seed=1)


@pytest.fixture(scope="module")
def probe_images() -> np.ndarray:
    return _generated_images(8, seed=2)


@pytest.fixture(scope="module")
def keras_embeddings(backbone, probe_images) -> np.ndarray:
    (batch,) = list(normalized_batches(probe_images, SPEC, batch_size=len(probe_images)))
    return np.asarray(backbone(batch, training=False))


@pytest.fixture(scope="module")
def tflite_float(backbone) -> ExportedModel:
    return export_tflite(backbone, SPEC, None, TFLiteExportOptions(quantize=False))


@pytest.fixture(scope="module")
def tflite_int8(backbone, calibration_images) -> ExportedModel:
    return export_tflite(backbone, SPEC, calibration_images)


@pytest.fixture(scope="module")
def tflite_uint8(backbone, calibration_images) -> ExportedModel:
    return export_tflite(backbone, SPEC, calibration_images, TFLiteExportOptions(input_type="uint8"))


@pytest.fixture(scope="module")
def onnx_float(backbone) -> ExportedModel:
    return export_onnx(backbone, SPEC, None, OnnxExportOptions(quantize=False))


@pytest.fixture(scope="module")
def onnx_int8(backbone, calibration_images) -> ExportedModel:
    return export_onnx(backbone, SPEC, calibration_images)


def run_tflite(model: ExportedModel, images: np.ndarray) -> np.ndarray:
    """Run a .tflite backbone the way the device does: InputQuantizer, resize to the batch, invoke."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model.content)
    details = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(details["index"], [len(images), *SPEC.shape])
    interpreter.allocate_tensors()
    quantizer = InputQuantizer(SPEC, model.input.dtype, model.input.scale, model.input.zero_point)
    interpreter.set_tensor(details["index"], quantizer(images))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy()


def run_onnx(model: ExportedModel, images: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(model.content, providers=["CPUExecutionProvider"])
    quantizer = InputQuantizer(SPEC, model.input.dtype, model.input.scale, model.input.zero_point)
    (output,) = session.run([model.output_name], {model.input_name: quantizer(images)})
    return output


# -- calibration helpers ----------------------------------------------------------------

def test_normalized_batches_follow_the_spec():
    images = np.arange(5 * 32 * 32 * 3, dtype=np.int64).reshape(5, 32, 32, 3) % 256
    images = images.astype(np.uint8)
    batches = list(normalized_batches(images, SPEC, batch_size=2))
    assert [batch.shape[0] for batch in batches] == [2, 2, 1]
    assert all(batch.dtype == np.float32 for batch in batches)
    expected = (images.astype(np.float64) * SPEC.scale + SPEC.offset).astype(np.float32)
    np.testing.assert_array_equal(np.concatenate(batches), expected)
    assert float(np.concatenate(batches).min()) == -1.0 and float(np.concatenate(batches).max()) == 1.0


def test_normalized_batches_reject_wrong_images():
    with pytest.raises(InputError, match="uint8"):
        list(normalized_batches(np.zeros((2, 32, 32, 3), np.float32), SPEC))
    with pytest.raises(InputError, match="shape"):
        list(normalized_batches(np.zeros((2, 28, 28, 3), np.uint8), SPEC))


def test_select_calibration_images_is_stratified_and_reproducible():
    images = np.arange(100, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    labels = np.array([0] * 70 + [1] * 20 + [2] * 10)
    chosen = select_calibration_images(images, labels, count=30, seed=3)
    chosen_labels = labels[chosen[:, 0, 0, 0]]
    assert len(chosen) == 30
    assert sorted(np.bincount(chosen_labels).tolist()) == [10, 10, 10]
    assert len(set(chosen[:, 0, 0, 0].tolist())) == 30
    again = select_calibration_images(images, labels, count=30, seed=3)
    np.testing.assert_array_equal(chosen, again)
    assert len(select_calibration_images(images, count=500)) == 100
    assert len(select_calibration_images(images, count=40)) == 40


# -- TFLite -----------------------------------------------------------------------------

def test_float_tflite_matches_keras(tflite_float, probe_images, keras_embeddings):
    assert tflite_float.format == "tflite" and tflite_float.quantization == "float32"
    assert tflite_float.input.dtype == "float32" and tflite_float.input.scale == 0.0
    embeddings = run_tflite(tflite_float, probe_images[:4])
    assert embeddings.shape == (4, EMBEDDING_SIZE)
    np.testing.assert_allclose(embeddings, keras_embeddings[:4], rtol=1e-4, atol=1e-4)
    assert tflite_custom_operator_names(tflite_float.content) == []


def test_int8_tflite_is_close_to_float(tflite_int8, tflite_float, probe_images, keras_embeddings):
    assert tflite_int8.quantization == "int8"
    assert tflite_int8.input.dtype == "int8" and tflite_int8.input.scale > 0
    assert -128 <= tflite_int8.input.zero_point <= 127
    assert tflite_int8.output.dtype == "float32"
    single = np.concatenate([run_tflite(tflite_int8, probe_images[i : i + 1]) for i in range(4)])
    batch = run_tflite(tflite_int8, probe_images[:4])  # batch of 4 after resize_tensor_input
    assert batch.shape == (4, EMBEDDING_SIZE) and batch.dtype == np.float32
    np.testing.assert_allclose(batch, single, atol=1e-5)
    everything = run_tflite(tflite_int8, probe_images)
    assert float(np.mean(_cosine(everything, keras_embeddings))) > 0.98
    assert float(np.mean(_cosine(everything, run_tflite(tflite_float, probe_images)))) > 0.98


def test_int8_tflite_is_small_and_builtin_only(tflite_int8, tflite_float):
    assert tflite_int8.size < 0.5 * tflite_float.size
    operators = tflite_operator_names(tflite_int8.content)
    assert "CONV_2D" in operators and "DEPTHWISE_CONV_2D" in operators
    assert not [name for name in operators if "Flex" in name]
    assert tflite_custom_operator_names(tflite_int8.content) == []


def test_uint8_input_tflite(tflite_uint8, tflite_int8, probe_images):
    assert tflite_uint8.input.dtype == "uint8" and 0 <= tflite_uint8.input.zero_point <= 255
    uint8_embeddings = run_tflite(tflite_uint8, probe_images)
    int8_embeddings = run_tflite(tflite_int8, probe_images)
    assert float(np.mean(_cosine(uint8_embeddings, int8_embeddings))) > 0.98


def test_exported_model_describe_save_and_inspect(tflite_int8, tmp_path):
    description = tflite_int8.describe()
    assert json.loads(json.dumps(description)) == description
    assert set(description) == {
        "format", "quantization", "input", "output", "input_name", "output_name", "size",
    }
    assert description["input"] == {
        "dtype": "int8", "scale": tflite_int8.input.scale, "zero_point": tflite_int8.input.zero_point,
    }
    assert description["size"] == len(tflite_int8.content)
    path = tflite_int8.save(tmp_path / "nested" / "backbone.tflite")
    assert path.read_bytes() == tflite_int8.content
    assert inspect_model(path).describe() == description


def test_tflite_refuses_flex_ops(calibration_images):
    import keras
    import tensorflow as tf

    class ImagePatches(keras.layers.Layer):
        """tf.image.extract_patches has no TFLite builtin: it needs the Flex delegate."""

        def call(self, images):
            return tf.image.extract_patches(images, [1, 2, 2, 1], [1, 2, 2, 1], [1, 1, 1, 1], "VALID")

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = ImagePatches()(x)
    outputs = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, outputs)
    with pytest.raises(ConversionError, match="ExtractImagePatches"):
        export_tflite(model, SPEC, None, TFLiteExportOptions(quantize=False))


def test_tflite_needs_calibration_images_and_valid_options(backbone):
    with pytest.raises(ConversionError, match="calibration images"):
        export_tflite(backbone, SPEC, None)
    with pytest.raises(InputError, match="shape"):
        export_tflite(backbone, SPEC, np.zeros((4, 16, 16, 3), np.uint8))
    with pytest.raises(InputError, match="input_type"):
        TFLiteExportOptions(input_type="int16")
    with pytest.raises(ConversionError, match="input shape"):
        export_tflite(backbone, InputSpec(height=48, width=48), None, TFLiteExportOptions(quantize=False))


# -- ONNX -------------------------------------------------------------------------------

def test_float_onnx_matches_keras(onnx_float, probe_images, keras_embeddings):
    assert onnx_float.format == "onnx" and onnx_float.quantization == "float32"
    assert onnx_float.input_name == "input" and onnx_float.output_name == "embedding"
    embeddings = run_onnx(onnx_float, probe_images[:3])  # dynamic batch: 3
    assert embeddings.shape == (3, EMBEDDING_SIZE)
    np.testing.assert_allclose(embeddings, keras_embeddings[:3], rtol=1e-4, atol=1e-4)


def test_int8_onnx_is_close_to_float(onnx_int8, onnx_float, probe_images, keras_embeddings):
    import onnx

    assert onnx_int8.quantization == "int8"
    assert onnx_int8.input.dtype == "float32" and onnx_int8.input.scale == 0.0
    operators = onnx_operator_names(onnx_int8.content)
    assert "QuantizeLinear" in operators and "DequantizeLinear" in operators
    graph = onnx.load_from_string(onnx_int8.content).graph
    assert [output.name for output in graph.output] == ["embedding"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    embeddings = run_onnx(onnx_int8, probe_images[:3])
    assert embeddings.shape == (3, EMBEDDING_SIZE)
    everything = run_onnx(onnx_int8, probe_images)
    assert float(np.mean(_cosine(everything, keras_embeddings))) > 0.98
    assert float(np.mean(_cosine(everything, run_onnx(onnx_float, probe_images)))) > 0.98
    assert onnx_int8.size < 0.5 * onnx_float.size
    assert inspect_model_bytes_roundtrip(onnx_int8)


def inspect_model_bytes_roundtrip(model: ExportedModel) -> bool:
    from edgeadapt.converters.model_info import inspect_onnx

    return inspect_onnx(model.content).describe() == model.describe()


def test_onnx_exports_a_sequential_built_by_calling(probe_images):
    """Keras 3 quirk: tf2onnx.convert.from_keras fails on such models; export_onnx must not."""
    import keras

    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.layers.Conv2D(8, 3), keras.layers.GlobalAveragePooling2D()])
    (batch,) = list(normalized_batches(probe_images[:2], SPEC, batch_size=2))
    expected = np.asarray(model(batch, training=False))
    exported = export_onnx(model, SPEC, None, OnnxExportOptions(quantize=False))
    np.testing.assert_allclose(run_onnx(exported, probe_images[:2]), expected, rtol=1e-4, atol=1e-4)


def test_onnx_needs_calibration_images(backbone):
    with pytest.raises(ConversionError, match="calibration images"):
        export_onnx(backbone, SPEC, None)
    with pytest.raises(InputError, match="opset"):
        OnnxExportOptions(opset=11)
