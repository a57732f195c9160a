"""The device Detector on a tiny real SSD .tflite (built here with the TFLite schema, no TensorFlow)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
from edgeadapt.device.backends import available_backends
from edgeadapt.device.errors import BackendUnavailableError, BundleError

TFLITE_BACKENDS = [name for name in ("litert", "tflite-runtime") if name in available_backends()]
pytestmark = [
    pytest.mark.skipif(not TFLITE_BACKENDS, reason="needs a TFLite interpreter (ai-edge-litert or tflite-runtime)"),
    pytest.mark.skipif(importlib.util.find_spec("ai_edge_litert") is None
                       or importlib.util.find_spec("flatbuffers") is None,
                       reason="building the tiny detector needs ai-edge-litert's TFLite schema and flatbuffers"),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tiny_ssd import build_tiny_ssd

    return build_tiny_ssd(tmp_path_factory.mktemp("device_ssd") / "tiny.tflite")


@pytest.fixture(scope="module")
def labels(model):
    from tiny_ssd import write_labelmap

    return write_labelmap(model.with_name("labelmap.txt"))


def _iou(a, b) -> float:
    ax0, ay0, ax1, ay1 = a
    bx0, by0, bx1, by1 = b
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    return inter / ((ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter)


@pytest.mark.parametrize("backend", TFLITE_BACKENDS)
def test_detects_boxes_in_image_pixels(model, labels, backend):
    from edgeadapt.device import DetectionResult, Detector
    from PIL import Image
    from tiny_ssd import square_box, square_image

    detector = Detector(model, labels=labels, backend=backend, num_threads=1)
    assert detector.labels == ["blue", "green"] and detector.backend_name == backend
    image = square_image("green", (5, 2), seed=3)
    result = detector.detect(image, score_threshold=0.5)
    assert isinstance(result, DetectionResult) and (result.width, result.height) == (32, 32)
    best = result.detections[0]
    assert best.label == "green" and best.index == 1 and 0.5 <= best.score <= 1.0
    assert _iou(best.box, square_box((5, 2))) > 0.7
    # a 96x64 photo: boxes scale back to the original pixels (x by 3, y by 2)
    wide = np.asarray(Image.fromarray(image).resize((96, 64), Image.NEAREST))
    scaled = detector.detect(wide, score_threshold=0.5).detections[0]
    xmin, ymin, xmax, ymax = square_box((5, 2))
    assert _iou(scaled.box, (xmin * 3, ymin * 2, xmax * 3, ymax * 2)) > 0.7
    scores = [d.score for d in result.detections]
    assert scores == sorted(scores, reverse=True)
    assert not detector.detect(square_image(None, None, seed=4), score_threshold=0.5).detections


def test_labels_fallback_and_errors(model, tmp_path):
    from edgeadapt.device.detector import Detector, labels_from_lines
    from tiny_ssd import build_tiny_ssd, square_image

    detector = Detector(model)  # no labels file, none embedded
    assert detector.detect(square_image("blue", (3, 3)), 0.5).detections[0].label == "class_0"
    assert labels_from_lines(["???", "a", "b", ""]) == ["a", "b"] and labels_from_lines(["a", "b"]) == ["a", "b"]
    with pytest.raises(BundleError, match="cannot read"):
        Detector(tmp_path / "missing.tflite")
    with pytest.raises(BundleError, match="4 \\(boxes, classes, scores, count\\)"):
        Detector(build_tiny_ssd(tmp_path / "classifier.tflite", variant="classifier"))
    with pytest.raises(BackendUnavailableError, match="cannot run a .tflite detector"):
        Detector(model, backend="onnxruntime")


def test_device_cli_detect_json(model, labels, tmp_path, capsys):
    from edgeadapt.device.cli import main
    from PIL import Image
    from tiny_ssd import square_box, square_image

    path = tmp_path / "blue.png"
    Image.fromarray(square_image("blue", (2, 4), seed=9)).save(path)
    assert main(["detect", str(model), str(path), "--labels", str(labels), "--json", "--threads", "1"]) == 0
    output = json.loads(capsys.readouterr().out)
    detection = output["results"][0]["detections"][0]
    assert detection["label"] == "blue" and _iou(detection["box"], square_box((2, 4))) > 0.7
    assert main(["detect", str(model), str(path), "--labels", str(labels)]) == 0
    assert "blue" in capsys.readouterr().out


def test_detector_imports_no_tensorflow():
    code = ("import sys\nfrom edgeadapt.device import Detector\nimport edgeadapt.device.cli_detect\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf2onnx', 'tf_keras')]\n"
            "print(bad)\n")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"
