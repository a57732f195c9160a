"""Importing third-party classifiers: TFLite (FULLY_CONNECTED and 1x1 CONV_2D heads, int8/uint8/float),
ONNX (Gemm, MatMul+Add, QDQ int8, NCHW), Keras, class statistics, bad input, and the real MobileNet.

Tiny models are built here (Keras -> TFLite converter, onnx.helper); each is built once per module.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("onnxruntime")
pytest.importorskip("ai_edge_litert")

from edgeadapt.converters.fused_export import probe_image_batch  # noqa: E402
from edgeadapt.converters import import_onnx_classifier  # noqa: E402
from edgeadapt.converters.onnx_import import onnx_scores  # noqa: E402
from edgeadapt.converters.parity import run_exported  # noqa: E402
from edgeadapt.converters.tflite_import import (  # noqa: E402
    ImportOptions,
    import_tflite_classifier,
    tflite_scores,
)
from edgeadapt import Bundle, ConversionError, IncompatibleModelError, InputError, InputSpec, Runtime  # noqa: E402
from edgeadapt import ImportSettings, import_classifier  # noqa: E402
from edgeadapt.bundles.import_inputs import unique_labels  # noqa: E402
from edgeadapt.bundles.import_verification import top1_agreement  # noqa: E402

SIZE = 32
CLASSES = 5
LABELS = ["apple", "bean", "cherry", "date", "elder"]
SPEC = InputSpec(height=SIZE, width=SIZE)


# ----------------------------------------------------------------------------- builders
def _images(count: int, seed: int) -> np.ndarray:
    return probe_image_batch(SPEC, count, seed=seed)


def _keras_classifier(head: str = "dense", outputs: int = 1, seed: int = 3):
    import keras

    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input((SIZE, SIZE, 3))
    x = layers.Conv2D(12, 3, strides=2, padding="same", activation="relu")(inputs)
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    if head == "segmentation":
        return keras.Model(inputs, layers.Conv2D(3, 1)(x))
    if head == "none":
        return keras.Model(inputs, layers.GlobalAveragePooling2D()(x))
    if head == "conv1x1":
        x = layers.GlobalAveragePooling2D(keepdims=True)(x)
        x = layers.Conv2D(CLASSES, 1, bias_initializer=keras.initializers.RandomNormal(0, 0.5))(x)
        x = layers.Reshape((CLASSES,))(x)
        return keras.Model(inputs, layers.Softmax()(x))
    x = layers.GlobalAveragePooling2D()(x)
    scores = layers.Dense(CLASSES, activation="softmax", bias_initializer=keras.initializers.RandomNormal(0, 0.5))(x)
    if outputs == 2:
        return keras.Model(inputs, [scores, layers.Dense(4)(x)])
    return keras.Model(inputs, scores)


def _to_tflite(model, quantize: str | None = None) -> bytes:
    """quantize: None (float), "int8" (int8 in/out) or "uint8" (uint8 in/out)."""
    import tensorflow as tf

    table = (np.arange(256) / 127.5 - 1.0).astype(np.float32)
    calibration = table[_images(32, seed=11)]
    with tempfile.TemporaryDirectory() as directory:
        model.export(directory, format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(directory)
        if quantize:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda: ([calibration[i : i + 1]] for i in range(len(calibration)))
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8 if quantize == "int8" else tf.uint8
            converter.inference_output_type = tf.int8 if quantize == "int8" else tf.uint8
        return converter.convert()


def _onnx_classifier(kind: str = "gemm", dynamic: bool = False, seed: int = 5) -> bytes:
    """NCHW conv net -> GlobalAveragePool -> Flatten -> Gemm/MatMul+Add -> Softmax, built with onnx.helper."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    conv = numpy_helper.from_array(rng.normal(0, 0.4, (12, 3, 3, 3)).astype(np.float32), "conv_w")
    conv_bias = numpy_helper.from_array(rng.normal(0, 0.1, 12).astype(np.float32), "conv_b")
    weights = rng.normal(0, 1.0, (CLASSES, 12)).astype(np.float32)
    bias = rng.normal(0, 0.5, CLASSES).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
    ]
    initializers = [conv, conv_bias]
    if dynamic:  # flatten the whole map: the embedding size depends on the input size
        nodes.append(helper.make_node("Flatten", ["r"], ["e"], axis=1))
        weights = rng.normal(0, 1.0, (CLASSES, 12 * 16 * 16)).astype(np.float32)
    else:
        nodes += [helper.make_node("GlobalAveragePool", ["r"], ["p"]), helper.make_node("Flatten", ["p"], ["e"], axis=1)]
    if kind == "gemm":
        initializers += [numpy_helper.from_array(weights, "fc_w"), numpy_helper.from_array(bias, "fc_b")]
        nodes.append(helper.make_node("Gemm", ["e", "fc_w", "fc_b"], ["logits"], transB=1))
    else:
        initializers += [numpy_helper.from_array(weights.T.copy(), "fc_w"), numpy_helper.from_array(bias, "fc_b")]
        nodes += [helper.make_node("MatMul", ["e", "fc_w"], ["m"]), helper.make_node("Add", ["m", "fc_b"], ["logits"])]
    nodes.append(helper.make_node("Softmax", ["logits"], ["scores"], axis=1))
    input_shape = ["N", 3, "H", "W"] if dynamic else ["N", 3, SIZE, SIZE]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", CLASSES])], initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _qdq_onnx(content: bytes) -> bytes:
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_static

    table = (np.arange(256) / 127.5 - 1.0).astype(np.float32)
    batches = [np.transpose(table[image[None]], (0, 3, 1, 2)) for image in _images(16, seed=13)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(batches)

        def get_next(self):
            batch = next(self.items, None)
            return None if batch is None else {"x": batch}

    with tempfile.TemporaryDirectory() as directory:
        source, target = Path(directory) / "f.onnx", Path(directory) / "q.onnx"
        source.write_bytes(content)
        quantize_static(str(source), str(target), Reader(), weight_type=QuantType.QInt8, activation_type=QuantType.QInt8,
                        per_channel=True)
        return target.read_bytes()


@pytest.fixture(scope="module")
def tflite_models() -> dict[str, bytes]:
    return {
        "dense_int8": _to_tflite(_keras_classifier("dense"), "int8"),
        "conv_uint8": _to_tflite(_keras_classifier("conv1x1"), "uint8"),
        "dense_float": _to_tflite(_keras_classifier("dense")),
    }


@pytest.fixture(scope="module")
def probes() -> np.ndarray:
    return _images(24, seed=21)


@pytest.fixture
def labels_file(tmp_path) -> Path:
    path = tmp_path / "labels.txt"
    path.write_text("\n".join(LABELS) + "\n")
    return path


def _agreement(original: np.ndarray, imported, images: np.ndarray) -> float:
    embeddings = run_exported(imported.backbone.content, imported.backbone.format, imported.input_spec, images)
    return top1_agreement(original, imported.head.logits(embeddings).argmax(1))[0]


# ----------------------------------------------------------------------------- TFLite
@pytest.mark.parametrize("name, operator", [("dense_int8", "FULLY_CONNECTED"), ("conv_uint8", "CONV_2D"),
                                            ("dense_float", "FULLY_CONNECTED")])
def test_tflite_cut_matches_original(tflite_models, probes, name, operator):
    content = tflite_models[name]
    imported = import_tflite_classifier(content)
    assert imported.head_operator.startswith(operator)
    assert imported.head.weights.shape == (16, CLASSES) and imported.head.weights.dtype == np.float32
    assert imported.backbone.output.dtype == "float32"
    assert "SOFTMAX" in imported.tail and imported.output_kind == "probabilities"
    # the backbone is standalone, builtin-only, and smaller (head + tail dropped)
    from edgeadapt.converters.model_info import tflite_custom_operator_names, tflite_operator_names

    assert tflite_custom_operator_names(imported.backbone.content) == []
    assert operator not in tflite_operator_names(imported.backbone.content) or operator == "CONV_2D"
    assert "SOFTMAX" not in tflite_operator_names(imported.backbone.content)
    assert imported.details["dropped"]["operators"] >= 2
    original = tflite_scores(content, probes, imported.input_spec)
    assert _agreement(original, imported, probes) == 1.0


def test_tflite_input_quantization_becomes_exact_input_spec(tflite_models):
    uint8 = import_tflite_classifier(tflite_models["conv_uint8"])
    details = uint8.details["original_input"]
    assert uint8.normalization_source == "input quantization"
    assert uint8.input_spec.scale == pytest.approx(details["scale"])
    assert uint8.input_spec.offset == pytest.approx(-details["zero_point"] * details["scale"])
    int8 = import_tflite_classifier(tflite_models["dense_int8"])
    assert int8.backbone.input.dtype == "int8"
    assert int8.input_spec.offset == pytest.approx((-128 - int8.details["original_input"]["zero_point"])
                                                   * int8.details["original_input"]["scale"])
    floating = import_tflite_classifier(tflite_models["dense_float"], ImportOptions(input_scale=1 / 255, input_offset=0.0))
    assert floating.normalization_source == "given" and floating.input_spec.scale == pytest.approx(1 / 255)


def test_tflite_head_weights_are_dequantized(tflite_models):
    """The float head reproduces the int8 model's own logits (before softmax) within one output step."""
    imported = import_tflite_classifier(tflite_models["dense_int8"])
    assert imported.details["head_weights_quantized"]
    assert np.all(np.isfinite(imported.head.weights)) and np.abs(imported.head.weights).max() > 0


def test_import_tflite_bundle_end_to_end(tflite_models, labels_file, tmp_path, probes):
    model_path = tmp_path / "tiny.tflite"
    model_path.write_bytes(tflite_models["dense_int8"])
    report = import_classifier(model_path, labels_file, tmp_path / "tiny.eab", ImportSettings(probes=16))
    assert {check.format for check in report.formats} == {"tflite", "onnx"}
    assert all(check.top1_agreement == 1.0 for check in report.formats if check.format == "tflite")
    onnx_check = next(check for check in report.formats if check.format == "onnx")
    assert onnx_check.parity_with_primary["embedding_cosine"] > 0.99
    bundle = Bundle.open(tmp_path / "tiny.eab")
    assert bundle.manifest.class_names == LABELS
    assert {info.origin for info in bundle.manifest.classes} == {"imported"}
    assert bundle.manifest.data["import"]["source_format"] == "tflite"
    assert bundle.load_class_stats() is None
    original = tflite_scores(tflite_models["dense_int8"], probes, bundle.manifest.input_spec)
    for backend in ("litert", "onnxruntime"):
        runtime = Runtime.open(tmp_path / "tiny.eab", backend=backend)
        top1 = runtime.probabilities(probes).argmax(1)
        assert top1_agreement(original, top1)[0] >= (1.0 if backend == "litert" else 0.9)
    assert "top-1 agreement" in report.table()


# ----------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("kind", ["gemm", "matmul"])
def test_onnx_cut_matches_original(kind, probes):
    content = _onnx_classifier(kind)
    imported = import_onnx_classifier(content)
    assert imported.details["layout"] == "NCHW"
    assert imported.backbone.input_name == "input" and imported.backbone.output_name == "embedding"
    assert imported.head.weights.shape == (12, CLASSES)
    original = onnx_scores(content, probes, imported.input_spec)
    embeddings = run_exported(imported.backbone.content, "onnx", imported.input_spec, probes)
    np.testing.assert_allclose(
        imported.head.probabilities(embeddings), original, rtol=1e-4, atol=1e-5
    )


def test_onnx_qdq_int8_and_channel_normalisation(probes):
    content = _qdq_onnx(_onnx_classifier("gemm"))
    options = ImportOptions(input_scale=1 / 255, input_offset=0.0, channel_mean=(0.485, 0.456, 0.406),
                            channel_std=(0.229, 0.224, 0.225))
    imported = import_onnx_classifier(content, options)
    assert imported.backbone.quantization == "int8"
    original = onnx_scores(content, probes, imported.input_spec, options)
    assert _agreement(original, imported, probes) == 1.0


def test_onnx_bundle_with_class_statistics(tmp_path, labels_file):
    from edgeadapt.data.image_folders import write_image_folder

    model_path = tmp_path / "tiny.onnx"
    model_path.write_bytes(_onnx_classifier("gemm"))
    images = _images(5, seed=31)
    data = write_image_folder(tmp_path / "data", ["apple", "date"], images, np.array([0, 0, 1, 1, 1]))
    report = import_classifier(model_path, labels_file, tmp_path / "tiny.eab", ImportSettings(data=data, probes=8))
    assert report.statistics_examples == 5 and report.statistics_classes == 2
    bundle = Bundle.open(tmp_path / "tiny.eab")
    stats = bundle.load_class_stats()
    assert stats.counts.tolist() == [2, 0, 0, 3, 0]
    assert stats.gram.shape == (12, 12)
    from edgeadapt.device.preprocessing import prepare_batch

    reread = prepare_batch(sorted(str(p) for p in (data / "apple").iterdir()), bundle.manifest.input_spec)
    expected = Runtime.open(tmp_path / "tiny.eab").embed(reread).astype(np.float64).sum(0)
    np.testing.assert_allclose(stats.sums[0], expected, rtol=1e-5, atol=1e-5)
    assert [info.examples for info in bundle.manifest.classes] == [2, None, None, 3, None]
    # the ridge solver state is stored only when asked (--ridge-solver-state)
    assert "ridge_basis" not in bundle.manifest.data["head"]["statistics"]
    assert not [name for name in bundle.manifest.files if "/ridge_" in name]
    from edgeadapt import cli

    assert cli.main(["import", str(model_path), "--labels", str(labels_file), "--out", str(tmp_path / "ridge.eab"),
                     "--data", str(data), "--probes", "8", "--ridge-solver-state", "-q"]) == 0
    ridge = Bundle.open(tmp_path / "ridge.eab")
    listed = ridge.manifest.data["head"]["statistics"]["ridge_basis"]["files"]
    assert sorted(listed.values()) == sorted(name for name in ridge.manifest.files if "/ridge_" in name)
    assert ridge.load_class_stats().ridge_basis.classes == 5


# ----------------------------------------------------------------------------- Keras
def test_keras_import_float(tmp_path, labels_file, probes):
    model = _keras_classifier("dense")
    model_path = tmp_path / "tiny.keras"
    model.save(model_path)
    report = import_classifier(model_path, labels_file, tmp_path / "keras.eab", ImportSettings(probes=12))
    assert report.source_format == "keras"
    assert all(check.top1_agreement == 1.0 for check in report.formats)
    runtime = Runtime.open(tmp_path / "keras.eab")
    expected = np.asarray(model((np.arange(256) / 127.5 - 1.0).astype(np.float32)[probes], training=False))
    np.testing.assert_allclose(runtime.probabilities(probes), expected, atol=1e-4)


# ----------------------------------------------------------------------------- bad input
def test_model_without_head_says_what_was_found():
    content = _to_tflite(_keras_classifier("none"))
    with pytest.raises(IncompatibleModelError, match="no classifier head found.*MEAN"):
        import_tflite_classifier(content)


def test_detection_like_and_segmentation_models_are_refused():
    with pytest.raises(IncompatibleModelError, match="2 outputs.*detection"):
        import_tflite_classifier(_to_tflite(_keras_classifier("dense", outputs=2)))
    with pytest.raises(IncompatibleModelError, match="segmentation"):
        import_tflite_classifier(_to_tflite(_keras_classifier("segmentation")))


def test_labels_file_length_must_match(tmp_path, tflite_models):
    model_path = tmp_path / "tiny.tflite"
    model_path.write_bytes(tflite_models["dense_float"])
    labels = tmp_path / "short.txt"
    labels.write_text("a\nb\nc\n")
    with pytest.raises(InputError, match="3 names but the model has 5 classes"):
        import_classifier(model_path, labels, tmp_path / "x.eab", ImportSettings(onnx=False, probes=2))
    assert not (tmp_path / "x.eab").exists()


def test_onnx_dynamic_embedding_size_is_refused():
    with pytest.raises(IncompatibleModelError, match="dynamic"):
        import_onnx_classifier(_onnx_classifier("gemm", dynamic=True), ImportOptions(input_size=(SIZE, SIZE)))
    with pytest.raises(IncompatibleModelError, match="dynamic size"):
        import_onnx_classifier(_onnx_classifier("gemm", dynamic=True))


@pytest.mark.parametrize("suffix", [".tflite", ".onnx"])
def test_truncated_files(tmp_path, tflite_models, labels_file, suffix):
    content = tflite_models["dense_float"] if suffix == ".tflite" else _onnx_classifier("gemm")
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(content[: len(content) // 2])
    with pytest.raises(ConversionError):
        import_classifier(path, labels_file, tmp_path / "cut.eab", ImportSettings(probes=2))
    assert not (tmp_path / "cut.eab").exists()


def test_duplicate_labels_are_made_unique():
    names, renamed = unique_labels(["crane", "cat", "crane", "crane (2)"])
    assert names == ["crane", "cat", "crane (3)", "crane (2)"] and renamed == {2: "crane (3)"}


def test_tie_aware_agreement():
    original = np.array([[0.5, 0.5, 0.0], [0.1, 0.7, 0.2]])
    assert top1_agreement(original, np.array([1, 1])) == (1.0, 0.5, 1)


# ----------------------------------------------------------------------------- real MobileNet
DATA = Path(os.environ.get("EDGEADAPT_DATA", Path(__file__).resolve().parents[2] / ".." / "shared" / "data"))
MOBILENET = DATA / "imagenet_mobilenet"


@pytest.mark.real_data
@pytest.mark.skipif(not (MOBILENET / "mobilenet_v1_0.25_128_quant.tflite").is_file(), reason="needs ../shared/data")
def test_real_mobilenet_import_keeps_predictions(tmp_path):
    from PIL import Image

    model = MOBILENET / "mobilenet_v1_0.25_128_quant.tflite"
    report = import_classifier(model, MOBILENET / "imagenet_labels.txt", tmp_path / "mobilenet.eab",
                               ImportSettings(onnx=False, probes=8))
    assert report.num_classes == 1001 and report.embedding_size == 256
    names = ["cat.bmp", "bird.bmp", "parrot.jpg"]
    # the reference preprocessing of these test images (Coral/pycoral): PIL LANCZOS resize to 128x128
    images = np.stack([np.asarray(Image.open(MOBILENET / n).convert("RGB").resize((128, 128), Image.LANCZOS))
                       for n in names])
    runtime = Runtime.open(tmp_path / "mobilenet.eab", backend="litert")
    labels = [prediction.label for prediction in runtime.predict(images, top_k=1) for prediction in prediction]
    assert labels == ["tiger cat", "chickadee", "macaw"]
    original = tflite_scores(model.read_bytes(), images, runtime.input_spec)
    assert top1_agreement(original, runtime.probabilities(images).argmax(1))[0] == 1.0
