"""Representative data for post-training quantization.

Quantizers (the TFLite converter, onnxruntime.quantization) measure activation ranges
on real inputs. These helpers pick a calibration subset of real uint8 images and turn
it into the float inputs the backbone expects (``pixel * spec.scale + spec.offset``),
exactly as the device computes them (same float64 -> float32 lookup table as
:class:`edgeadapt.device.preprocessing.InputQuantizer`). Only numpy is used here.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from edgeadapt.device.errors import InputError
from edgeadapt.device.manifest import InputSpec
from edgeadapt.device.preprocessing import pixel_table


def check_image_batch(images_uint8: np.ndarray, spec: InputSpec, what: str = "calibration images") -> np.ndarray:
    """Return ``images_uint8`` as a (N, H, W, C) uint8 array matching ``spec``.

    A single (H, W, C) image becomes a batch of one; a (N, H, W) batch is accepted for
    grayscale specs. Raises :class:`InputError` naming the problem otherwise.
    """
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8:
        raise InputError(
            f"{what} have dtype {images.dtype}, expected uint8 pixels 0..255; "
            "give images prepared with edgeadapt.device.preprocessing.prepare_batch"
        )
    if images.ndim == 3 and spec.channels == 1 and images.shape[1:] == (spec.height, spec.width):
        images = images[..., None]
    elif images.ndim == 3 and images.shape == spec.shape:
        images = images[None]
    if images.ndim != 4 or images.shape[1:] != spec.shape:
        raise InputError(
            f"{what} have shape {images.shape}, expected (N, {spec.height}, {spec.width}, {spec.channels}) "
            "as the input spec says; resize them with edgeadapt.device.preprocessing.prepare_batch"
        )
    if images.shape[0] == 0:
        raise InputError(f"{what} are empty; give at least one real image")
    return images


#: The 256-entry float32 table ``pixel -> pixel * spec.scale + spec.offset`` (the device's rule).
normalization_table = pixel_table


def normalized_batches(images_uint8: np.ndarray, spec: InputSpec, batch_size: int = 1) -> Iterator[np.ndarray]:
    """Yield float32 model inputs (b, H, W, C), b <= ``batch_size``, from uint8 images.

    The values are ``pixel * spec.scale + spec.offset``, identical to what the device
    feeds a float model. The last batch may be smaller.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    images = check_image_batch(images_uint8, spec)
    table = normalization_table(spec)
    for start in range(0, images.shape[0], batch_size):
        yield table[images[start : start + batch_size]]


def select_calibration_images(
    images_uint8: np.ndarray,
    labels: np.ndarray | None = None,
    count: int = 200,
    seed: int = 0,
) -> np.ndarray:
    """Pick up to ``count`` images for calibration, reproducibly for a given ``seed``.

    Without ``labels`` the images are a random subset. With ``labels`` (one per image)
    the selection is stratified: classes take turns, so every class is represented and
    no class dominates the activation ranges. All images are returned (shuffled) when
    there are no more than ``count``.
    """
    images = np.asarray(images_uint8)
    if images.ndim < 1 or images.shape[0] == 0:
        raise InputError("no calibration images given; give at least one real image")
    if count < 1:
        raise InputError(f"calibration count must be at least 1, got {count}")
    total = images.shape[0]
    rng = np.random.default_rng(seed)
    if labels is None:
        order = rng.permutation(total)[: min(count, total)]
        return images[order]
    labels = np.asarray(labels)
    if labels.shape[:1] != (total,):
        raise InputError(f"got {total} calibration images but labels of shape {labels.shape}; give one label per image")
    groups = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        groups.append(members[rng.permutation(members.size)])
    # Round-robin over the shuffled classes: take the i-th image of every class in turn.
    selected: list[int] = []
    depth = 0
    while len(selected) < count:
        row = [int(group[depth]) for group in groups if depth < group.size]
        if not row:
            break
        rng.shuffle(row)
        selected.extend(row[: count - len(selected)])
        depth += 1
    return images[np.asarray(selected, dtype=np.int64)]
