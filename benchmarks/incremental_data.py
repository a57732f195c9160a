"""The data of the class-incremental benchmark: class orders and the embeddings of each order.

Owns loading the dataset at the benchmark's image size, drawing the class orders, the two
backbones that embed an order (the built-in CNN trained on the base classes, or a pretrained
backbone read from a bundle and run by the device Runtime) and the per-order embedding cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeadapt.device.errors import BundleError, InputError
from edgeadapt.device.manifest import InputSpec
from edgeadapt.device.safefs import durable_write

if TYPE_CHECKING:
    from edgeadapt.benchmarks.incremental import IncrementalBenchmarkOptions

logger = logging.getLogger(__name__)


@dataclass
class OrderData:
    """One class order: its classes and the cached embeddings of every split."""

    order: int
    class_names: list[str]
    base: int
    train: tuple[np.ndarray, np.ndarray]
    validation: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    train_seconds: float
    cached: bool = False
    backbone: str = "trained"  # "trained": built-in CNN on the base classes; "bundle": pretrained, from a bundle

    @property
    def embedding_size(self) -> int:
        return int(self.train[0].shape[1])



@dataclass
class BundleBackbone:
    """A pretrained backbone read from a bundle and run by the device Runtime.

    The embeddings are exactly what a device computes with this bundle (its int8 backbone,
    LiteRT first with backend "auto"). :meth:`embed` passes the Runtime images already
    prepared for the bundle's input spec, so the Runtime uses them unchanged.
    """

    path: Path
    runtime: Any  # edgeadapt.device.runtime.Runtime

    @classmethod
    def open(cls, path: str | Path, backend: str = "auto") -> "BundleBackbone":
        """Verify and open the bundle at ``path`` with ``backend``."""
        from edgeadapt.device.runtime import Runtime

        path = Path(path)
        try:
            runtime = Runtime.open(path, backend=backend)
        except BundleError as error:
            raise BundleError(
                f"cannot use {path} as the benchmark's backbone: {error}. Make the bundle once with "
                f"`edgeadapt import MODEL.tflite --labels LABELS.txt --out {path}` (docs/INCREMENTAL.md)"
            ) from error
        return cls(path, runtime)

    @property
    def spec(self) -> InputSpec:
        """The bundle's input spec (input size, colour order, resize policy and filter)."""
        return self.runtime.input_spec

    @property
    def fingerprint(self) -> str:
        return self.runtime.manifest.backbone_fingerprint

    def identity(self) -> dict:
        """What the embeddings depend on: backbone fingerprint, model file and checksum, interpreter, input spec."""
        model_file = self.runtime.describe()["model_file"]
        return {
            "fingerprint": self.fingerprint,
            "model_file": model_file,
            "model_sha256": self.runtime.manifest.files.get(model_file, {}).get("sha256"),
            "backend": self.runtime.backend_name,
            "input": self.spec.to_dict(),
        }

    def describe(self) -> dict:
        """The report's ``backbone`` entry."""
        manifest = self.runtime.manifest
        return {"kind": "bundle", "path": str(self.path), "name": manifest.data.get("name", self.path.stem),
                "classes": len(manifest.class_names), "embedding_size": manifest.embedding_size, **self.identity()}

    def embed(self, images: np.ndarray, image_spec: InputSpec) -> np.ndarray:
        """Embeddings (N, D) of ``images``, a (N, H, W, C) uint8 batch prepared for ``image_spec``."""
        return self.runtime.embed(bundle_pixels(images, image_spec, self.spec))

    def close(self) -> None:
        self.runtime.close()


def bundle_pixels(images: np.ndarray, image_spec: InputSpec, bundle_spec: InputSpec) -> np.ndarray:
    """``images`` (prepared for ``image_spec``) as the uint8 batch ``bundle_spec`` asks for.

    Images already of the bundle's shape and colour order are returned unchanged (the
    Runtime then runs them as they are: it does not prepare a batch of the right shape
    again, so a batch in the wrong colour order would go through unnoticed). Others are
    brought back to RGB and prepared with the bundle's spec (channels, then resize).
    """
    from edgeadapt.device.preprocessing import prepare_image

    if images.shape[1:] == bundle_spec.shape and image_spec.color_order == bundle_spec.color_order:
        return images
    if image_spec.color_order == "BGR":
        images = images[..., ::-1]
    if len(images) == 0:
        return np.zeros((0,) + bundle_spec.shape, np.uint8)
    return np.stack([prepare_image(np.ascontiguousarray(image), bundle_spec) for image in images])


def _bundle_image_size(options: IncrementalBenchmarkOptions, bundle_spec: InputSpec) -> None:
    if options.image_size is not None and (options.image_size, options.image_size) != (bundle_spec.height,
                                                                                       bundle_spec.width):
        raise InputError(
            f"image_size {options.image_size} differs from the backbone bundle's input "
            f"{bundle_spec.height}x{bundle_spec.width}; a pretrained backbone runs at its own input size: "
            "leave image_size (--image-size) unset"
        )


# ============================================================================= data
def load_dataset(options: IncrementalBenchmarkOptions, bundle_spec: InputSpec | None = None):
    """The dataset the benchmark runs on, at the benchmark's image size.

    With ``bundle_spec`` (the input spec of ``options.backbone_bundle``) folder images are
    prepared exactly as that spec asks (size, colour order, resize policy and filter) and the
    built-in shapes are drawn at its height.
    """
    from edgeadapt.data.image_folders import SplitOptions, load_image_folder
    from edgeadapt.data.synthetic import SyntheticOptions, synthetic_dataset

    split = SplitOptions(seed=options.seed)
    if bundle_spec is not None:
        _bundle_image_size(options, bundle_spec)
    if options.data is None:
        size = bundle_spec.height if bundle_spec is not None else options.image_size or 32
        return synthetic_dataset(
            SyntheticOptions(num_classes=options.synthetic_classes, images_per_class=options.synthetic_images_per_class,
                             image_size=size, seed=options.seed), split)
    size = options.image_size or 64
    spec = bundle_spec if bundle_spec is not None else InputSpec(height=size, width=size)
    return load_image_folder(options.data, spec, split, progress=options.verbose > 0)


def class_orders(class_count: int, base: int, step: int, orders: int, seed: int) -> list[tuple[int, list[int]]]:
    """``orders`` class orders with fixed seeds: ``(seed_index, classes)``, base classes first.

    Candidate k is the permutation drawn from ``(seed, k)``. Candidates that split the
    classes into the same base set and new classes as an earlier order are skipped while
    distinct splits remain (with 4 classes and base 3 only 4 splits exist), so every order
    measures a different question. ``seed_index`` also seeds the backbone training.
    """
    needed = base + step
    if needed > class_count:
        raise InputError(f"base + step = {needed} classes, but the dataset has only {class_count}")
    chosen: list[tuple[int, list[int]]] = []
    seen: set = set()
    candidate = 0
    while len(chosen) < orders:
        classes = np.random.default_rng([seed, candidate]).permutation(class_count)[:needed].tolist()
        split = (frozenset(classes[:base]), tuple(classes[base:]))
        if split not in seen or candidate >= 50 * orders:
            seen.add(split)
            chosen.append((candidate, classes))
        candidate += 1
    return chosen


def _cache_key(options: IncrementalBenchmarkOptions, names: list[str], dataset, training_seed: int,
               bundle: BundleBackbone | None = None) -> str:
    """The cache file name of one order: everything its embeddings depend on.

    Built-in backbone: the data, input spec, classes, training settings and seed. Bundle
    backbone: the data, input spec, classes and the bundle's identity (backbone fingerprint,
    model file checksum, interpreter), so another bundle never reads these embeddings.
    """
    digest = hashlib.sha256()
    if bundle is None:
        digest.update(repr((str(options.data), dataset.spec.to_dict(), names, options.base, options.epochs,
                            training_seed, repr(options.backbone), len(dataset.train), len(dataset.test),
                            options.synthetic_classes, options.synthetic_images_per_class)).encode())
    else:
        digest.update(repr(("bundle", str(options.data), dataset.spec.to_dict(), names, options.base,
                            json.dumps(bundle.identity(), sort_keys=True), len(dataset.train), len(dataset.test),
                            options.synthetic_classes, options.synthetic_images_per_class)).encode())
    digest.update(np.ascontiguousarray(dataset.train.images[:: max(1, len(dataset.train) // 64)]).tobytes())
    return digest.hexdigest()[:24]


Splits = dict[str, tuple[np.ndarray, np.ndarray]]


def _load_cached(cache_file: Path, order: int, names: list[str], base: int, backbone: str) -> OrderData:
    stored = np.load(cache_file, allow_pickle=False)
    logger.info("order %d: embeddings from cache %s", order, cache_file)
    return OrderData(order, names, base,
                     (stored["train_embeddings"], stored["train_labels"]),
                     (stored["validation_embeddings"], stored["validation_labels"]),
                     (stored["test_embeddings"], stored["test_labels"]),
                     float(stored["train_seconds"]), cached=True, backbone=backbone)


def _store_cached(cache_file: Path, splits: Splits, seconds: float) -> None:
    durable_write(cache_file, lambda handle: np.savez(
        handle, train_seconds=seconds,
        **{f"{name}_embeddings": value[0] for name, value in splits.items()},
        **{f"{name}_labels": value[1] for name, value in splits.items()}))


def _trained_backbone_embeddings(options: IncrementalBenchmarkOptions, subset, order: int,
                                 training_seed: int) -> tuple[Splits, float]:
    """Train the built-in classifier on the base classes of ``subset``; embed every split with its backbone."""
    from edgeadapt.training.backbones import BackboneOptions
    from edgeadapt.data.embeddings import compute_embeddings
    from edgeadapt.training.model_split import split_classifier
    from edgeadapt.training.classifier import ClassifierTrainingOptions, train_classifier

    names = subset.class_names
    base_dataset = subset.select_classes(names[: options.base])
    epochs = options.epochs or (25 if options.data is not None else 15)
    logger.info("order %d: training the built-in classifier on %s (%d epochs)", order, names[: options.base], epochs)
    start = time.perf_counter()
    model = train_classifier(base_dataset, ClassifierTrainingOptions(
        epochs=epochs, seed=training_seed, verbose=2 if options.verbose > 1 else 0,
        backbone=options.backbone or BackboneOptions()))
    seconds = time.perf_counter() - start
    backbone = split_classifier(model).backbone
    splits = {}
    for split_name in ("train", "validation", "test"):
        part = getattr(subset, split_name)
        splits[split_name] = (compute_embeddings(backbone, part.images, subset.spec, progress=False), part.labels)
    return splits, seconds


def _bundle_backbone_embeddings(bundle: BundleBackbone, subset, order: int) -> tuple[Splits, float]:
    """Embed every split of ``subset`` with the bundle's pretrained backbone (no training)."""
    logger.info("order %d: embedding %s with the backbone of %s", order, subset.class_names, bundle.path)
    start = time.perf_counter()
    splits = {}
    for split_name in ("train", "validation", "test"):
        part = getattr(subset, split_name)
        splits[split_name] = (bundle.embed(part.images, subset.spec), part.labels)
    return splits, time.perf_counter() - start


def order_embeddings(options: IncrementalBenchmarkOptions, dataset, order: int, classes: list[int],
                     seed_index: int | None = None, bundle: BundleBackbone | None = None) -> OrderData:
    """Embed every split of one class order (cached with ``options.cache``).

    Built-in backbone (default): the classifier is trained on the order's base classes,
    seeded with ``options.seed + seed_index`` (default: the order). With ``bundle`` (opened
    from ``options.backbone_bundle`` when not given) the bundle's pretrained backbone embeds
    the images; ``dataset`` must then be loaded for the bundle (:func:`load_dataset`).
    """
    names = [dataset.class_names[index] for index in classes]
    subset = dataset.select_classes(names)
    training_seed = options.seed + (order if seed_index is None else seed_index)
    if bundle is None and options.backbone_bundle is not None:
        opened = BundleBackbone.open(options.backbone_bundle, options.backbone_backend)
        try:
            return order_embeddings(options, dataset, order, classes, seed_index, opened)
        finally:
            opened.close()
    kind = "trained" if bundle is None else "bundle"
    cache_file = None
    if options.cache is not None:
        cache_file = Path(options.cache) / f"order-{_cache_key(options, names, subset, training_seed, bundle)}.npz"
        if cache_file.is_file():
            return _load_cached(cache_file, order, names, options.base, kind)
    if bundle is None:
        splits, seconds = _trained_backbone_embeddings(options, subset, order, training_seed)
    else:
        splits, seconds = _bundle_backbone_embeddings(bundle, subset, order)
    if cache_file is not None:
        _store_cached(cache_file, splits, seconds)
    return OrderData(order, names, options.base, splits["train"], splits["validation"], splits["test"], seconds,
                     backbone=kind)

