"""Box annotations: Pascal VOC XML and COCO JSON readers, and the labelmap file.

Boxes are returned normalised to the image, ``ymin, xmin, ymax, xmax`` in 0..1 (the
detector's output convention). Every problem is a :class:`~edgeadapt.device.errors.DatasetError`
that names the file and says what to fix.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
from edgeadapt.device.errors import DatasetError, IncompatibleModelError
from edgeadapt.device.preprocessing import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)
#: Boxes may stick out of the image by this many pixels (rounding in annotation tools); they are clipped.
EDGE_TOLERANCE_PIXELS = 2.0


@dataclass(frozen=True)
class ImageBoxes:
    """The boxes of one image: ``boxes`` (M, 4) float32 normalised ymin, xmin, ymax, xmax; ``labels`` (M names)."""

    image: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: tuple[str, ...]


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError) as error:
        raise DatasetError(f"cannot read image {path}: {error}; remove or replace it") from error


def _normalise(path: Path, width: int, height: int, pixel_boxes: list[tuple[float, float, float, float]],
               labels: list[str]) -> ImageBoxes:
    boxes = []
    for (xmin, ymin, xmax, ymax), label in zip(pixel_boxes, labels):
        if (xmin < -EDGE_TOLERANCE_PIXELS or ymin < -EDGE_TOLERANCE_PIXELS or xmax > width + EDGE_TOLERANCE_PIXELS
                or ymax > height + EDGE_TOLERANCE_PIXELS):
            raise DatasetError(
                f"{path}: box {label!r} ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}) lies outside the {width}x{height} image; "
                "fix the annotation (xmin/ymin/xmax/ymax in pixels)")
        xmin, xmax = max(0.0, xmin), min(float(width), xmax)
        ymin, ymax = max(0.0, ymin), min(float(height), ymax)
        if xmax - xmin < 1 or ymax - ymin < 1:
            raise DatasetError(f"{path}: box {label!r} is empty (xmin >= xmax or ymin >= ymax); fix the annotation")
        boxes.append((ymin / height, xmin / width, ymax / height, xmax / width))
    return ImageBoxes(path, width, height, np.asarray(boxes, np.float32).reshape(-1, 4), tuple(labels))


def _text(element: ElementTree.Element, tag: str, path: Path) -> str:
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise DatasetError(f"{path}: <{tag}> is missing; every <object> needs <name> and <bndbox> xmin/ymin/xmax/ymax")
    return child.text.strip()


def read_voc(xml_path: str | Path, image_path: str | Path | None = None) -> ImageBoxes:
    """Read one Pascal VOC annotation.

    Args:
        xml_path: the ``.xml`` file.
        image_path: its image (default: ``<filename>`` beside the XML, else the XML's stem + an image suffix).

    Returns:
        The image's boxes (names as written, stripped).

    Raises:
        DatasetError: unreadable XML, no ``<object>``, missing fields, boxes outside the image or empty.
    """
    path = Path(xml_path)
    try:
        root = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, OSError) as error:
        raise DatasetError(f"{path}: not a readable Pascal VOC XML file ({error})") from error
    if image_path is None:
        filename = root.findtext("filename")
        candidates = [path.parent / filename] if filename else []
        candidates += [path.with_suffix(suffix) for suffix in IMAGE_SUFFIXES + tuple(s.upper() for s in IMAGE_SUFFIXES)]
        image_path = next((c for c in candidates if c.is_file()), None)
        if image_path is None:
            raise DatasetError(f"{path}: its image is missing (looked for {[c.name for c in candidates[:3]]}...)")
    image_path = Path(image_path)
    width, height = _image_size(image_path)
    size = root.find("size")
    if size is not None and size.findtext("width") and size.findtext("height"):
        stated = (int(float(size.findtext("width"))), int(float(size.findtext("height"))))
        if stated != (0, 0) and stated != (width, height):
            raise DatasetError(f"{path}: <size> says {stated[0]}x{stated[1]} but {image_path.name} is {width}x{height}; "
                               "the boxes belong to another image size: re-export the annotation")
    objects = root.findall("object")
    if not objects:
        raise DatasetError(f"{path}: no <object>; every annotated image of a new class needs at least one box "
                           "(remove the file, or move the image to the negatives)")
    boxes, labels = [], []
    for element in objects:
        labels.append(_text(element, "name", path))
        box = element.find("bndbox")
        if box is None:
            raise DatasetError(f"{path}: an <object> has no <bndbox>; add xmin/ymin/xmax/ymax in pixels")
        try:
            boxes.append(tuple(float(_text(box, tag, path)) for tag in ("xmin", "ymin", "xmax", "ymax")))
        except ValueError as error:
            raise DatasetError(f"{path}: a box coordinate is not a number ({error})") from error
    return _normalise(image_path, width, height, boxes, labels)


def read_coco(json_path: str | Path, image_dir: str | Path | None = None) -> list[ImageBoxes]:
    """Read a COCO ``instances`` JSON (``images``, ``annotations``, ``categories``); images without boxes are skipped.

    Raises:
        DatasetError: unreadable JSON, missing keys, unknown category ids, bad boxes, missing images.
    """
    path = Path(json_path)
    folder = Path(image_dir) if image_dir is not None else path.parent
    try:
        data = json.loads(path.read_text())
        categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        images = {int(i["id"]): i for i in data["images"]}
        annotations = data["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DatasetError(f"{path}: not a COCO annotation file with images, annotations and categories ({error})") from error
    per_image: dict[int, list[tuple[tuple[float, float, float, float], str]]] = {}
    for entry in annotations:
        if entry.get("iscrowd"):
            continue
        category = int(entry["category_id"])
        if category not in categories:
            raise DatasetError(f"{path}: annotation {entry.get('id')} has unknown category id {category}")
        x, y, w, h = (float(value) for value in entry["bbox"])
        per_image.setdefault(int(entry["image_id"]), []).append(((x, y, x + w, y + h), categories[category]))
    result = []
    for image_id, entries in sorted(per_image.items()):
        info = images.get(image_id)
        if info is None:
            raise DatasetError(f"{path}: annotations refer to image id {image_id}, which is not in 'images'")
        image_path = folder / info["file_name"]
        if not image_path.is_file():
            raise DatasetError(f"{path}: image {image_path} is missing")
        result.append(_normalise(image_path, int(info["width"]), int(info["height"]),
                                 [box for box, _ in entries], [name for _, name in entries]))
    return result


def read_class_folder(folder: str | Path) -> list[ImageBoxes]:
    """All annotated images of one class folder: Pascal VOC ``.xml`` files, or COCO ``.json`` files.

    Images without an annotation file are skipped (logged).

    Raises:
        DatasetError: no annotation in the folder, or a bad annotation file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder; --data needs one sub-folder per new class")
    result = [read_voc(xml_path) for xml_path in sorted(folder.glob("*.xml"))]
    for json_path in sorted(folder.glob("*.json")):
        result += read_coco(json_path)
    if not result:
        raise DatasetError(f"{folder} has no Pascal VOC (.xml) or COCO (.json) annotations; add boxed photos")
    annotated = {item.image.resolve() for item in result}
    skipped = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.resolve() not in annotated]
    if skipped:
        logger.warning("%s: %d images have no annotation and are not used (e.g. %s)", folder, len(skipped), skipped[0].name)
    return result


def load_new_classes(data_dir: str | Path, classes: Sequence[str], old_labels: Iterable[str] = ()) -> dict[str, list[ImageBoxes]]:
    """Read ``data_dir/<class>/`` for every new class; boxes of old classes are dropped, unknown names refused.

    Returns:
        class name -> annotated images, each image holding only the boxes of new classes.

    Raises:
        DatasetError: a folder is missing or bad, or a box names a class that is neither new nor old.
    """
    data_dir = Path(data_dir)
    known_old = {name for name in old_labels if name and name != "???"}
    result: dict[str, list[ImageBoxes]] = {}
    for name in classes:
        items = []
        for item in read_class_folder(data_dir / name):
            unknown = sorted({label for label in item.labels if label not in classes and label not in known_old})
            if unknown:
                raise DatasetError(
                    f"{item.image}: box label(s) {unknown} are neither new classes ({', '.join(classes)}) nor classes of "
                    "the model; fix the names in the annotation or add them to --classes")
            keep = [i for i, label in enumerate(item.labels) if label in classes]
            if not keep:
                raise DatasetError(f"{item.image}: no box of a new class ({', '.join(classes)}); remove it from {name}/")
            items.append(ImageBoxes(item.image, item.width, item.height, item.boxes[keep],
                                    tuple(item.labels[i] for i in keep)))
        result[name] = items
    return result


def read_labelmap(path: str | Path) -> list[str]:
    """Read a labelmap (one name per line; blank trailing lines dropped).

    Raises:
        DatasetError: unreadable or empty file.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"cannot read labelmap {path}: {error}") from error
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DatasetError(f"labelmap {path} is empty; give one class name per line")
    return [line.strip() for line in lines]


def class_names_from_labelmap(lines: Sequence[str], num_classes: int, path: str = "labelmap") -> list[str]:
    """Class names in model index order: line ``i + 1`` when line 0 is the ``???`` background placeholder.

    Raises:
        IncompatibleModelError: the labelmap has neither ``num_classes`` nor ``num_classes + 1`` lines.
    """
    if len(lines) == num_classes + 1:
        return list(lines[1:])
    if len(lines) == num_classes:
        return list(lines)
    raise IncompatibleModelError(
        f"{path} has {len(lines)} lines but the model has {num_classes} classes (expected {num_classes + 1} lines with a "
        f"background line 0, or {num_classes}); give the labelmap that belongs to this model")
