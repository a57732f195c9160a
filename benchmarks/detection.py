"""``edgeadapt bench detection``: add classes to a real COCO SSD and measure what changed.

Figures (all printed by :func:`format_table`, or as JSON):

- old classes: pycocotools mAP@[.5:.95] and AP50 on COCO photos, before and after, under the
  same post-processing (fast NMS and regular/per-class NMS);
- bit-identity of the old classes' raw scores (every anchor, every photo);
- new classes: AP50 per class on held-out photos (every 4th photo of each class by sorted
  name, never used for training), with regular NMS and fast NMS;
- false positives: new-class detections scoring >= 0.5 on COCO photos (held-out half, and all);
- ms per image (Detector.detect, LiteRT, best of 3 passes) at 1 and 2 threads, and the add-classes wall time
  (cold embedding cache: embedding + matching + training + rewrite + verification).

The COCO photos are split in two by sorted name: the even ones are the ``--negatives`` of
training, the odd ones are never seen; mAP is reported on all photos and on the unseen half.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from edgeadapt.detection.add_classes import DetectorOptions, extend_detector
from edgeadapt.detection.annotations import ImageBoxes, load_new_classes, read_coco, read_labelmap
from edgeadapt.detection.features import input_spec, load_pixels
from edgeadapt.detection.rewrite import serialize, set_postprocess
from edgeadapt.detection.runner import TensorRunner, model_with_outputs, pixels_to_input
from edgeadapt.detection.structure import load_ssd
from edgeadapt.device.errors import BackendUnavailableError, DatasetError

MODEL_FILE = "ssd_mobilenet_v1_coco_quant.tflite"
HOLDOUT_EVERY = 4
TIMING_PASSES = 3


@dataclass(frozen=True)
class DetectionBenchOptions:
    """Options of :func:`run_detection_bench`."""

    data: Path
    classes: tuple[str, ...] = ("raccoon", "kangaroo")
    timing_images: int = 20
    threads: tuple[int, ...] = (1, 2)
    progress: bool = True


@dataclass
class DetectionBenchResult:
    """Every figure of the benchmark (see the module docstring)."""

    old_map: dict[str, dict[str, float]] = field(default_factory=dict)
    old_scores_identical: dict[str, Any] = field(default_factory=dict)
    new_ap50: dict[str, dict[str, float]] = field(default_factory=dict)
    false_positives: dict[str, dict[str, int]] = field(default_factory=dict)
    ms_per_image: dict[str, dict[str, float]] = field(default_factory=dict)
    add_classes_seconds: float = 0.0
    embed_seconds: float = 0.0
    train_seconds: float = 0.0
    split: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def split_holdout(items: Sequence[ImageBoxes]) -> tuple[list[ImageBoxes], list[ImageBoxes]]:
    """(train, held-out): every ``HOLDOUT_EVERY``-th image by sorted file name is held out."""
    ordered = sorted(items, key=lambda item: item.image.name)
    held = [item for i, item in enumerate(ordered) if i % HOLDOUT_EVERY == 0]
    return [item for i, item in enumerate(ordered) if i % HOLDOUT_EVERY != 0], held


def _detections(runner: TensorRunner, pixels: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes, classes, scores, count = runner.run(pixels_to_input(pixels[None], dtype))
    total = int(count.reshape(-1)[0])
    return boxes.reshape(-1, 4)[:total], classes.reshape(-1)[:total].astype(int), scores.reshape(-1)[:total]


def _coco_eval(ground_truth: list[dict[str, Any]], images: list[dict[str, Any]], categories: list[int],
               results: list[dict[str, Any]]) -> tuple[float, float, dict[int, float]]:
    """(mAP@[.5:.95], AP50, per-category AP50) with pycocotools, quietly."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = {"images": images, "annotations": ground_truth,
                         "categories": [{"id": c, "name": str(c)} for c in categories]}
        truth.createIndex()
        if not results:
            return 0.0, 0.0, {c: 0.0 for c in categories}
        detected = truth.loadRes(results)
        evaluation = COCOeval(truth, detected, "bbox")
        evaluation.params.catIds = categories
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    precision = evaluation.eval["precision"]  # [iou, recall, category, area, maxdets]
    per_category = {}
    for position, category in enumerate(categories):
        values = precision[0, :, position, 0, -1]
        values = values[values > -1]
        per_category[category] = float(values.mean()) if values.size else 0.0
    return float(evaluation.stats[0]), float(evaluation.stats[1]), per_category


def _as_results(image_id: int, width: int, height: int, boxes: np.ndarray, classes: np.ndarray, scores: np.ndarray,
                keep: Any) -> list[dict[str, Any]]:
    results = []
    for box, index, score in zip(boxes, classes, scores):
        if not keep(int(index)):
            continue
        ymin, xmin, ymax, xmax = np.clip(box, 0, 1)
        results.append({"image_id": image_id, "category_id": int(index) + 1, "score": float(score),
                        "bbox": [float(xmin * width), float(ymin * height), float((xmax - xmin) * width),
                                 float((ymax - ymin) * height)]})
    return results


def _gt_entries(items: Sequence[ImageBoxes], category_of: Any) -> tuple[list[dict], list[dict]]:
    images, annotations = [], []
    for image_id, item in enumerate(items, start=1):
        images.append({"id": image_id, "width": item.width, "height": item.height, "file_name": item.image.name})
        for box, label in zip(item.boxes, item.labels):
            ymin, xmin, ymax, xmax = box
            w, h = (xmax - xmin) * item.width, (ymax - ymin) * item.height
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_of(label),
                                "bbox": [float(xmin * item.width), float(ymin * item.height), float(w), float(h)],
                                "area": float(w * h), "iscrowd": 0})
    return images, annotations


@dataclass
class _BenchData:
    """The benchmark's inputs: the SSD, its labels, the new classes' train/held-out photos, the COCO photos."""

    content: bytes
    lines: list[str]
    train: dict[str, list[ImageBoxes]]
    held: dict[str, list[ImageBoxes]]
    coco: list[ImageBoxes]
    negatives: list[Path]
    unseen: set[str]

    @property
    def old_names(self) -> list[str]:
        return self.lines[1:]


def require_pycocotools() -> None:
    """Check that the mAP scorer is installed, before any of the benchmark's minutes of work.

    Raises:
        BackendUnavailableError: ``pycocotools`` is missing; the message names the extra.
    """
    if importlib.util.find_spec("pycocotools") is None:
        raise BackendUnavailableError("the detection benchmark scores mAP with pycocotools, which is not installed: "
                                      "pip install 'edgeadapt[detection]'")


def run_detection_bench(options: DetectionBenchOptions) -> DetectionBenchResult:
    """Run the whole benchmark on ``options.data`` (the ``detection`` folder of the shared data).

    Args:
        options: The data folder, the new classes, timing images and thread counts.

    Returns:
        Every figure of the benchmark (see the module docstring).

    Raises:
        DatasetError: the data folder lacks the model, labelmap, class folders or coco_old.
        BackendUnavailableError: ``pycocotools`` (the mAP scorer) is not installed.
    """
    data = _load_bench_data(options)
    require_pycocotools()
    result = DetectionBenchResult(split={
        "train_images": {n: len(v) for n, v in data.train.items()},
        "heldout_images": {n: len(v) for n, v in data.held.items()},
        "coco_negatives": len(data.negatives), "coco_unseen": len(data.unseen), "coco_annotated": len(data.coco),
        "coco_unseen_annotated": sum(item.image.name in data.unseen for item in data.coco)})

    with tempfile.TemporaryDirectory() as cache:
        started = time.perf_counter()
        extended = extend_detector(data.content, data.lines, data.train, data.negatives,
                                   DetectorOptions(nms="regular", cache_dir=Path(cache), progress=options.progress))
        result.add_classes_seconds = round(time.perf_counter() - started, 2)
    result.embed_seconds = round(extended.embed_seconds, 2)
    result.train_seconds = round(extended.train_seconds, 2)

    models = {
        "original/fast": _variant(data.content, "fast"), "original/regular": _variant(data.content, "regular"),
        "added/fast": _variant(extended.content, "fast"), "added/regular": _variant(extended.content, "regular"),
    }
    spec = input_spec(models["original/fast"][1])
    dtype = models["original/fast"][1].input_dtype
    runners = {name: TensorRunner(model) for name, (model, _) in models.items()}
    coco_pixels = [load_pixels(item.image, spec) for item in data.coco]
    _measure_old_classes(result, runners, data, coco_pixels, dtype)
    held_items = [item for name in options.classes for item in data.held[name]]
    result.old_scores_identical = _old_scores_identical(data.content, extended.content,
                                                        coco_pixels + [load_pixels(item.image, spec)
                                                                       for item in held_items], dtype)
    _measure_new_classes(result, runners, held_items, len(data.old_names), options.classes, spec, dtype)
    result.ms_per_image = _latency({name: models[name][0] for name in models}, coco_pixels, options)
    return result


def _load_bench_data(options: DetectionBenchOptions) -> _BenchData:
    """Read the data folder: check every needed file, split the new classes' photos and the COCO photos."""
    data = Path(options.data)
    if (data / "detection" / MODEL_FILE).is_file():
        data = data / "detection"
    for needed in (MODEL_FILE, "labelmap.txt", "coco_old/instances.json", *options.classes):
        if not (data / needed).exists():
            raise DatasetError(f"{data / needed} is missing; pass --data pointing at the detection data folder")
    content = (data / MODEL_FILE).read_bytes()
    lines = read_labelmap(data / "labelmap.txt")
    annotations = load_new_classes(data, list(options.classes), lines[1:])
    train, held = {}, {}
    for name, items in annotations.items():
        train[name], held[name] = split_holdout(items)
    coco = sorted(read_coco(data / "coco_old" / "instances.json"), key=lambda item: item.image.name)
    coco_all = sorted(p for p in (data / "coco_old").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return _BenchData(content, lines, train, held, coco, negatives=coco_all[0::2],
                      unseen={p.name for p in coco_all[1::2]})


def _variant(source: bytes, nms: str) -> tuple[bytes, Any]:
    """The SSD ``source`` with ``nms`` post-processing: (model bytes, its structure)."""
    structure = load_ssd(source)
    set_postprocess(structure, structure.options.num_classes, nms)
    return serialize(structure), structure


def _measure_old_classes(result: DetectionBenchResult, runners: dict[str, TensorRunner], data: _BenchData,
                         coco_pixels: list[np.ndarray], dtype: str) -> None:
    """Old-class mAP/AP50 on all and on unseen COCO photos, and new-class false positives there."""
    coco, old_names = data.coco, data.old_names
    old_count = len(old_names)
    coco_images, coco_truth = _gt_entries(coco, lambda label: old_names.index(label) + 1)
    categories = sorted({entry["category_id"] for entry in coco_truth})
    raw_fp = {}
    for name, runner in runners.items():
        for subset, chosen in (("all", range(len(coco))),
                               ("unseen", [i for i, it in enumerate(coco) if it.image.name in data.unseen])):
            results, fps = [], 0
            for position in chosen:
                item = coco[position]
                boxes, classes, scores = _detections(runner, coco_pixels[position], dtype)
                results += _as_results(position + 1, item.width, item.height, boxes, classes, scores,
                                       lambda index: index < old_count)
                fps += int(((classes >= old_count) & (scores >= 0.5)).sum())
            ids = {position + 1 for position in chosen}
            mean_ap, ap50, _ = _coco_eval([t for t in coco_truth if t["image_id"] in ids],
                                          [i for i in coco_images if i["id"] in ids], categories, results)
            result.old_map.setdefault(name, {})[f"mAP_{subset}"] = round(mean_ap, 4)
            result.old_map[name][f"AP50_{subset}"] = round(ap50, 4)
            raw_fp.setdefault(name, {})[subset] = fps
    result.false_positives = {name: value for name, value in raw_fp.items() if name.startswith("added")}


def _old_scores_identical(content: bytes, extended: bytes, photos: list[np.ndarray], dtype: str) -> dict[str, Any]:
    """Bit-identity of the old scores (raw score tensor, every anchor) on ``photos``."""
    before = load_ssd(content)
    after = load_ssd(extended)
    score_before = TensorRunner(model_with_outputs(before, [before.score_tensor]))
    score_after = TensorRunner(model_with_outputs(after, [after.score_tensor]))
    width = before.scores_per_anchor
    checked, identical = 0, 0
    for pixels in photos:
        batch = pixels_to_input(pixels[None], dtype)
        old = score_before.run(batch, raw=True)[0]
        new = score_after.run(batch, raw=True)[0]
        checked += 1
        identical += int(np.array_equal(old, new[..., :width]))
    return {"images": checked, "identical": identical, "all": identical == checked}


def _measure_new_classes(result: DetectionBenchResult, runners: dict[str, TensorRunner],
                         held_items: list[ImageBoxes], old_count: int, new_classes: Sequence[str], spec: Any,
                         dtype: str) -> None:
    """New classes: AP50 on held-out photos of every new class together."""
    new_index = {name: old_count + k for k, name in enumerate(new_classes)}
    held_images, held_truth = _gt_entries(held_items, lambda label: new_index[label] + 1)
    new_categories = [new_index[name] + 1 for name in new_classes]
    for name in ("added/regular", "added/fast"):
        results = []
        for image_id, item in enumerate(held_items, start=1):
            boxes, classes, scores = _detections(runners[name], load_pixels(item.image, spec), dtype)
            results += _as_results(image_id, item.width, item.height, boxes, classes, scores,
                                   lambda index: index >= old_count)
        _, _, per_category = _coco_eval(held_truth, held_images, new_categories, results)
        result.new_ap50[name] = {cls: round(per_category[new_index[cls] + 1], 4) for cls in new_classes}


def _latency(models: dict[str, bytes], coco_pixels: list[np.ndarray],
             options: DetectionBenchOptions) -> dict[str, dict[str, float]]:
    """ms per image of the device Detector (LiteRT) for each model and thread count, best of the passes."""
    from edgeadapt.device.detector import Detector

    ms_per_image: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in ("original/fast", "original/regular", "added/fast", "added/regular"):
            path = Path(folder) / (name.replace("/", "_") + ".tflite")
            path.write_bytes(models[name])
            for threads in options.threads:
                detector = Detector(path, num_threads=threads)
                frames = [np.asarray(pixels) for pixels in coco_pixels[: options.timing_images]]
                detector.detect(frames[0])
                passes = []
                for _ in range(TIMING_PASSES):  # best pass: the CPU is shared, other jobs only add time
                    started = time.perf_counter()
                    for frame in frames:
                        detector.detect(frame)
                    passes.append((time.perf_counter() - started) / max(len(frames), 1))
                elapsed = min(passes)
                ms_per_image.setdefault(name, {})[f"{threads}_threads"] = round(elapsed * 1000, 2)
    return ms_per_image


def format_table(result: DetectionBenchResult) -> str:
    """The benchmark as a readable table."""
    lines = ["old classes on COCO photos (pycocotools; 'unseen' = photos not used as negatives)",
             (f"{'model':<18} {'mAP all':>8} {'AP50 all':>9} {'mAP unseen':>11} {'AP50 unseen':>12} "
              f"{'ms 1 thr':>9} {'ms 2 thr':>9}")]
    for name, values in result.old_map.items():
        timing = result.ms_per_image.get(name, {})
        lines.append(f"{name:<18} {values['mAP_all']:>8.4f} {values['AP50_all']:>9.4f} {values['mAP_unseen']:>11.4f} "
                     f"{values['AP50_unseen']:>12.4f} {timing.get('1_threads', float('nan')):>9.2f} "
                     f"{timing.get('2_threads', float('nan')):>9.2f}")
    for mode in ("fast", "regular"):
        before, after = result.old_map[f"original/{mode}"], result.old_map[f"added/{mode}"]
        lines.append(f"old mAP change, {mode} NMS: {after['mAP_all'] - before['mAP_all']:+.4f} (all), "
                     f"{after['mAP_unseen'] - before['mAP_unseen']:+.4f} (unseen)")
    same = result.old_scores_identical
    lines.append(f"old scores bit-identical: {same['identical']}/{same['images']} images (every anchor, 91 columns)")
    lines.append("new classes, AP50 on held-out photos: " + "; ".join(
        f"{name}: " + ", ".join(f"{cls} {value:.3f}" for cls, value in values.items())
        for name, values in result.new_ap50.items()))
    lines.append("new-class detections >= 0.5 on COCO photos: " + "; ".join(
        f"{name}: {values['unseen']} on {result.split['coco_unseen_annotated']} unseen, {values['all']} on "
        f"{result.split['coco_annotated']}"
        for name, values in result.false_positives.items()))
    lines.append(f"add-classes run: {result.add_classes_seconds:.1f} s (embedding {result.embed_seconds:.1f} s, "
                 f"matching + training {result.train_seconds:.1f} s); split {json.dumps(result.split)}")
    return "\n".join(lines)
