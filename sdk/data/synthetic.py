"""A built-in procedural dataset of shapes: no download, deterministic per seed.

Each image is a noisy background of a random colour with one shape drawn in a
contrasting random colour, at a random position, scale and small rotation. The shape,
not the colour, defines the class, so every class stays distinguishable in grayscale.
Drawing is vectorised numpy (masks from coordinate grids).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from edgeadapt.data.image_folders import Dataset, ImageSet, SplitOptions
from edgeadapt.device.errors import InputError
from edgeadapt.device.manifest import InputSpec

SHAPE_NAMES = ("circle", "square", "triangle", "cross", "ring", "stripes", "diamond", "checker")

_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2, as in device preprocessing
_MIN_CONTRAST = 70.0  # minimum luma difference between shape and background
_MAX_ROTATION = np.deg2rad(15.0)  # small enough that a square never looks like a diamond


@dataclass(frozen=True)
class SyntheticOptions:
    """Size and randomness of the synthetic shapes dataset."""

    num_classes: int = 6
    images_per_class: int = 120
    image_size: int = 32
    channels: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.num_classes <= len(SHAPE_NAMES):
            raise InputError(f"num_classes must be in 1..{len(SHAPE_NAMES)}, got {self.num_classes}")
        if self.images_per_class < 1:
            raise InputError(f"images_per_class must be at least 1, got {self.images_per_class}")
        if self.image_size < 8:
            raise InputError(f"image_size must be at least 8 pixels, got {self.image_size}")
        if self.channels not in (1, 3):
            raise InputError(f"channels must be 1 or 3, got {self.channels}")
        if self.seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {self.seed}")


def _shape_mask(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of shape ``name`` in local coordinates (u right, v down, radius 1)."""
    au, av = np.abs(u), np.abs(v)
    box = np.maximum(au, av)
    if name == "circle":
        return u * u + v * v <= 0.9
    if name == "square":
        return box <= 0.8
    if name == "triangle":  # apex up, base down
        return (v >= -0.95) & (v <= 0.75) & (au <= (v + 0.95) * 0.6)
    if name == "cross":
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if name == "ring":
        radius = u * u + v * v
        return (radius <= 1.0) & (radius >= 0.36)
    if name == "stripes":  # three horizontal bars
        return (box <= 0.9) & (np.floor((v + 0.9) / 0.36).astype(np.int64) % 2 == 0)
    if name == "diamond":
        return au + av <= 1.0
    if name == "checker":  # 3 x 3 checkerboard
        cells = np.floor((u + 0.9) / 0.6) + np.floor((v + 0.9) / 0.6)
        return (box <= 0.9) & (cells.astype(np.int64) % 2 == 0)
    raise InputError(f"unknown shape {name!r}; known shapes: {SHAPE_NAMES}")


def _colours(rng: np.random.Generator, luma: np.ndarray) -> np.ndarray:
    """Random RGB colours whose luma is close to ``luma`` (N,) -> (N, 3) float."""
    chroma = rng.normal(0.0, 45.0, size=(len(luma), 3))
    chroma -= (chroma @ _LUMA)[:, None]  # zero-luma tint: hue varies, brightness does not
    return np.clip(luma[:, None] + chroma, 0.0, 255.0)


def generate_images(options: SyntheticOptions) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Return ``(class_names, images, labels)``: (N, S, S, C) uint8 images grouped by class."""
    rng = np.random.default_rng(options.seed)
    size, per_class = options.image_size, options.images_per_class
    count = options.num_classes * per_class
    class_names = list(SHAPE_NAMES[: options.num_classes])
    labels = np.repeat(np.arange(options.num_classes, dtype=np.int64), per_class)

    # Per-image parameters, drawn once for all images.
    background_luma = rng.uniform(0.0, 255.0, size=count)
    room_up = np.maximum(255.0 - background_luma - _MIN_CONTRAST, 0.0)
    room_down = np.maximum(background_luma - _MIN_CONTRAST, 0.0)
    go_up = rng.uniform(size=count) * (room_up + room_down) < room_up
    distance = rng.uniform(size=count)
    foreground_luma = np.where(
        go_up,
        background_luma + _MIN_CONTRAST + distance * room_up,
        background_luma - _MIN_CONTRAST - distance * room_down,
    )
    background = _colours(rng, background_luma)
    foreground = _colours(rng, foreground_luma)
    radius = rng.uniform(0.35, 0.8, size=count) * size / 2.0
    centre = radius[:, None] + rng.uniform(size=(count, 2)) * (size - 2.0 * radius)[:, None]
    angle = rng.uniform(-_MAX_ROTATION, _MAX_ROTATION, size=count)
    noise_level = rng.uniform(6.0, 22.0, size=count)
    noise = rng.standard_normal((count, size, size, 3), dtype=np.float32)

    # Local coordinates of every pixel centre in every image: rotate, then scale to radius 1.
    grid = np.arange(size, dtype=np.float32) + 0.5
    dx = grid[None, None, :] - centre[:, 0, None, None]
    dy = grid[None, :, None] - centre[:, 1, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    scale = radius[:, None, None]
    u = (dx * cos + dy * sin) / scale
    v = (dy * cos - dx * sin) / scale

    mask = np.zeros((count, size, size), dtype=bool)
    for label, name in enumerate(class_names):
        rows = slice(label * per_class, (label + 1) * per_class)
        mask[rows] = _shape_mask(name, u[rows], v[rows])

    colour = np.where(mask[..., None], foreground[:, None, None, :], background[:, None, None, :])
    pixels = colour + noise * noise_level[:, None, None, None]
    if options.channels == 1:
        pixels = pixels @ _LUMA[:, None]
    images = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return class_names, images, labels


def synthetic_dataset(
    options: SyntheticOptions = SyntheticOptions(),
    split: SplitOptions = SplitOptions(),  # noqa: B008 (frozen)
) -> Dataset:
    """The synthetic shapes as a split :class:`Dataset` (no files involved).

    Args:
        options: Which shapes, how many images per class, image size and seed.
        split: Validation/test fractions and seed of the per-class split.

    Returns:
        The split dataset with its :class:`InputSpec` and class names.

    Raises:
        InputError: When an option is out of range.
    """
    class_names, images, labels = generate_images(options)
    spec = InputSpec(
        height=options.image_size,
        width=options.image_size,
        channels=options.channels,
        color_order="RGB" if options.channels == 3 else "GRAY",
    )
    everything = ImageSet(images, labels)
    return Dataset.split(class_names, everything, split, spec)
