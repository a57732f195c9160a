"""Background embeddings for a bundle: a folder of ordinary, unlabelled photos run through its backbone.

``edgeadapt import MODEL --background DIR`` stores them with the head (``heads/vN/background.npy``,
float16), so that few-shot methods can calibrate a new class to claim only what is its own,
without labelled data of the model's classes (see docs/APPS.md, "Imported models and class
statistics").

    >>> background = embed_background(Path("photos/"), backbone_bytes, "tflite", spec, limit=1000)
    >>> background.embeddings.shape, background.embeddings.dtype
    ((1000, 1024), dtype('float16'))
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeadapt.device.errors import DatasetError, InputError
from edgeadapt.device.manifest import InputSpec
from edgeadapt.device.preprocessing import IMAGE_SUFFIXES, list_image_files, prepare_image

logger = logging.getLogger(__name__)

#: Default largest number of background photos embedded (``--background-limit``).
DEFAULT_BACKGROUND_LIMIT = 1000
#: Images prepared and embedded per interpreter call.
_CHUNK = 64


@dataclass(frozen=True)
class Background:
    """Background embeddings and where they came from.

    ``embeddings``: (N, D) float16 (float32 when a value does not fit float16).
    ``found``: image files in the folder; ``skipped``: files that could not be decoded.
    """

    folder: Path
    embeddings: np.ndarray
    found: int
    skipped: int

    @property
    def count(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.embeddings.nbytes)

    def describe(self) -> str:
        """One line for the import table, e.g. ``1000 of 4952 photos in coco/ (1000 x 1024 float16, 2.0 MiB)``."""
        size = self.nbytes
        shown = f"{size / 1024:.0f} KiB" if size < 1 << 20 else f"{size / (1 << 20):.1f} MiB"
        skipped = f", {self.skipped} unreadable skipped" if self.skipped else ""
        return (f"{self.count} of {self.found} photos in {self.folder} ({self.count} x {self.embeddings.shape[1]} "
                f"{self.embeddings.dtype.name}, {shown}{skipped})")


def background_files(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted; dot-files and dot-folders skipped).

    Raises:
        DatasetError: ``folder`` is not a folder or holds no image files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"background folder {str(folder)!r} does not exist or is not a folder")
    files = list_image_files(folder, recursive=True)
    if not files:
        raise DatasetError(
            f"background folder {str(folder)!r} holds no {'/'.join(IMAGE_SUFFIXES)} images; give a folder of "
            "ordinary photos (any subject, no labels needed); nothing was written"
        )
    return files


def load_background_images(folder: str | Path, spec: InputSpec, limit: int, seed: int = 0) -> np.ndarray:
    """Up to ``limit`` readable photos of ``folder`` prepared for ``spec`` (N, H, W, C) uint8, in the seeded order.

    Used as int8 calibration images when a Keras extractor is exported (ordinary photos are what
    calibration needs). Raises :class:`DatasetError` when none can be read.
    """
    files = background_files(folder)
    images = []
    for position in np.random.default_rng(seed).permutation(len(files)):
        if len(images) >= limit:
            break
        try:
            images.append(prepare_image(files[int(position)], spec))
        except (InputError, OSError, ValueError) as error:
            logger.warning("background: skipping unreadable %s (%s)", files[int(position)], error)
    if not images:
        raise DatasetError(f"none of the {len(files)} image files in background folder {str(folder)!r} could be "
                           "read; give a folder of ordinary photos; nothing was written")
    return np.stack(images)


def embed_background(
    folder: str | Path,
    backbone: bytes,
    model_format: str,
    spec: InputSpec,
    limit: int = DEFAULT_BACKGROUND_LIMIT,
    seed: int = 0,
) -> Background:
    """Embed up to ``limit`` readable photos of ``folder`` with a backbone file run by the device interpreter.

    The photos are taken in a fixed pseudo-random order (``seed``) over the sorted file list,
    so the same folder gives the same subsample; files that cannot be decoded are skipped.

    Args:
        folder: any folder of ordinary photos (searched recursively).
        backbone: the bundle's backbone file (bytes); ``model_format`` "tflite" or "onnx".
        spec: the bundle's input spec (how photos are prepared).
        limit: the most photos embedded (>= 1).
        seed: seed of the subsample order.

    Returns:
        The :class:`Background` (embeddings float16 unless a value overflows float16).

    Raises:
        InputError: ``limit`` < 1.
        DatasetError: no image in the folder can be read, or the backbone gives NaN/inf.
    """
    from edgeadapt.converters.parity import run_exported

    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InputError(f"the background limit must be a positive whole number, got {limit!r}")
    files = background_files(folder)
    order = np.random.default_rng(seed).permutation(len(files))
    parts: list[np.ndarray] = []
    taken = skipped = 0
    position = 0
    while taken < limit and position < len(order):
        images = []
        while len(images) < min(_CHUNK, limit - taken) and position < len(order):
            path = files[int(order[position])]
            position += 1
            try:
                images.append(prepare_image(path, spec))
            except (InputError, OSError, ValueError) as error:
                skipped += 1
                logger.warning("background: skipping unreadable %s (%s)", path, error)
        if images:
            parts.append(run_exported(backbone, model_format, spec, np.stack(images)))
            taken += len(images)
    if not parts:
        raise DatasetError(
            f"none of the {len(files)} image files in background folder {str(folder)!r} could be read; give a "
            "folder of ordinary photos; nothing was written"
        )
    embeddings = np.concatenate(parts).astype(np.float32)
    if not np.all(np.isfinite(embeddings)):
        raise DatasetError("the backbone gave NaN or infinite embeddings for background photos; nothing was written")
    half = embeddings.astype(np.float16)
    if np.all(np.isfinite(half)):
        embeddings = half
    else:
        logger.warning("background embeddings exceed the float16 range; stored as float32")
    logger.info("background: %d photos embedded (%d files, %d unreadable)", taken, len(files), skipped)
    return Background(folder=Path(folder), embeddings=embeddings, found=len(files), skipped=skipped)
