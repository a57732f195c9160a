"""Fused single-file models (backbone + head + softmax, labels embedded) against the split bundle."""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("onnxruntime")
pytest.importorskip("ai_edge_litert")

from edgeadapt.converters.fused_export import (  # noqa: E402
    FusedRunner,
    export_fused,
    fused_model_bytes,
    probe_image_batch,
    verify_fused,
)
from edgeadapt.converters.fused_format import read_onnx_fused_metadata  # noqa: E402
from edgeadapt.converters.tflite_metadata import read_tflite_fused_metadata  # noqa: E402
from edgeadapt.device import Bundle  # noqa: E402
from edgeadapt.device.bundle import write_bundle  # noqa: E402
from edgeadapt.device.head_section import head_payload  # noqa: E402
from edgeadapt import BundleError, Head, ImportSettings, InputError, InputSpec, Runtime, import_classifier  # noqa: E402

SIZE = 32
LABELS = ["ant", "bee", "cicada", "dragonfly", "earwig", "firefly"]
SPEC = InputSpec(height=SIZE, width=SIZE)


def _classifier():
    import keras

    keras.utils.set_random_seed(9)
    layers = keras.layers
    inputs = keras.Input((SIZE, SIZE, 3))
    x = layers.Conv2D(12, 3, strides=2, padding="same", activation="relu")(inputs)
    x = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(len(LABELS), activation="softmax",
                           bias_initializer=keras.initializers.RandomNormal(0, 0.5))(x)
    return keras.Model(inputs, outputs)


def _tflite(model, quantize: str | None) -> bytes:
    import tensorflow as tf

    table = (np.arange(256) / 127.5 - 1.0).astype(np.float32)
    calibration = table[probe_image_batch(SPEC, 32, seed=3)]
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


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """Imported bundles: int8-input TFLite (+ONNX), uint8-input TFLite, float TFLite."""
    root = tmp_path_factory.mktemp("fused")
    labels = root / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    model = _classifier()
    result = {}
    for name, quantize, onnx in (("int8", "int8", True), ("uint8", "uint8", False), ("float", None, False)):
        path = root / f"{name}.tflite"
        path.write_bytes(_tflite(model, quantize))
        import_classifier(path, labels, root / f"{name}.eab", ImportSettings(onnx=onnx, probes=8))
        result[name] = root / f"{name}.eab"
    return result


@pytest.fixture(scope="module")
def probes() -> np.ndarray:
    return probe_image_batch(SPEC, 24, seed=17)


def _with_head(source: Path, head: Head, target: Path) -> Path:
    """A copy of a bundle with another head (same backbone files)."""
    bundle = Bundle.open(source)
    manifest = bundle.manifest.copy()
    section, files = head_payload(head, None, 1, manifest.backbone_fingerprint)
    manifest.data["head"] = section
    content = {entry["file"]: bundle.file_path(entry["file"]) for entry in manifest.models}
    content.update(files)
    return write_bundle(target, manifest, content)


@pytest.mark.parametrize("name, model_format", [("int8", "tflite"), ("int8", "onnx"), ("uint8", "tflite"),
                                                ("float", "tflite")])
def test_fused_matches_split_bundle(bundles, probes, tmp_path, name, model_format):
    output = tmp_path / f"fused.{model_format}"
    result = export_fused(bundles[name], output, model_format, probe_images=probes)
    assert output.is_file() and result.size == output.stat().st_size
    assert result.top1_agreement == 1.0
    assert result.max_score_difference < (1e-4 if name != "int8" else 1e-2)
    assert result.backbone_quantization == ("float32" if name == "float" else "int8")
    # one interpreter call: uint8 pixels in, float32 probabilities out
    runner = FusedRunner(output.read_bytes(), model_format)
    scores = runner(probes[:3])
    assert scores.shape == (3, len(LABELS)) and np.allclose(scores.sum(1), 1.0, atol=1e-5)


def test_fused_tflite_embeds_labels_and_metadata(bundles, tmp_path):
    output = tmp_path / "fused.tflite"
    export_fused(bundles["int8"], output, "tflite", probes=4)
    content = output.read_bytes()
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    (image,) = interpreter.get_input_details()
    (probabilities,) = interpreter.get_output_details()
    assert image["name"] == "image" and image["dtype"] == np.uint8 and list(image["shape"]) == [1, SIZE, SIZE, 3]
    assert probabilities["name"] == "probabilities" and probabilities["dtype"] == np.float32
    assert list(interpreter.get_signature_list()["serving_default"]["outputs"]) == ["probabilities"]
    with zipfile.ZipFile(io.BytesIO(content)) as archive:  # the TFLite Support associated-files zip
        assert archive.read("labels.txt").decode().splitlines() == LABELS
        info = json.loads(archive.read("edgeadapt.json"))
    assert info["input"]["dtype"] == "uint8" and info["output"]["name"] == "probabilities"
    read = read_tflite_fused_metadata(content)
    assert read["labels"] == LABELS
    assert read["metadata"]["output_label_file"] == "labels.txt"
    assert read["metadata"]["output_label_type"] == 2  # TENSOR_AXIS_LABELS
    assert read["metadata"]["input_mean"] == [0.0] and read["metadata"]["input_std"] == [1.0]
    assert read["metadata"]["min_parser_version"] == "1.0.0"


def test_fused_onnx_metadata_props(bundles, tmp_path):
    output = tmp_path / "fused.onnx"
    export_fused(bundles["int8"], output, "onnx", probes=4)
    metadata = read_onnx_fused_metadata(output.read_bytes())
    assert metadata["edgeadapt.labels"] == LABELS
    assert metadata["edgeadapt.input"]["dtype"] == "uint8" and metadata["edgeadapt.input"]["layout"] == "NHWC"
    assert metadata["edgeadapt.output"] == {"name": "probabilities", "dtype": "float32", "kind": "softmax",
                                            "classes": len(LABELS)}
    bundle = Bundle.open(bundles["int8"])
    assert metadata["edgeadapt.bundle"]["backbone_fingerprint"] == bundle.manifest.backbone_fingerprint


@pytest.mark.parametrize("model_format", ["tflite", "onnx"])
def test_fused_head_with_centering_l2_and_temperature(bundles, probes, tmp_path, model_format):
    base = Bundle.open(bundles["int8"])
    old = base.load_head()
    rng = np.random.default_rng(4)
    embeddings = Runtime(base).embed(probes)
    head = Head(weights=old.weights + rng.normal(0, 0.1, old.weights.shape).astype(np.float32), bias=old.bias,
                feature_mean=embeddings.mean(0), l2_normalize=True, temperature=0.05)
    path = _with_head(bundles["int8"], head, tmp_path / "normalised.eab")
    content, _ = fused_model_bytes(path, model_format)
    agreement, difference = verify_fused(content, model_format, path, probes)
    assert agreement == 1.0 and difference < 1e-2
    centred_only = _with_head(bundles["int8"], Head(old.weights, old.bias, feature_mean=embeddings.mean(0),
                                                    temperature=2.0), tmp_path / "centred.eab")
    content, _ = fused_model_bytes(centred_only, model_format)
    assert verify_fused(content, model_format, centred_only, probes)[0] == 1.0


def test_fused_export_bad_input(bundles, tmp_path):
    with pytest.raises(BundleError, match="no onnx backbone"):
        export_fused(bundles["uint8"], tmp_path / "x.onnx", "onnx")
    with pytest.raises(InputError, match="unknown fused format"):
        fused_model_bytes(bundles["uint8"], "coreml")
    assert not (tmp_path / "x.onnx").exists()


def test_export_fused_cli(bundles, tmp_path, capsys):
    from edgeadapt.cli import main

    assert main(["export-fused", str(bundles["uint8"]), "--format", "tflite", "--out", str(tmp_path / "f.tflite"),
                 "--probes", "4"]) == 0
    assert "top-1 agreement 1.000" in capsys.readouterr().out


DATA = Path(os.environ.get("EDGEADAPT_DATA", Path(__file__).resolve().parents[2] / ".." / "shared" / "data"))
MOBILENET = DATA / "imagenet_mobilenet"


@pytest.mark.real_data
@pytest.mark.skipif(not (MOBILENET / "mobilenet_v1_0.25_128_quant.tflite").is_file(), reason="needs ../shared/data")
def test_real_mobilenet_fused_tflite(tmp_path):
    from edgeadapt.device.preprocessing import prepare_batch

    import_classifier(MOBILENET / "mobilenet_v1_0.25_128_quant.tflite", MOBILENET / "imagenet_labels.txt",
                      tmp_path / "m.eab", ImportSettings(onnx=False, probes=4))
    spec = Bundle.open(tmp_path / "m.eab").manifest.input_spec
    images = prepare_batch([str(MOBILENET / n) for n in ("cat.bmp", "bird.bmp", "parrot.jpg")], spec)
    result = export_fused(tmp_path / "m.eab", tmp_path / "m.tflite", "tflite", probe_images=images, probes=8)
    assert result.top1_agreement == 1.0 and result.max_score_difference < 1e-4
