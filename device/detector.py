"""Object detection on the device: run an SSD ``.tflite`` that ends in ``TFLite_Detection_PostProcess``.

TensorFlow-free: LiteRT or tflite-runtime (chosen as :mod:`edgeadapt.device.backends` does),
numpy and Pillow. Boxes come back in image pixels of the original image.

Labels come from ``labels=`` (a labelmap file: when its first line is the ``???`` background
placeholder, class index i is line i + 1, otherwise line i) or, when not given, from the
``labelmap.txt`` that ``edgeadapt detector add-classes`` embeds in the model (line i = class i).
"""

from __future__ import annotations

import importlib
import io
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from edgeadapt.device.backends import AUTO_ORDER, BACKENDS, _module_available
from edgeadapt.device.errors import BackendUnavailableError, BundleError, InputError
from edgeadapt.device.manifest import InputSpec
from edgeadapt.device.preprocessing import ImageSource, load_image, prepare_image

BACKGROUND_NAMES = ("???", "background", "__background__")
EMBEDDED_LABELS = "labelmap.txt"


def pixels_to_input(pixels: np.ndarray, dtype: str) -> np.ndarray:
    """(N, H, W, C) uint8 pixels -> the detector's input: uint8 as is, int8 ``p - 128``, float ``p / 127.5 - 1``."""
    if dtype == "uint8":
        return pixels
    if dtype == "int8":
        return (pixels.astype(np.int16) - 128).astype(np.int8)
    return pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def labels_from_lines(lines: Sequence[str]) -> list[str]:
    """Class names by class index from labelmap lines (a leading background placeholder is dropped)."""
    lines = [line.strip() for line in lines]
    while lines and not lines[-1]:
        lines.pop()
    return lines[1:] if lines and lines[0] in BACKGROUND_NAMES else lines


def embedded_labels(content: bytes) -> list[str] | None:
    """The ``labelmap.txt`` packed in the model's associated-files zip (line i = class i), if any."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            return archive.read(EMBEDDED_LABELS).decode("utf-8").splitlines()
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError):
        return None


@dataclass(frozen=True)
class Detection:
    """One box: ``box`` is (xmin, ymin, xmax, ymax) in pixels of the original image."""

    label: str
    index: int
    score: float
    box: tuple[float, float, float, float]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["box"] = [round(value, 2) for value in self.box]
        data["score"] = round(self.score, 6)
        return data


@dataclass(frozen=True)
class DetectionResult:
    """The detections of one image (sorted by score, highest first) and the image size."""

    detections: tuple[Detection, ...]
    width: int
    height: int

    def to_dict(self) -> dict[str, Any]:
        return {"width": self.width, "height": self.height, "detections": [d.to_dict() for d in self.detections]}


class Detector:
    """An SSD detector in LiteRT / tflite-runtime.

    Args:
        model: path of the ``.tflite`` file.
        labels: labelmap file (optional; default: the labels embedded in the model, else ``class_<i>``).
        backend: ``auto``, ``litert`` or ``tflite-runtime``.
        num_threads: interpreter threads (``None``: the backend's default).

    Raises:
        BundleError: the file cannot be read or is not a detector with the post-process outputs.
        BackendUnavailableError: no TFLite interpreter is installed.
    """

    def __init__(self, model: str | Path, labels: str | Path | None = None, backend: str = "auto",
                 num_threads: int | None = None):
        path = Path(model)
        try:
            content = path.read_bytes()
        except OSError as error:
            raise BundleError(f"cannot read the detector {path}: {error}") from error
        self.backend_name = _pick_backend(backend)
        module = importlib.import_module(BACKENDS[self.backend_name][0])
        try:
            self.interpreter = module.Interpreter(model_content=content, num_threads=num_threads)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as error:
            raise BundleError(f"{self.backend_name} cannot load {path.name}: {error}") from error
        detail = self.interpreter.get_input_details()[0]
        shape = [int(value) for value in detail["shape"]]
        if len(shape) != 4 or shape[3] not in (1, 3):
            raise BundleError(f"{path.name} has input shape {shape}; a detector takes one [1, H, W, 3] image")
        self._input_index = detail["index"]
        self._input_dtype = np.dtype(detail["dtype"]).name
        self.spec = InputSpec(height=shape[1], width=shape[2], channels=shape[3],
                              color_order="RGB" if shape[3] == 3 else "GRAY", resize="stretch")
        self._outputs = _postprocess_outputs(self.interpreter.get_output_details(), path.name)
        if labels is not None:
            try:
                lines = Path(labels).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as error:
                raise InputError(f"cannot read labels {labels}: {error}") from error
            self.labels = labels_from_lines(lines)
        else:
            self.labels = [line.strip() for line in (embedded_labels(content) or [])]

    def label(self, index: int) -> str:
        """The name of class ``index`` (``class_<index>`` when unknown)."""
        return self.labels[index] if 0 <= index < len(self.labels) else f"class_{index}"

    def detect(self, image: ImageSource, score_threshold: float = 0.5) -> DetectionResult:
        """Detect objects in one image (path, PIL image or HxWxC uint8 array).

        Args:
            image: the image, any size (it is stretched to the model input).
            score_threshold: drop boxes scoring below this.

        Returns:
            The :class:`DetectionResult`.

        Raises:
            InputError: the image cannot be read.
        """
        array = load_image(image)
        height, width = array.shape[:2]
        pixels = prepare_image(array, self.spec)[None]
        self.interpreter.set_tensor(self._input_index, pixels_to_input(pixels, self._input_dtype))
        self.interpreter.invoke()
        boxes, classes, scores, count = (self.interpreter.get_tensor(index) for index in self._outputs)
        total = int(np.asarray(count).reshape(-1)[0])
        boxes = np.clip(boxes.reshape(-1, 4)[:total], 0.0, 1.0)
        classes = classes.reshape(-1)[:total]
        scores = scores.reshape(-1)[:total]
        detections = []
        for box, index, score in zip(boxes, classes, scores):
            if score < score_threshold:
                continue
            ymin, xmin, ymax, xmax = (float(value) for value in box)
            detections.append(Detection(self.label(int(index)), int(index), float(score),
                                        (xmin * width, ymin * height, xmax * width, ymax * height)))
        detections.sort(key=lambda d: -d.score)
        return DetectionResult(tuple(detections), int(width), int(height))


def _pick_backend(backend: str) -> str:
    tflite_backends = [name for name in AUTO_ORDER if BACKENDS[name][1] == "tflite"]
    if backend != "auto" and backend not in tflite_backends:
        raise BackendUnavailableError(f"backend {backend!r} cannot run a .tflite detector; choose auto or "
                                      f"{', '.join(tflite_backends)}")
    for name in tflite_backends if backend == "auto" else [backend]:
        if _module_available(BACKENDS[name][0]):
            return name
    raise BackendUnavailableError("no TFLite interpreter is installed: pip install 'edgeadapt[litert]' "
                                  "(or 'edgeadapt[tflite]')")


def _postprocess_outputs(details: list[dict[str, Any]], name: str) -> tuple[int, int, int, int]:
    """Output indices (boxes, classes, scores, count) of the post-process operator."""
    if len(details) != 4:
        raise BundleError(f"{name} has {len(details)} outputs; a detector ending in TFLite_Detection_PostProcess has "
                          "4 (boxes, classes, scores, count)")
    by_suffix = {}
    for detail in details:
        text = str(detail.get("name", ""))
        suffix = text.rsplit(":", 1)[1] if ":" in text else "0"
        by_suffix[suffix] = detail["index"]
    if sorted(by_suffix) == ["0", "1", "2", "3"]:
        return by_suffix["0"], by_suffix["1"], by_suffix["2"], by_suffix["3"]
    boxes = [d for d in details if len(d["shape"]) == 3 and int(d["shape"][-1]) == 4]
    counts = [d for d in details if int(np.prod(d["shape"])) == 1]
    rest = [d for d in details if d not in boxes and d not in counts]
    if len(boxes) != 1 or len(counts) != 1 or len(rest) != 2:
        raise BundleError(f"{name}: cannot tell boxes/classes/scores/count apart in its outputs; not an SSD detector")
    return boxes[0]["index"], rest[0]["index"], rest[1]["index"], counts[0]["index"]
