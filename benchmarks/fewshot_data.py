"""Image folders -> :class:`~edgeadapt.benchmarks.fewshot.EmbeddedData` through a bundle's backbone (cached)."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeadapt.device.errors import DatasetError, InputError
from edgeadapt.device.preprocessing import IMAGE_SUFFIXES, list_image_files
from edgeadapt.benchmarks.fewshot import EmbeddedData, per_class_split
from edgeadapt.data.embedding_cache import EmbeddingCache

logger = logging.getLogger(__name__)


def image_files(folder: str | Path, what: str) -> list[Path]:
    """Every image file under ``folder`` (recursively, sorted).

    Raises:
        InputError: when the folder does not exist or holds no image.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{what} folder {str(root)!r} does not exist or is not a directory")
    files = list_image_files(root, recursive=True)
    if not files:
        raise InputError(f"{what} folder {str(root)!r} holds no {'/'.join(IMAGE_SUFFIXES)} image; give a folder of photos")
    return files


def load_embedded_folder(root: str | Path, cache: EmbeddingCache, seed: int = 0, test_fraction: float = 0.4,
                         classes: list[str] | None = None, background: str | Path | None = None) -> EmbeddedData:
    """Scan ``root`` (one sub-folder per class; exact duplicate files dropped), split each class
    60/40 (seeded) and embed every photo (and the ``background`` folder) through ``cache``.

    Raises:
        DatasetError: for a missing/empty folder or a class with fewer than 2 distinct photos.
        InputError: for an unreadable image or an empty background folder.
    """
    from edgeadapt.data.image_folders import scan_image_folder

    class_names, entries = scan_image_folder(root, classes)
    labels = np.array([entry.label for entry in entries], dtype=np.int64)
    paths = [entry.path for entry in entries]
    train, test = per_class_split(labels, class_names, test_fraction, seed)
    embeddings = cache.embed(paths, description=f"embedding {Path(root).name}")
    background_embeddings = None
    if background is not None:
        background_embeddings = cache.embed(image_files(background, "background"), description="embedding background")
    description = {"data": str(root), "classes": class_names, "photos": len(entries),
                   "per_class": {name: int(np.sum(labels == index)) for index, name in enumerate(class_names)},
                   "split": f"{1 - test_fraction:.0%}/{test_fraction:.0%} per class after de-duplicating identical "
                            f"files, seed {seed}",
                   "background": None if background is None else {"folder": str(background),
                                                                   "photos": int(len(background_embeddings))}}
    return EmbeddedData(class_names, (embeddings[train], labels[train]), (embeddings[test], labels[test]),
                        background_embeddings, description)


@dataclass
class StabilityPhotos:
    """Embedded stability photos and, when ``index.csv`` maps them, their true class per head column."""

    folder: Path
    embeddings: np.ndarray
    labels: np.ndarray | None  # head column of each photo's true class, or None


def load_stability_photos(folder: str | Path, cache: EmbeddingCache, head_classes: int) -> StabilityPhotos:
    """Embed the photos of ``folder``; read their labels from ``index.csv`` when it is there.

    ``index.csv`` columns: ``file`` and ``label_index_1001`` (used for a 1001-output head)
    or ``imagenet_index`` (a 1000-output head). Photos not listed get no label (-1).

    Raises:
        InputError: for an empty folder or an index.csv without the columns needed.
    """
    root = Path(folder)
    files = image_files(root, "stability")
    embeddings = cache.embed(files, description="embedding stability photos")
    index_file = root / "index.csv"
    labels = None
    if index_file.is_file():
        with index_file.open(newline="", encoding="utf-8") as stream:
            rows = list(csv.DictReader(stream))
        column = "label_index_1001" if head_classes == 1001 else "imagenet_index"
        if not rows or "file" not in rows[0] or column not in rows[0]:
            raise InputError(f"{index_file} needs the columns 'file' and {column!r} for a {head_classes}-class head")
        try:
            by_file = {row["file"]: int(row[column]) for row in rows}
        except ValueError as error:
            raise DatasetError(f"{index_file}: column {column!r} must hold class indices ({error})") from error
        labels = np.array([by_file.get(str(path.relative_to(root)), -1) for path in files], dtype=np.int64)
        if np.any(labels >= head_classes):
            raise InputError(f"{index_file} names class indices beyond the head's {head_classes} classes")
        if not np.any(labels >= 0):
            labels = None
    return StabilityPhotos(root, embeddings, labels)


# ============================================================================= whole runs
def _open(bundle: str | Path, backend: str, cache_dir: str | Path | None, verbose: int):
    from edgeadapt.device.runtime import Runtime
    from edgeadapt.data.embedding_cache import show_progress

    runtime = Runtime.open(bundle, backend=backend)
    return runtime, EmbeddingCache(runtime, cache_dir, progress=show_progress(verbose))


def _backbone(bundle: str | Path, runtime, cache: EmbeddingCache) -> dict:
    manifest = runtime.manifest
    return {"bundle": str(bundle), "name": manifest.data.get("name", Path(bundle).stem),
            "classes": len(manifest.class_names), "embedding_size": manifest.embedding_size,
            **cache.identity, "cache": str(cache.store)}


def run_folder_benchmark(data: str | Path, bundle: str | Path, options, base: list[str] | None = None,
                         new: list[str] | None = None, background: str | Path | None = None,
                         cache_dir: str | Path | None = None, verbose: int = 0, backend: str = "auto") -> dict:
    """``edgeadapt bench fewshot`` on an image folder with the backbone of ``bundle`` (see :mod:`edgeadapt.benchmarks.fewshot`).

    Raises:
        BundleError: when the bundle cannot be opened. InputError/DatasetError: for bad data or options.
    """
    from edgeadapt.benchmarks.fewshot import run_fewshot_on_embeddings

    runtime, cache = _open(bundle, backend, cache_dir, verbose)
    try:
        embedded = load_embedded_folder(data, cache, options.seed, options.test_fraction, background=background)
        report = run_fewshot_on_embeddings(embedded, options, base, new)
        report["backbone"] = _backbone(bundle, runtime, cache)
        report["embeddings"] = {"from_cache": cache.hits, "computed": cache.computed}
        return report
    finally:
        runtime.close()


def run_imported_head_benchmark(data: str | Path, bundle: str | Path, options, stability: str | Path,
                                new: list[str] | None = None, background: str | Path | None = None,
                                cache_dir: str | Path | None = None, verbose: int = 0, backend: str = "auto") -> dict:
    """The seed scenario: add ``new`` classes of ``data`` to the bundle's own head; measure ``stability`` photos.

    The calibration embeddings are what the bundle carries (references, background) plus the
    ``background`` folder's photos when given (as ``edgeadapt import --background`` would store).

    Raises:
        BundleError: when the bundle cannot be opened. InputError/DatasetError: for bad data or options.
    """
    from edgeadapt.benchmarks.fewshot_stability import run_stability_on_embeddings

    runtime, cache = _open(bundle, backend, cache_dir, verbose)
    try:
        head = runtime.head
        stats = runtime.bundle.load_class_stats()
        parts = []
        references = runtime.bundle.load_reference_embeddings()
        if references is not None and len(references):
            parts.append(references.as_float32())
        stored = runtime.bundle.load_background()
        if stored is not None and len(stored):
            parts.append(np.asarray(stored, dtype=np.float32))
        embedded = load_embedded_folder(data, cache, options.seed, options.test_fraction, classes=new,
                                        background=background)
        if embedded.background is not None:
            parts.append(embedded.background)
        calibration = np.concatenate(parts) if parts else None
        photos = load_stability_photos(stability, cache, head.num_classes)
        report = run_stability_on_embeddings(head, stats, calibration, embedded.train, embedded.test,
                                             embedded.class_names, photos.embeddings, photos.labels, options)
        report["stability"]["folder"] = str(photos.folder)
        report["dataset"] = embedded.description
        report["backbone"] = _backbone(bundle, runtime, cache)
        report["embeddings"] = {"from_cache": cache.hits, "computed": cache.computed}
        return report
    finally:
        runtime.close()
