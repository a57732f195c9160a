"""Per-anchor embeddings of a detector: the class predictors' input feature maps, cached on disk.

For every image the detector runs once (LiteRT) with the feature maps the class predictors
read and the box encodings as outputs. The maps are kept in their stored dtype (uint8 for a
quantized model: exactly the integers the predictor convolution multiplies), and the boxes are
decoded as the post-process operator decodes them. One ``.npz`` per image is cached under a
key of the model's sha256 and the image file's sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from edgeadapt.detection.runner import TensorRunner, box_scales, decode_boxes, model_with_outputs, pixels_to_input
from edgeadapt.detection.structure import SSDStructure
from edgeadapt.device.errors import DatasetError
from edgeadapt.device.manifest import InputSpec
from edgeadapt.device.safefs import durable_write

logger = logging.getLogger(__name__)
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/edgeadapt/detection`` (``~/.cache/...`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgeadapt" / "detection"


@contextlib.contextmanager
def truncated_images_allowed() -> Iterator[None]:
    """Let Pillow decode JPEGs whose last bytes are missing (common in scraped datasets), then restore."""
    from PIL import ImageFile

    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def input_spec(structure: SSDStructure) -> InputSpec:
    """How an image becomes the detector input: RGB, stretched to the model size, bilinear (as SSD apps do)."""
    height, width, channels = structure.input_shape
    return InputSpec(height=height, width=width, channels=channels, color_order="RGB" if channels == 3 else "GRAY",
                     resize="stretch", scale=1 / 127.5, offset=-1.0)


def load_pixels(path: Path, spec: InputSpec) -> np.ndarray:
    """(H, W, C) uint8 pixels of an image file, truncated JPEGs accepted.

    Raises:
        DatasetError: the image cannot be decoded.
    """
    from edgeadapt.device.errors import InputError
    from edgeadapt.device.preprocessing import prepare_image

    with truncated_images_allowed():
        try:
            return prepare_image(Path(path), spec)
        except (InputError, OSError) as error:
            raise DatasetError(f"cannot decode image {path}: {error}; remove or replace it") from error


@dataclass
class ImageFeatures:
    """``maps``: one (H, W, D) array per class predictor (stored dtype); ``boxes``: (N, 4) decoded boxes."""

    maps: list[np.ndarray]
    boxes: np.ndarray


class FeatureExtractor:
    """Runs the detector up to its class predictors' inputs and caches the result per image."""

    def __init__(self, structure: SSDStructure, model_sha256: str, cache_dir: Path | None = None,
                 num_threads: int | None = None):
        self.structure = structure
        self.spec = input_spec(structure)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._model_sha = model_sha256
        self._runner: TensorRunner | None = None
        self._num_threads = num_threads
        graph = structure.graph
        self.map_quantization = []
        for predictor in structure.predictors:
            scales, zero_points, _ = graph.quantization(predictor.feature_tensor)
            self.map_quantization.append((float(scales[0]) if scales.size else 0.0,
                                          int(zero_points[0]) if zero_points.size else 0))

    def _runner_for(self) -> TensorRunner:
        if self._runner is None:
            tensors = [p.feature_tensor for p in self.structure.predictors] + [self.structure.box_tensor]
            self._runner = TensorRunner(model_with_outputs(self.structure, tensors), num_threads=self._num_threads)
        return self._runner

    def _cache_path(self, image: Path) -> Path | None:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256(f"v{CACHE_VERSION}:{self._model_sha}:".encode())
        digest.update(Path(image).read_bytes())
        return self.cache_dir / f"{digest.hexdigest()[:40]}.npz"

    def compute(self, pixels: np.ndarray) -> ImageFeatures:
        """Features of one prepared (H, W, C) uint8 image."""
        runner = self._runner_for()
        outputs = runner.run(pixels_to_input(pixels[None], self.structure.input_dtype), raw=True)
        maps = [np.ascontiguousarray(value[0]) for value in outputs[:-1]]
        raw_encodings = outputs[-1].reshape(-1, 4)
        scale, zero_point = runner.outputs[-1]["quantization"]
        if raw_encodings.dtype.kind in "iu" and scale:
            encodings = (raw_encodings.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)
        else:
            encodings = raw_encodings.astype(np.float32)
        boxes = decode_boxes(encodings, self.structure.anchors, box_scales(self.structure))
        return ImageFeatures(maps, boxes)

    def __call__(self, image: Path) -> ImageFeatures:
        """Features of an image file, from the cache when possible."""
        path = self._cache_path(image)
        if path is not None and path.is_file():
            try:
                with np.load(path) as stored:
                    count = len(self.structure.predictors)
                    return ImageFeatures([stored[f"map{i}"] for i in range(count)], stored["boxes"])
            except (OSError, ValueError, KeyError):
                logger.warning("ignoring unreadable cache entry %s", path)
        features = self.compute(load_pixels(image, self.spec))
        if path is not None:
            durable_write(path, lambda handle: np.savez(
                handle, boxes=features.boxes, **{f"map{i}": m for i, m in enumerate(features.maps)}))
        return features

    def dequantize(self, index: int, values: np.ndarray) -> np.ndarray:
        """Float32 feature values of predictor ``index`` from stored values."""
        scale, zero_point = self.map_quantization[index]
        if values.dtype.kind in "iu" and scale:
            return (values.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)
        return values.astype(np.float32, copy=False)


def extract_all(extractor: FeatureExtractor, images: Sequence[Path], progress: bool = True,
                description: str = "embedding") -> list[ImageFeatures]:
    """Features of every image, with a tqdm progress bar when ``progress``."""
    iterator: Sequence[Path] = images
    if progress:
        try:
            from tqdm import tqdm

            iterator = tqdm(images, desc=description, unit="img", leave=False)
        except ImportError:  # pragma: no cover - tqdm is a host dependency
            pass
    return [extractor(Path(image)) for image in iterator]
