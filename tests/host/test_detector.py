"""Adding classes to SSD detectors: a tiny real SSD .tflite built in the test, run by LiteRT."""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from edgeadapt.detection.add_classes import DetectorOptions, add_detector_classes, extend_detector
from edgeadapt.detection.annotations import load_new_classes, read_coco, read_voc
from edgeadapt.detection.rewrite import EMBEDDED_LABELS_FILE
from edgeadapt.detection.runner import TensorRunner, model_with_outputs, pixels_to_input
from edgeadapt.detection.structure import PostProcessOptions, load_ssd
from edgeadapt.detection.training import TrainingOptions, box_iou, corners, match
from edgeadapt.device.detector import Detector
from edgeadapt.device.errors import DatasetError, IncompatibleModelError, InputError
from tiny_ssd import (
    build_tiny_ssd,
    square_box,
    square_image,
    write_labelmap,
    write_red_squares,
    write_voc,
)

TRAINING = TrainingOptions(steps=300)
OPTIONS = DetectorOptions(use_cache=False, progress=False, training=TRAINING)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tiny_ssd")
    model = build_tiny_ssd(folder / "tiny.tflite")
    labels = write_labelmap(folder / "labelmap.txt")
    write_red_squares(folder / "data" / "red", 30, seed=1)
    return {"model": model, "labels": labels, "data": folder / "data", "folder": folder}


@pytest.fixture(scope="module")
def extended(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("extended") / "tiny92.tflite"
    add_detector_classes(tiny["model"], tiny["labels"], tiny["data"], ["red"], out, options=OPTIONS)
    return out


def _raw_scores(content: bytes, image: np.ndarray) -> np.ndarray:
    structure = load_ssd(content)
    runner = TensorRunner(model_with_outputs(structure, [structure.score_tensor]))
    from PIL import Image

    pixels = np.asarray(Image.fromarray(image).resize((16, 16), Image.BILINEAR))[None]
    return runner.run(pixels_to_input(pixels, structure.input_dtype), raw=True)[0]


def _iou(a, b) -> float:
    return float(box_iou(np.asarray([a], np.float32), np.asarray([b], np.float32))[0, 0])


def test_reads_ssd_structure_by_graph(tiny):
    structure = load_ssd(tiny["model"].read_bytes())
    assert structure.options.num_classes == 2 and structure.scores_per_anchor == 3 and structure.label_offset == 1
    assert [p.kernel for p in structure.predictors] == [(3, 3), (1, 1)]
    assert [(p.height, p.width, p.anchors_per_location, p.anchor_offset) for p in structure.predictors] == [
        (8, 8, 2, 0), (4, 4, 2, 128)]
    assert structure.anchors.shape == (160, 4)
    np.testing.assert_allclose(structure.anchors[0], [0.0625, 0.0625, 0.25, 0.25])
    assert structure.options.y_scale == 10.0 and not structure.options.use_regular_nms


def test_add_class_keeps_old_scores_bit_identical_and_detects_the_new_one(tiny, extended):
    old, new = tiny["model"].read_bytes(), extended.read_bytes()
    for seed, (colour, cell) in enumerate([("blue", (2, 3)), ("green", (5, 5)), ("red", (3, 4)), (None, None)]):
        image = square_image(colour, cell, seed=500 + seed)
        before, after = _raw_scores(old, image), _raw_scores(new, image)
        assert after.shape == (1, 160, 4)
        assert np.array_equal(before, after[..., :3])
    structure = load_ssd(new)
    assert structure.options.num_classes == 3 and structure.options.use_regular_nms
    detector = Detector(extended)
    assert detector.labels == ["blue", "green", "red"]
    for index, cell in enumerate([(2, 5), (4, 1), (6, 6), (1, 2)]):
        result = detector.detect(square_image("red", cell, seed=900 + index), score_threshold=0.5)
        assert result.detections and result.detections[0].label == "red"
        assert _iou(result.detections[0].box, square_box(cell)) > 0.7
    assert not [d for d in detector.detect(square_image(None, None, seed=7), 0.5).detections if d.label == "red"]
    blue = detector.detect(square_image("blue", (3, 3), seed=8), 0.5).detections
    assert blue[0].label == "blue" and _iou(blue[0].box, square_box((3, 3))) > 0.7


@pytest.mark.parametrize("precision", ["int8", "float32"])
def test_add_class_to_int8_per_channel_and_float_detectors(tiny, tmp_path, precision):
    model = build_tiny_ssd(tmp_path / f"{precision}.tflite", precision=precision)
    out = tmp_path / f"{precision}_red.tflite"
    add_detector_classes(model, tiny["labels"], tiny["data"], ["red"], out, options=OPTIONS)
    for seed, (colour, cell) in enumerate([("blue", (2, 3)), ("red", (3, 4))]):
        image = square_image(colour, cell, seed=600 + seed)
        assert np.array_equal(_raw_scores(model.read_bytes(), image), _raw_scores(out.read_bytes(), image)[..., :3])
    before, after = load_ssd(model.read_bytes()), load_ssd(out.read_bytes())
    if precision == "int8":  # per-channel: old scales kept, new rows got their own
        old_scales = before.graph.quantization(before.predictors[0].weights_tensor)[0].reshape(2, 3)
        new_scales = after.graph.quantization(after.predictors[0].weights_tensor)[0].reshape(2, 4)
        assert np.array_equal(old_scales, new_scales[:, :3]) and (new_scales[:, 3] > 0).all()
    best = Detector(out).detect(square_image("red", (2, 4), seed=5), score_threshold=0.5).detections[0]
    assert best.label == "red" and _iou(best.box, square_box((2, 4))) > 0.7


def test_rows_are_interleaved_per_anchor_and_old_rows_copied(tiny, extended):
    before, after = load_ssd(tiny["model"].read_bytes()), load_ssd(extended.read_bytes())
    for old_p, new_p in zip(before.predictors, after.predictors):
        old_w = before.graph.constant(old_p.weights_tensor, dequantize=False)
        new_w = after.graph.constant(new_p.weights_tensor, dequantize=False)
        old_b = before.graph.constant(old_p.bias_tensor, dequantize=False)
        new_b = after.graph.constant(new_p.bias_tensor, dequantize=False)
        anchors = old_p.anchors_per_location
        assert new_w.shape[0] == anchors * 4
        assert np.array_equal(new_w.reshape(anchors, 4, -1)[:, :3], old_w.reshape(anchors, 3, -1))
        assert np.array_equal(new_b.reshape(anchors, 4)[:, :3], old_b.reshape(anchors, 3))
        assert before.graph.quantization(old_p.weights_tensor)[0][0] == after.graph.quantization(new_p.weights_tensor)[0][0]


def test_labels_file_and_embedded_metadata(tiny, extended):
    labels_file = extended.with_name("tiny92.labels.txt")
    assert labels_file.read_text().splitlines() == ["???", "blue", "green", "red"]
    content = extended.read_bytes()
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        assert archive.read(EMBEDDED_LABELS_FILE).decode().splitlines() == ["blue", "green", "red"]
        info = json.loads(archive.read("edgeadapt.json"))
    assert info["added"] == ["red"] and info["nms"] == "regular"
    model = load_ssd(content).graph.model
    entry = [m for m in model.metadata if (m.name.decode() if isinstance(m.name, bytes) else m.name) == "TFLITE_METADATA"]
    buffer = bytes(np.asarray(model.buffers[entry[0].buffer].data, np.uint8))
    assert buffer[4:8] == b"M001"
    # walk the TFLite Support ModelMetadata flatbuffer: subgraph -> output tensors -> names, label file
    from flatbuffers import table

    def sub(tab, slot):
        offset = tab.Offset(4 + 2 * slot)
        return table.Table(bytearray(buffer), tab.Indirect(offset + tab.Pos))

    def items(tab, slot):
        offset = tab.Offset(4 + 2 * slot)
        start = tab.Vector(offset)
        return [table.Table(bytearray(buffer), tab.Indirect(start + 4 * i)) for i in range(tab.VectorLen(offset))]

    def text(tab, slot):
        return tab.String(tab.Offset(4 + 2 * slot) + tab.Pos).decode()

    root = table.Table(bytearray(buffer), int.from_bytes(buffer[:4], "little"))
    outputs = items(items(root, 3)[0], 3)
    assert [text(t, 0) for t in outputs] == ["location", "category", "score", "number of detections"]
    label_file = items(outputs[1], 6)[0]
    assert text(label_file, 0) == EMBEDDED_LABELS_FILE
    assert buffer[label_file.Pos + label_file.Offset(8)] == 3  # TENSOR_VALUE_LABELS
    content = sub(outputs[0], 3)
    assert buffer[content.Pos + content.Offset(4)] == 3  # location: BoundingBoxProperties


def test_fast_nms_option_and_options_roundtrip(tiny, tmp_path):
    out = tmp_path / "fast.tflite"
    add_detector_classes(tiny["model"], tiny["labels"], tiny["data"], ["red"], out,
                         options=DetectorOptions(nms="fast", use_cache=False, progress=False, training=TRAINING))
    options = load_ssd(out.read_bytes()).options
    assert not options.use_regular_nms and options.num_classes == 3
    again = PostProcessOptions.from_flexbuffer(np.frombuffer(options.to_flexbuffer(), np.uint8))
    assert again == options


def test_embedding_cache_gives_the_same_model(tiny, tmp_path):
    cached = DetectorOptions(cache_dir=tmp_path / "cache", progress=False, training=TRAINING)
    lines = tiny["labels"].read_text().splitlines()
    annotations = load_new_classes(tiny["data"], ["red"], lines[1:])
    first = extend_detector(tiny["model"].read_bytes(), lines, annotations, options=cached)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 30
    second = extend_detector(tiny["model"].read_bytes(), lines, annotations, options=cached)
    # the same model up to float summation order: numpy/BLAS kernels may sum in another order for
    # arrays at another memory alignment (cached vs fresh), which can move a new row's int8 value by 1
    a, b = np.frombuffer(first.content, np.uint8), np.frombuffer(second.content, np.uint8)
    assert a.shape == b.shape
    differing = np.flatnonzero(a != b)
    assert differing.size <= 16, differing.size
    assert set(((a[differing].astype(int) - b[differing].astype(int)) % 256).tolist()) <= {1, 255}


def test_matching_positive_negative_ignored():
    anchors = np.asarray([[0.5, 0.5, 0.2, 0.2], [0.5, 0.55, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]], np.float32)
    boxes = corners(anchors)
    labels = match(boxes, boxes, np.asarray([[0.4, 0.4, 0.6, 0.6]], np.float32), np.asarray([0]), 1, TrainingOptions())
    assert labels[:, 0].tolist() == [1, -1, 0]  # exact, IoU 0.6 (between 0.5 and 0.7: ignored), far


def test_cli_add_classes_and_device_detect(tiny, tmp_path, capsys):
    from edgeadapt.cli import main
    from edgeadapt.device.cli import main as device_main

    out = tmp_path / "cli.tflite"
    code = main(["detector", "add-classes", str(tiny["model"]), "--labels", str(tiny["labels"]), "--data",
                 str(tiny["data"]), "--classes", "red", "--out", str(out), "--no-cache", "--quiet", "--steps", "300",
                 "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_classes"] == 3 and result["added"] == ["red"] and result["verified_images"] >= 1
    from PIL import Image

    image_path = tmp_path / "red.png"
    Image.fromarray(square_image("red", (2, 2), seed=77)).save(image_path)
    assert device_main(["detect", str(out), str(image_path), "--json"]) == 0
    detections = json.loads(capsys.readouterr().out)["results"][0]["detections"]
    assert detections[0]["label"] == "red" and _iou(detections[0]["box"], square_box((2, 2))) > 0.7


# ----------------------------------------------------------------------------- bad input: typed errors, nothing written
def _assert_refused(error_type, match_text, tiny, tmp_path, *, model=None, labels=None, data=None, classes=("red",)):
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    with pytest.raises(error_type, match=match_text):
        add_detector_classes(model or tiny["model"], labels or tiny["labels"], data or tiny["data"], list(classes),
                             out_dir / "new.tflite", options=OPTIONS)
    assert list(out_dir.iterdir()) == []


def test_refuses_a_classifier(tiny, tmp_path):
    model = build_tiny_ssd(tmp_path / "classifier.tflite", variant="classifier")
    _assert_refused(IncompatibleModelError, "classifier", tiny, tmp_path, model=model)


def test_refuses_a_detector_without_postprocess(tiny, tmp_path):
    model = build_tiny_ssd(tmp_path / "raw.tflite", variant="raw_head")
    _assert_refused(IncompatibleModelError, "no TFLite_Detection_PostProcess", tiny, tmp_path, model=model)


@pytest.mark.parametrize("variant", ["shared_head", "duplicated_head"])
def test_refuses_a_shared_class_head(tiny, tmp_path, variant):
    model = build_tiny_ssd(tmp_path / f"{variant}.tflite", variant=variant)
    _assert_refused(IncompatibleModelError, "shared across feature maps", tiny, tmp_path, model=model)


def test_refuses_labelmap_of_wrong_length(tiny, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("???\nblue\ngreen\nyellow\n")
    _assert_refused(IncompatibleModelError, "4 lines but the model has 2 classes", tiny, tmp_path, labels=labels)


def test_refuses_a_class_already_in_the_labelmap(tiny, tmp_path):
    _assert_refused(InputError, "already in the labelmap", tiny, tmp_path, classes=("blue",))


def _bad_data(tmp_path: Path, objects, size=None, name="red") -> Path:
    folder = tmp_path / "bad"
    shutil.rmtree(folder, ignore_errors=True)
    write_red_squares(folder / name, 3, seed=2)
    write_voc(folder / name, "zz-bad", square_image("red", (2, 2)), objects, size=size)
    return folder


@pytest.mark.parametrize("objects, message", [
    ([("red", (20, 4, 40, 12))], "outside the 32x32 image"),
    ([("red", (-9, 4, 8, 12))], "outside"),
    ([("red", (10, 10, 10, 20))], "empty"),
    ([], "no <object>"),
    ([("racoon", (6, 6, 14, 14))], r"\['racoon'\] are neither new classes"),
])
def test_refuses_bad_voc_files(tiny, tmp_path, objects, message):
    _assert_refused(DatasetError, message, tiny, tmp_path, data=_bad_data(tmp_path, objects))


def test_refuses_voc_object_without_box_and_wrong_size(tiny, tmp_path):
    folder = _bad_data(tmp_path, [("red", (6, 6, 14, 14))])
    xml = folder / "red" / "zz-bad.xml"
    xml.write_text(xml.read_text().replace("<bndbox>", "<box>").replace("</bndbox>", "</box>"))
    _assert_refused(DatasetError, "no <bndbox>", tiny, tmp_path, data=folder)
    folder = _bad_data(tmp_path, [("red", (6, 6, 14, 14))], size=(64, 64))
    _assert_refused(DatasetError, "<size> says 64x64", tiny, tmp_path, data=folder)
    (folder / "red" / "zz-bad.xml").write_text("<annotation><object>")
    _assert_refused(DatasetError, "not a readable Pascal VOC", tiny, tmp_path, data=folder)


def test_refuses_missing_class_folder_and_existing_output(tiny, tmp_path):
    _assert_refused(DatasetError, "is not a folder", tiny, tmp_path, classes=("purple",))
    out = tmp_path / "exists.tflite"
    out.write_bytes(b"keep")
    with pytest.raises(InputError, match="--overwrite"):
        add_detector_classes(tiny["model"], tiny["labels"], tiny["data"], ["red"], out, options=OPTIONS)
    assert out.read_bytes() == b"keep"
    with pytest.raises(InputError, match="nms"):
        extend_detector(tiny["model"].read_bytes(), ["???", "blue", "green"], {}, options=DetectorOptions(nms="slow"))


def test_reads_coco_json_annotations(tmp_path):
    from PIL import Image

    folder = tmp_path / "red"
    folder.mkdir()
    Image.fromarray(square_image("red", (2, 2))).save(folder / "a.png")
    (folder / "instances.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [6, 6, 8, 8]}],
        "categories": [{"id": 7, "name": "red"}]}))
    items = read_coco(folder / "instances.json")
    assert items[0].labels == ("red",)
    np.testing.assert_allclose(items[0].boxes[0], [6 / 32, 6 / 32, 14 / 32, 14 / 32])
    item = read_voc(write_voc(folder, "b", square_image("red", (1, 1)), [("red", (2, 2, 10, 10))]))
    np.testing.assert_allclose(item.boxes[0], [2 / 32, 2 / 32, 10 / 32, 10 / 32])


# ----------------------------------------------------------------------------- the real COCO SSD
DATA = Path(os.environ.get("EDGEADAPT_DATA", Path(__file__).resolve().parents[2] / ".." / "shared" / "data"))
DETECTION = DATA / "detection"


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.skipif(not (DETECTION / "ssd_mobilenet_v1_coco_quant.tflite").is_file(), reason="needs ../shared/data")
def test_real_coco_ssd_gets_raccoon_and_kangaroo(tmp_path):
    from edgeadapt.benchmarks.detection import split_holdout

    out = tmp_path / "ssd92.tflite"
    lines = (DETECTION / "labelmap.txt").read_text().splitlines()
    annotations = load_new_classes(DETECTION, ["raccoon", "kangaroo"], lines[1:])
    train, held = {}, {}
    for name, items in annotations.items():
        train[name], held[name] = split_holdout(items)
    coco = sorted((DETECTION / "coco_old").glob("*.jpg"))
    extended = extend_detector((DETECTION / "ssd_mobilenet_v1_coco_quant.tflite").read_bytes(), lines, train, coco[::2],
                               DetectorOptions(cache_dir=tmp_path / "cache", progress=False))
    out.write_bytes(extended.content)
    assert extended.verified_images >= 1 and len(extended.labels) == 92
    detector = Detector(out)
    assert detector.labels[-2:] == ["raccoon", "kangaroo"]
    hits = 0
    for name in ("raccoon", "kangaroo"):
        for item in held[name][:10]:
            result = detector.detect(str(item.image), score_threshold=0.3)
            truth = [(b[1] * item.width, b[0] * item.height, b[3] * item.width, b[2] * item.height) for b in item.boxes]
            hits += any(d.label == name and max(_iou(d.box, t) for t in truth) >= 0.5 for d in result.detections)
    assert hits >= 14  # of 20 held-out photos (the benchmark measures AP50 on all of them)


def test_cli_errors_exit_1_with_a_message(tiny, tmp_path, capsys):
    from edgeadapt.cli import main

    classifier = build_tiny_ssd(tmp_path / "classifier.tflite", variant="classifier")
    code = main(["detector", "add-classes", str(classifier), "--labels", str(tiny["labels"]), "--data",
                 str(tiny["data"]), "--classes", "red", "--out", str(tmp_path / "x.tflite"), "--no-cache", "--quiet"])
    assert code == 1 and "classifier" in capsys.readouterr().err and not (tmp_path / "x.tflite").exists()
    assert main(["bench", "detection", "--data", str(tmp_path)]) == 1
    assert "is missing; pass --data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["detector", "add-classes", str(tiny["model"]), "--labels", str(tiny["labels"]), "--data", "d",
              "--classes", "red", "--out", "x.tflite", "--nms", "slow"])


def test_the_detection_benchmark_without_pycocotools_names_the_extra(monkeypatch):
    """A missing mAP scorer is a one-line error naming `pip install 'edgeadapt[detection]'` (checked before the work)."""
    import importlib.util

    from edgeadapt.benchmarks.detection import require_pycocotools
    from edgeadapt.device.errors import BackendUnavailableError

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "pycocotools" else real_find_spec(name, *args))
    with pytest.raises(BackendUnavailableError, match=r"edgeadapt\[detection\]"):
        require_pycocotools()
