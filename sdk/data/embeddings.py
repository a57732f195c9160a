"""Embedding computation with an on-disk cache: the backbone runs once per image."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import sys

import numpy as np

from edgeadapt.device.console import progress_enabled
from edgeadapt.device.manifest import InputSpec
from edgeadapt.device.preprocessing import pixel_table
from edgeadapt.device.safefs import durable_write

if TYPE_CHECKING:  # pragma: no cover
    import keras

logger = logging.getLogger(__name__)


def normalize_pixels(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 pixels -> the float input the device feeds the backbone (:func:`pixel_table`'s rule).

    Args:
        images: uint8 images (any shape).
        spec: The input spec (pixel scale and offset).

    Returns:
        float32 values of the same shape.
    """
    return pixel_table(spec)[images]


def compute_embeddings(
    backbone: "keras.Model", images: np.ndarray, spec: InputSpec, batch_size: int = 128, progress: bool = True
) -> np.ndarray:
    """Run the Keras backbone over uint8 images (N, H, W, C) in batches; (N, D) float32.

    Images are normalised batch by batch inside a tf.data pipeline, so memory stays at one
    batch of floats; Keras shows its progress bar when ``progress`` and there are many batches.

    Args:
        backbone: The Keras backbone (image -> embedding).
        images: uint8 images (N, H, W, C) prepared for ``spec``.
        spec: The input spec (pixel scale and offset).
        batch_size: Images per inference batch.
        progress: Allow Keras' progress bar (only drawn on a terminal).

    Returns:
        The (N, D) float32 embeddings.

    Raises:
        InputError: When the images do not match ``spec``.
    """
    import tensorflow as tf

    if images.shape[0] == 0:
        return np.zeros((0, int(backbone.outputs[0].shape[-1])), np.float32)
    scale, offset = np.float32(spec.scale), np.float32(spec.offset)
    dataset = (
        tf.data.Dataset.from_tensor_slices(images)
        .batch(batch_size)
        .map(lambda batch: tf.cast(batch, tf.float32) * scale + offset)
        .prefetch(2)
    )
    # Keras draws its bar (with colour codes) on stdout: only on a terminal
    verbose = 1 if progress and images.shape[0] > 4 * batch_size and progress_enabled(sys.stdout) else 0
    return np.asarray(backbone.predict(dataset, verbose=verbose), dtype=np.float32)


class EmbeddingCache:
    """Caches embeddings in ``directory`` keyed by backbone fingerprint and image content.

    A second call with the same backbone and images loads a ``.npy`` file instead of
    running the backbone again.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    @staticmethod
    def key(fingerprint: str, images: np.ndarray, spec: InputSpec) -> str:
        digest = hashlib.sha256(fingerprint.encode())
        digest.update(repr((images.shape, spec.scale, spec.offset)).encode())
        digest.update(np.ascontiguousarray(images).tobytes())
        return digest.hexdigest()[:32]

    def embeddings(
        self, backbone: "keras.Model", fingerprint: str, images: np.ndarray, spec: InputSpec, progress: bool = True
    ) -> np.ndarray:
        path = self.directory / f"{self.key(fingerprint, images, spec)}.npy"
        if path.is_file():
            logger.info("embedding cache hit: %s", path.name)
            return np.load(path, allow_pickle=False)
        result = compute_embeddings(backbone, images, spec, progress=progress)
        durable_write(path, lambda handle: np.save(handle, result, allow_pickle=False))
        return result
