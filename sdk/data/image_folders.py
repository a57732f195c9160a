"""Image-folder datasets for host training: scan, deduplicate, split, decode.

A dataset folder holds one sub-folder per class with JPEG/PNG/BMP files inside.
Images are decoded and resized only through
:func:`edgeadapt.device.preprocessing.prepare_image`, so host training sees exactly
the pixels the device runtime sees. Pure numpy + Pillow (no TensorFlow).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from edgeadapt.device.errors import DatasetError, InputError
from edgeadapt.device.manifest import InputSpec
from edgeadapt.device.preprocessing import IMAGE_SUFFIXES, list_class_folders, list_image_files, prepare_image

logger = logging.getLogger(__name__)

_PROGRESS_MIN_IMAGES = 200


@dataclass(frozen=True)
class SplitOptions:
    """How a dataset is split into train / validation / test (stratified per class)."""

    validation_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("validation_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise InputError(f"{name} must be in [0, 1), got {value}")
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise InputError(
                "validation_fraction + test_fraction must be below 1 so that some images are "
                f"left for training, got {self.validation_fraction} + {self.test_fraction}"
            )
        if self.seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {self.seed}")


def _class_rng(seed: int, label: int) -> np.random.Generator:
    """A generator that depends only on (seed, label): classes are shuffled independently."""
    return np.random.default_rng([int(seed), int(label)])


@dataclass
class ImageSet:
    """One split in memory: (N, H, W, C) uint8 images with (N,) int64 labels."""

    images: np.ndarray
    labels: np.ndarray
    paths: list[str] | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise InputError(
                f"ImageSet images must be a (N, H, W, C) uint8 array, got {self.images.dtype} {self.images.shape}"
            )
        if len(self.images) != len(self.labels):
            raise InputError(f"{len(self.images)} images but {len(self.labels)} labels")
        if self.paths is not None and len(self.paths) != len(self.labels):
            raise InputError(f"{len(self.paths)} paths but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageSet:
        """The images at ``indices`` (in that order)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        paths = None if self.paths is None else [self.paths[i] for i in indices]
        return ImageSet(self.images[indices], self.labels[indices], paths)

    def select_classes(self, class_indices: Sequence[int], relabel: bool = True) -> ImageSet:
        """Keep only images of ``class_indices``; with ``relabel`` their labels become
        0..k-1 in the order given. Image order is preserved."""
        class_indices = [int(label) for label in class_indices]
        if len(set(class_indices)) != len(class_indices):
            raise InputError(f"class indices {class_indices} contain duplicates")
        keep = np.flatnonzero(np.isin(self.labels, class_indices))
        selected = self.subset(keep)
        if relabel:
            mapping = {old: new for new, old in enumerate(class_indices)}
            selected.labels = np.array([mapping[int(label)] for label in selected.labels], dtype=np.int64)
        return selected

    def per_class(self, shots: int, seed: int) -> ImageSet:
        """At most ``shots`` images per class, chosen deterministically from ``seed``.

        Each class is sampled from its own generator, so the choice for one class does not
        depend on which other classes are present. Image order is preserved."""
        if shots < 1:
            raise InputError(f"shots must be at least 1, got {shots}")
        if seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {seed}")
        chosen: list[np.ndarray] = []
        for label in np.unique(self.labels):
            members = np.flatnonzero(self.labels == label)
            if len(members) > shots:
                members = _class_rng(seed, label).choice(members, size=shots, replace=False)
            chosen.append(members)
        indices = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
        return self.subset(indices)


@dataclass
class Dataset:
    """A labelled dataset split three ways, plus the InputSpec used to prepare it."""

    class_names: list[str]
    train: ImageSet
    validation: ImageSet
    test: ImageSet
    spec: InputSpec

    @classmethod
    def split(cls, class_names: list[str], everything: ImageSet, options: SplitOptions, spec: InputSpec) -> Dataset:
        """``everything`` split three ways, stratified by class (see :func:`split_entries`).

        Args:
            class_names: The class names, in label order.
            everything: All images and labels.
            options: The split fractions and seed.
            spec: How the images were prepared.

        Returns:
            The dataset.
        """
        train, validation, test = split_entries(everything.labels, options)
        return cls(class_names=class_names, train=everything.subset(train), validation=everything.subset(validation),
                   test=everything.subset(test), spec=spec)

    def select_classes(self, names: Sequence[str]) -> Dataset:
        """Keep only the classes ``names`` in all splits; labels follow the order of ``names``."""
        names = list(names)
        unknown = [name for name in names if name not in self.class_names]
        if unknown:
            raise DatasetError(f"unknown classes {unknown}; the dataset has {self.class_names}")
        if len(set(names)) != len(names):
            raise DatasetError(f"class names {names} contain duplicates")
        indices = [self.class_names.index(name) for name in names]
        return Dataset(
            class_names=names,
            train=self.train.select_classes(indices),
            validation=self.validation.select_classes(indices),
            test=self.test.select_classes(indices),
            spec=self.spec,
        )


@dataclass(frozen=True)
class FolderEntry:
    """One image file of a dataset folder."""

    path: Path
    label: int
    digest: str = field(repr=False)  # sha256 hex of the file bytes


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def scan_image_folder(
    root: str | Path, classes: Sequence[str] | None = None, min_images: int = 2
) -> tuple[list[str], list[FolderEntry]]:
    """List the images of a dataset folder: ``root/<class name>/<image file>``.

    Classes are the sorted sub-folder names, or ``classes`` (a subset, in that order).
    Exact duplicate files (same sha256) are dropped, keeping the first one seen.
    Raises :class:`DatasetError` for a missing/empty root, an unknown class, or a class
    with fewer than ``min_images`` distinct images (2 by default, to split into train and
    test; 1 for few-shot class addition). Nothing on disk is changed.
    """
    root = Path(root)
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise DatasetError(
            f"dataset folder {str(root)!r} {what}; give a folder with one sub-folder of images per class"
        )
    available = [folder.name for folder in list_class_folders(root)]
    if not available:
        raise DatasetError(
            f"dataset folder {str(root)!r} has no class sub-folders; put each class's images "
            "in its own sub-folder, e.g. root/cat/*.jpg"
        )
    if classes is None:
        class_names = available
    else:
        class_names = list(classes)
        missing = [name for name in class_names if name not in available]
        if missing:
            raise DatasetError(f"dataset folder {str(root)!r} has no class folder(s) {missing}; available: {available}")
        if len(set(class_names)) != len(class_names):
            raise DatasetError(f"requested classes {class_names} contain duplicates")

    entries: list[FolderEntry] = []
    seen: dict[str, FolderEntry] = {}
    for label, name in enumerate(class_names):
        folder = root / name
        files = list_image_files(folder)
        if not files:
            raise DatasetError(
                f"class folder {str(folder)!r} has no images; add {'/'.join(IMAGE_SUFFIXES)} files or remove the folder"
            )
        kept = dropped = 0
        for path in files:
            digest = _file_digest(path)
            first = seen.get(digest)
            if first is not None:
                dropped += 1
                if first.label != label:
                    logger.warning(
                        "%s is an exact copy of %s from class %r; keeping only the first",
                        path,
                        first.path,
                        class_names[first.label],
                    )
                continue
            entry = FolderEntry(path=path, label=label, digest=digest)
            seen[digest] = entry
            entries.append(entry)
            kept += 1
        if dropped:
            logger.info("class %r: dropped %d exact duplicate image(s)", name, dropped)
        if kept < min_images:
            raise DatasetError(
                f"class folder {str(folder)!r} has {kept} distinct image(s) but needs at least {min_images} "
                "images to split into train and test; add more images or remove the folder"
            )
    return class_names, entries


def split_entries(labels: np.ndarray, options: SplitOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic stratified split of ``labels`` into (train, validation, test) indices.

    Per class: at least 1 train image, at least 1 test image when the class has 2 or more,
    validation may be empty for tiny classes. Each index array is sorted.
    """
    labels = np.asarray(labels).reshape(-1)
    parts: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] = ([], [], [])
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = _class_rng(options.seed, label).permutation(members)
        count = len(members)
        n_test = min(max(1, round(count * options.test_fraction)), count - 1) if count >= 2 else 0
        n_validation = min(round(count * options.validation_fraction), count - 1 - n_test)
        n_validation = max(n_validation, 0)
        parts[2].append(members[:n_test])
        parts[1].append(members[n_test : n_test + n_validation])
        parts[0].append(members[n_test + n_validation :])
    train, validation, test = (
        np.sort(np.concatenate(part)).astype(np.int64) if part else np.zeros(0, dtype=np.int64) for part in parts
    )
    return train, validation, test


def _progress(items: list, enabled: bool):
    from edgeadapt.device.console import progress_enabled

    if not enabled or len(items) <= _PROGRESS_MIN_IMAGES or not progress_enabled():
        return items  # no bar in redirected logs
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="decoding images", unit="img")


def load_image_folder(
    root: str | Path,
    spec: InputSpec,
    options: SplitOptions = SplitOptions(),
    classes: Sequence[str] | None = None,
    progress: bool = True,
) -> Dataset:
    """Scan, split and decode a dataset folder into a :class:`Dataset` prepared for ``spec``.

    Args:
        root: Folder with one sub-folder of JPEG/PNG/BMP images per class.
        spec: Input size, channels and resize rule the images are prepared for.
        options: Validation/test fractions and seed of the per-class split.
        classes: Sub-folders to load, in this label order (default: all, sorted).
        progress: Draw a progress bar (only on a terminal).

    Returns:
        The split dataset with uint8 images prepared exactly as the device runtime prepares them.

    Raises:
        DatasetError: When the folder, a class or an image cannot be used.
    """
    class_names, entries = scan_image_folder(root, classes)
    images = np.empty((len(entries),) + spec.shape, dtype=np.uint8)
    for index, entry in enumerate(_progress(entries, progress)):
        try:
            images[index] = prepare_image(entry.path, spec)
        except InputError as error:
            raise DatasetError(f"cannot decode {str(entry.path)!r}: {error}; fix or delete that file") from error
    labels = np.array([entry.label for entry in entries], dtype=np.int64)
    everything = ImageSet(images, labels, [str(entry.path) for entry in entries])
    dataset = Dataset.split(class_names, everything, options, spec)
    logger.info(
        "loaded %d images of %d classes from %s: %d train, %d validation, %d test",
        len(entries),
        len(class_names),
        root,
        len(dataset.train),
        len(dataset.validation),
        len(dataset.test),
    )
    return dataset


def write_image_folder(
    root: str | Path,
    class_names: Sequence[str],
    images: np.ndarray,
    labels: np.ndarray,
    suffix: str = ".png",
) -> Path:
    """Write ``images`` as ``root/<class name>/0000.png, 0001.png, ...`` and return ``root``.

    ``images`` is (N, H, W) or (N, H, W, C) uint8 with C in 1 or 3; files of the same
    name are overwritten. Meant for tests, demos and device checks.
    """
    from PIL import Image

    if suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError(f"suffix must be one of {IMAGE_SUFFIXES}, got {suffix!r}")
    images = np.asarray(images)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(labels):
        raise InputError(
            f"expected (N, H, W[, C]) uint8 images with N labels, got {images.dtype} "
            f"{images.shape} and {len(labels)} labels"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise InputError(f"labels must be in 0..{len(class_names) - 1}")
    for name in class_names:
        if not name or name.startswith(".") or Path(name).name != name:
            raise InputError(f"class name {name!r} cannot be used as a folder name")
    if images.ndim == 4:
        images = images[..., 0] if images.shape[-1] == 1 else images
    root = Path(root)
    folders = [root / name for name in class_names]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    counters = [0] * len(class_names)
    for image, label in zip(images, labels):
        Image.fromarray(image).save(folders[label] / f"{counters[label]:04d}{suffix}")
        counters[label] += 1
    return root
