"""Add classes to an SSD detector: read, embed (cached), match, train the new rows, rewrite, verify, write.

:func:`add_detector_classes` is what ``edgeadapt detector add-classes`` runs. It writes
``NEW.tflite`` and ``NEW.labels.txt`` (same format as the input labelmap) only after the new
file loaded in LiteRT and gave bit-identical old-class scores on sample images; on any error
nothing is written.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from edgeadapt.detection.annotations import (
    ImageBoxes,
    class_names_from_labelmap,
    load_new_classes,
    read_labelmap,
)
from edgeadapt.detection.features import FeatureExtractor, default_cache_dir, extract_all, load_pixels
from edgeadapt.detection.rewrite import NMS_MODES, add_rows, serialize
from edgeadapt.detection.runner import TensorRunner, model_with_outputs, pixels_to_input
from edgeadapt.detection.structure import SSDStructure, load_ssd
from edgeadapt.detection.training import TrainingOptions, corners, match, train_new_rows
from edgeadapt.device.errors import ConversionError, DatasetError, InputError
from edgeadapt.device.preprocessing import list_image_files
from edgeadapt.device.safefs import durable_write_all

logger = logging.getLogger(__name__)
VERIFY_IMAGES = 4


@dataclass(frozen=True)
class DetectorOptions:
    """Options of :func:`add_detector_classes`.

    Attributes:
        nms: ``regular`` (per-class NMS, default: new boxes cannot take old classes' slots) or ``fast``.
        cache_dir: where per-image embeddings are cached (``None``: the default user cache).
        use_cache: set False to recompute every embedding.
        progress: show a progress bar while embedding.
        num_threads: LiteRT threads (``None``: its default).
        training: matching and optimiser settings.
    """

    nms: str = "regular"
    cache_dir: Path | None = None
    use_cache: bool = True
    progress: bool = True
    num_threads: int | None = None
    training: TrainingOptions = field(default_factory=TrainingOptions)


@dataclass
class ExtendedDetector:
    """The result of :func:`extend_detector` (nothing written yet)."""

    content: bytes
    labels: list[str]
    labelmap_lines: list[str]
    added: list[str]
    boxes_per_class: dict[str, int]
    images_per_class: dict[str, int]
    negative_images: int
    positive_anchors: dict[str, int]
    embed_seconds: float
    train_seconds: float
    verified_images: int


@dataclass
class AddClassesResult:
    """What :func:`add_detector_classes` wrote and measured."""

    model: Path
    labels_file: Path
    num_classes: int
    added: list[str]
    nms: str
    images_per_class: dict[str, int]
    boxes_per_class: dict[str, int]
    negative_images: int
    positive_anchors: dict[str, int]
    embed_seconds: float
    train_seconds: float
    total_seconds: float
    verified_images: int
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["model"], data["labels_file"] = str(self.model), str(self.labels_file)
        return data

    def summary(self) -> str:
        per_class = ", ".join(f"{name} ({self.images_per_class[name]} images, {self.boxes_per_class[name]} boxes, "
                              f"{self.positive_anchors[name]} positive anchors)" for name in self.added)
        return (f"wrote {self.model} ({self.size_bytes / 1024:.0f} KiB, {self.num_classes} classes, {self.nms} NMS) and "
                f"{self.labels_file}\nadded: {per_class}; negatives: {self.negative_images} images\n"
                f"old-class scores bit-identical on {self.verified_images} images; embedding {self.embed_seconds:.1f} s, "
                f"training {self.train_seconds:.1f} s, total {self.total_seconds:.1f} s")


def labels_path_for(out: Path) -> Path:
    """``NEW.tflite`` -> ``NEW.labels.txt`` beside it."""
    return out.with_name(out.stem + ".labels.txt")


def negative_images(folder: str | Path | None) -> list[Path]:
    """Image files directly in ``folder`` (sorted); empty without a folder.

    Raises:
        DatasetError: the folder does not exist or holds no image.
    """
    if folder is None:
        return []
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"--negatives {folder} is not a folder of photos without the new classes")
    images = list_image_files(folder)
    if not images:
        raise DatasetError(f"--negatives {folder} holds no JPEG/PNG/BMP image")
    return images


def check_classes(classes: Sequence[str], old_names: Sequence[str]) -> list[str]:
    """Validate the new class names against each other and the model's labels.

    Raises:
        InputError: empty, duplicated, or already a class of the model.
    """
    names = [str(name).strip() for name in classes]
    if not names or not all(names):
        raise InputError("give at least one new class name (comma-separated, no empty names)")
    if len(set(names)) != len(names):
        raise InputError(f"class names {names} contain duplicates")
    existing = {name.lower() for name in old_names}
    taken = [name for name in names if name.lower() in existing]
    if taken:
        raise InputError(f"class(es) {taken} are already in the labelmap; the model detects them already "
                         "(pick another name, or fine-tune that class instead)")
    return names


def _verify(original: SSDStructure, extended: bytes, images: Sequence[Path], spec: Any, width: int) -> int:
    """Run both models on ``images``: old score columns must be bit-identical; returns the count."""
    new_structure = load_ssd(extended)
    before = TensorRunner(model_with_outputs(original, [original.score_tensor]))
    after = TensorRunner(model_with_outputs(new_structure, [new_structure.score_tensor]))
    for image in images:
        batch = pixels_to_input(load_pixels(image, spec)[None], original.input_dtype)
        old = before.run(batch, raw=True)[0]
        new = after.run(batch, raw=True)[0]
        if not np.array_equal(old, new[..., :width]):
            raise ConversionError("internal error: the extended detector changed old-class scores; nothing was written")
    TensorRunner(extended).run(pixels_to_input(load_pixels(images[0], spec)[None], original.input_dtype))
    return len(images)


def extend_detector(content: bytes, labelmap: Sequence[str], annotations: dict[str, list[ImageBoxes]],
                    negatives: Sequence[Path] = (), options: DetectorOptions = DetectorOptions()) -> ExtendedDetector:
    """Learn the classes of ``annotations`` and return the extended ``.tflite`` bytes (nothing is written).

    Args:
        content: the detector file's bytes.
        labelmap: its labelmap lines (``num_classes`` or ``num_classes + 1`` with a background line 0).
        annotations: new class name -> annotated images (boxes of new classes only).
        negatives: photos that contain none of the new classes.
        options: see :class:`DetectorOptions`.

    Returns:
        The :class:`ExtendedDetector`.

    Raises:
        IncompatibleModelError: not an SSD detector this module can extend, or a labelmap that does not fit.
        InputError: bad class names or NMS mode.
        DatasetError: bad or missing annotations.
    """
    if options.nms not in NMS_MODES:
        raise InputError(f"--nms {options.nms!r}: choose one of {', '.join(NMS_MODES)}")
    structure = load_ssd(content)
    old_names = class_names_from_labelmap(labelmap, structure.options.num_classes)
    classes = check_classes(list(annotations), old_names)
    if not all(annotations[name] for name in classes):
        raise DatasetError(f"every new class needs annotated images; got {[(n, len(annotations[n])) for n in classes]}")
    sha = hashlib.sha256(bytes(content)).hexdigest()
    cache = (options.cache_dir or default_cache_dir()) if options.use_cache else None
    extractor = FeatureExtractor(structure, sha, cache_dir=cache, num_threads=options.num_threads)
    items = [item for name in classes for item in annotations[name]]
    started = time.perf_counter()
    features = extract_all(extractor, [item.image for item in items] + list(negatives), progress=options.progress)
    embed_seconds = time.perf_counter() - started
    started = time.perf_counter()
    anchor_boxes = corners(structure.anchors)
    labels = []
    for position, feature in enumerate(features):
        if position < len(items):
            item = items[position]
            gt_classes = np.asarray([classes.index(label) for label in item.labels], np.int64)
            labels.append(match(feature.boxes, anchor_boxes, item.boxes, gt_classes, len(classes), options.training))
        else:
            labels.append(np.zeros((structure.num_anchors, len(classes)), np.int8))
    positives = {name: int(sum(int((lab[:, k] == 1).sum()) for lab in labels)) for k, name in enumerate(classes)}
    rows = train_new_rows(structure, extractor, features, labels, len(classes), options.training)
    train_seconds = time.perf_counter() - started
    original = load_ssd(content)
    add_rows(structure, rows, nms=options.nms)
    names = old_names + classes
    lines = (list(labelmap[:1]) if len(labelmap) == len(old_names) + 1 else []) + names
    info = {"added": classes, "nms": options.nms, "base_classes": len(old_names), "source_sha256": sha,
            "labelmap_format": "line i = class i (index of the category output)"}
    extended = serialize(structure, labels=names, info=info)
    verify = [item.image for item in items[:: max(1, len(items) // VERIFY_IMAGES)]][:VERIFY_IMAGES]
    verified = _verify(original, extended, verify, extractor.spec, original.scores_per_anchor)
    return ExtendedDetector(
        content=extended, labels=names, labelmap_lines=lines, added=classes,
        boxes_per_class={n: sum(item.labels.count(n) for item in items) for n in classes},
        images_per_class={n: len(annotations[n]) for n in classes}, negative_images=len(negatives),
        positive_anchors=positives, embed_seconds=embed_seconds, train_seconds=train_seconds, verified_images=verified)


def add_detector_classes(model: str | Path, labelmap: str | Path, data: str | Path, classes: Sequence[str],
                         out: str | Path, negatives: str | Path | None = None,
                         options: DetectorOptions = DetectorOptions(), overwrite: bool = False) -> AddClassesResult:
    """Add ``classes`` (folders of ``data`` with Pascal VOC / COCO boxes) to the detector ``model``.

    Writes ``out`` and ``out``'s ``.labels.txt`` beside it; nothing is written on error.

    Args:
        model: the SSD ``.tflite`` (ends in ``TFLite_Detection_PostProcess``).
        labelmap: its labelmap (line 0 ``???`` then one class per line, or one class per line).
        data: folder with one sub-folder per new class (images + ``.xml`` or ``.json``).
        classes: the new class names (sub-folders of ``data``).
        out: the new ``.tflite`` path.
        negatives: optional folder of photos without the new classes (hard negatives).
        options: see :class:`DetectorOptions`.
        overwrite: replace existing output files.

    Returns:
        The :class:`AddClassesResult`.

    Raises:
        EdgeAdaptError: a subclass that says what was wrong (model, labels, data, output path).
    """
    started = time.perf_counter()
    model, out = Path(model), Path(out)
    if out.suffix != ".tflite":
        raise InputError(f"--out {out} must end in .tflite")
    labels_file = labels_path_for(out)
    if model.resolve() == out.resolve():
        raise InputError("--out must differ from the input model; the original file is never changed")
    if not overwrite and (out.exists() or labels_file.exists()):
        raise InputError(f"{out} or {labels_file} exists; pass --overwrite to replace them")
    if not out.parent.is_dir():
        raise InputError(f"the folder of --out ({out.parent}) does not exist; create it first")
    try:
        content = model.read_bytes()
    except OSError as error:
        raise InputError(f"cannot read the model {model}: {error}") from error
    lines = read_labelmap(labelmap)
    structure = load_ssd(content)  # refuse non-detectors before reading any data
    old_names = class_names_from_labelmap(lines, structure.options.num_classes, str(labelmap))
    names = check_classes(classes, old_names)
    annotations = load_new_classes(data, names, old_names)
    extended = extend_detector(content, lines, annotations, negative_images(negatives), options)
    durable_write_all({out: extended.content, labels_file: ("\n".join(extended.labelmap_lines) + "\n").encode("utf-8")})
    return AddClassesResult(
        model=out, labels_file=labels_file, num_classes=len(extended.labels), added=extended.added, nms=options.nms,
        images_per_class=extended.images_per_class, boxes_per_class=extended.boxes_per_class,
        negative_images=extended.negative_images, positive_anchors=extended.positive_anchors,
        embed_seconds=round(extended.embed_seconds, 2), train_seconds=round(extended.train_seconds, 2),
        total_seconds=round(time.perf_counter() - started, 2), verified_images=extended.verified_images,
        size_bytes=len(extended.content))
