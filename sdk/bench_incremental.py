"""The class-incremental benchmark behind ``edgeadapt bench incremental``.

For each class order (fixed seeds):

1. the backbone: by default the built-in classifier is trained on the BASE classes only and
   split into backbone + head; with ``backbone_bundle`` a pretrained backbone is read from a
   bundle (e.g. an imported ImageNet MobileNet, ``edgeadapt import``) and run by the device
   :class:`~edgeadapt.device.runtime.Runtime` at the bundle's own input size. The embeddings
   of every split are computed once (and cached with ``cache``);
2. the base head is trained on the base classes' embeddings with the default normalisation
   (centred on the stored base mean); the class statistics of the base classes are kept;
3. for each shot count (examples per new class) and each method, the new classes are added
   with :func:`edgeadapt.device.incremental.add_classes` and the result is measured on the
   test split of all seen classes.

Baselines: ``joint`` retrains the whole head on all training data of every class (the
upper bound), ``joint (old data + shots)`` retrains it on all old data plus the same shots,
``resolve_all`` re-fits every column from the statistics, ``none`` is the uncalibrated lower
bound and ``imprint`` plain imprinting. ``center_l2`` is run on a cosine base head (centred +
L2-normalised features, temperature 0.1) trained on the same embeddings, because it needs one.

Columns (the fair measure, :mod:`edgeadapt.fewshot_measure`): old-class accuracy (mean over
the old classes of each one's accuracy, predictions over all seen classes), new-class recall
(mean over the new classes), their harmonic mean and its ratio to the joint retrain's in the
same order; old-class drop against the base model before the step (old test images, old
classes only; positive = lost); new-class false-positive rate on old-class test images; time
of the update; bytes stored per class; whether old-class logits stayed bit-identical. The
all-class accuracy is not reported: old-class photos dominate a test set, so a head that
never predicts a new class already scored 0.8 of the joint on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeadapt.device.errors import BundleError, InputError
from edgeadapt.device.head import ClassStats, Head
from edgeadapt.device import incremental as head_math
from edgeadapt.device.incremental import DEFAULT_METHOD, METHODS, AddClassOptions
from edgeadapt.device.manifest import InputSpec
from edgeadapt.device.safefs import durable_write
from edgeadapt.fewshot_measure import fair_scores, per_class_accuracy

logger = logging.getLogger(__name__)

ALL_SHOTS = 0  # "all": every training image of the new classes
JOINT = "joint"
JOINT_SHOTS = "joint (old data + shots)"
RESOLVE = "resolve_all"
COSINE_TEMPERATURE = 0.1
#: Head training of the base heads and the joint baselines: long enough to converge on small data.
HEAD_EPOCHS = 200
HEAD_PATIENCE = 20


@dataclass(frozen=True)
class IncrementalBenchmarkOptions:
    """What :func:`run_incremental_benchmark` measures.

    ``data``: a folder with one sub-folder per class (None: the built-in synthetic shapes).
    ``base`` classes first, then ``step`` new classes, in ``orders`` class orders.
    ``shots``: examples per new class; 0 means all. ``methods``: from
    :data:`edgeadapt.device.incremental.METHODS`. ``add_options``: knobs for every method
    (its ``method`` field is replaced per row). ``cache``: folder where each order's
    backbone embeddings are kept, so a second run skips training.

    ``backbone_bundle``: a bundle whose pretrained backbone embeds every image instead of the
    built-in CNN trained on the base classes (None, the default). It runs through the device
    Runtime with ``backbone_backend`` ("auto": LiteRT first) at the bundle's input size;
    ``image_size``, ``epochs`` and ``backbone`` (which configure the built-in training) must
    then be left unset. The base head is still trained on the base classes' embeddings.
    """

    data: Path | None = None
    base: int = 2
    step: int = 2
    shots: tuple[int, ...] = (1, 5, 20, ALL_SHOTS)
    orders: int = 3
    methods: tuple[str, ...] = METHODS
    image_size: int | None = None
    epochs: int | None = None
    seed: int = 0
    cache: Path | None = None
    add_options: AddClassOptions = AddClassOptions()
    backbone: Any = None  # edgeadapt.backbones.BackboneOptions, None = default
    synthetic_classes: int = 6
    synthetic_images_per_class: int = 120
    verbose: int = 0
    backbone_bundle: Path | None = None
    backbone_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.base < 2:
            raise InputError(f"base must be at least 2 classes (a classifier needs two), got {self.base}")
        if self.step < 1:
            raise InputError(f"step must be at least 1 new class, got {self.step}")
        if self.orders < 1:
            raise InputError(f"orders must be at least 1, got {self.orders}")
        if not self.shots or any(shot < 0 for shot in self.shots):
            raise InputError(f"shots must be positive counts or 0 for all, got {self.shots}")
        unknown = [method for method in self.methods if method not in METHODS]
        if unknown:
            raise InputError(f"unknown methods {unknown}; choose from {METHODS}")
        if self.backbone_bundle is not None:
            self._check_bundle_options()

    def _check_bundle_options(self) -> None:
        built_in = {"epochs": self.epochs, "backbone": self.backbone}
        given = [name for name, value in built_in.items() if value is not None]
        if given:
            raise InputError(
                f"{' and '.join(given)} only apply to training the built-in backbone, but backbone_bundle "
                f"({self.backbone_bundle}) uses a pretrained backbone as it is: leave {' and '.join(given)} unset"
            )


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
class Measurement:
    """One method at one shot count in one order (old/new: mean per-class accuracy/recall)."""

    old: float
    new: float
    harmonic_mean: float
    ratio_to_joint: float
    old_drop: float
    new_false_positive_rate: float
    update_seconds: float
    bytes_per_class: int
    old_logits_identical: bool | None


@dataclass
class IncrementalBenchmarkReport:
    """Everything measured, per order and averaged over orders."""

    options: dict
    dataset: str
    embedding_size: int
    backbone: dict = field(default_factory=dict)
    orders: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    figures: dict = field(default_factory=dict)
    seconds: float = 0.0

    def table(self) -> str:
        options = self.options
        lines = [
            f"class-incremental benchmark: {self.dataset}, base {options['base']} + {options['step']} new, "
            f"{len(self.orders)} class orders, {options['image_size']} px, embedding {self.embedding_size} floats",
            f"  backbone: {describe_backbone(self.backbone)}",
        ]
        for order in self.orders:
            verb = "embedded" if order.get("backbone") == "bundle" else "trained"
            trained = "from cache" if order["cached"] else "{} in {:.0f} s".format(verb, order["train_seconds"])
            lines.append(
                f"  order {order['order']}: base {', '.join(order['base_classes'])} -> new {', '.join(order['new_classes'])}"
                f"   (backbone {trained}; base model old-class accuracy {order['before_old']:.3f})"
            )
        lines.append("")
        lines.append(
            f"{'shots':>5}  {'method':<26}{'old':>7}{'new':>7}{'h-mean':>13}{'/joint':>8}{'old drop':>10}{'new FPR':>9}"
            f"{'update ms':>11}{'bytes/class':>13}  old logits"
        )
        previous = None
        for row in self.rows:
            shots = "all" if row["shots"] == ALL_SHOTS else str(row["shots"])
            if previous is not None and previous != row["shots"]:
                lines.append("")
            previous = row["shots"]
            mean = row["mean"]
            identical = row["old_logits_identical"]
            identical_text = "-" if identical is None else ("identical" if identical else "changed")
            label = row["method"] + (" (default)" if row["method"] == DEFAULT_METHOD else "")
            lines.append(
                f"{shots:>5}  {label:<26}{mean['old']:>7.3f}{mean['new']:>7.3f}{mean['harmonic_mean']:>7.3f}±"
                f"{row['std']['harmonic_mean']:.3f}{mean['ratio_to_joint']:>8.3f}{mean['old_drop']:>+10.3f}"
                f"{mean['new_false_positive_rate']:>9.3f}"
                f"{mean['update_seconds'] * 1000:>11.1f}{row['bytes_per_class']:>13,}  {identical_text}"
            )
        lines.append("")
        lines.append(
            "old: mean per-class accuracy of the old classes, new: mean per-class recall of the new classes "
            "(argmax over all seen classes); h-mean: their harmonic mean (mean±std over orders); /joint: h-mean over "
            "the joint retrain's; old drop: old-class accuracy lost against the base model before the step "
            "(positive = lost); new FPR: share of old-class test "
            f"images predicted as a new class; bytes/class: head column + what the method keeps per class "
            f"(ridge, resolve_all also share a {self.embedding_size}x{self.embedding_size} Gram matrix = "
            f"{8 * self.embedding_size ** 2:,} bytes; joint keeps every training embedding)"
        )
        if self.figures:
            lines.append("")
            lines.append("figures (targets of docs/INCREMENTAL.md):")
            for entry in self.figures.get("checks", []):
                lines.append(f"  [{'PASS' if entry['passed'] else 'FAIL'}] {entry['text']}")
        lines.append(f"total time {self.seconds:.0f} s")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=_json_default))


def describe_backbone(backbone: dict) -> str:
    """One line saying which backbone made the embeddings (``IncrementalBenchmarkReport.backbone``)."""
    if backbone.get("kind") != "bundle":
        return "built-in CNN trained from scratch on each order's base classes"
    return (f"pretrained, from bundle {backbone['path']} ({backbone['name']}, {backbone['classes']} classes, "
            f"fingerprint {backbone['fingerprint'].split(':')[-1][:12]}, {backbone['model_file']} on "
            f"{backbone['backend']})")


def _json_default(value: Any):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


# ============================================================================= backbone from a bundle
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
    from edgeadapt.data import SplitOptions, load_image_folder
    from edgeadapt.synthetic import SyntheticOptions, synthetic_dataset

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
    from edgeadapt.backbones import BackboneOptions
    from edgeadapt.embeddings import compute_embeddings
    from edgeadapt.model_split import split_classifier
    from edgeadapt.training import ClassifierTrainingOptions, train_classifier

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


# ============================================================================= measuring
def _select_shots(embeddings: np.ndarray, labels: np.ndarray, classes: Sequence[int], shots: int,
                  seed: int, order: int) -> list[np.ndarray]:
    arrays = []
    for label in classes:
        members = np.flatnonzero(labels == label)
        if shots != ALL_SHOTS and len(members) > shots:
            members = np.sort(np.random.default_rng([seed, order, shots, int(label)]).choice(members, shots, replace=False))
        arrays.append(embeddings[members])
    return arrays


def _evaluate(head: Head, test: tuple[np.ndarray, np.ndarray], base: int) -> tuple[dict[str, float], float]:
    """The fair scores (old-class accuracy, new-class recall, harmonic mean) and the new-class FPR."""
    embeddings, labels = test
    predictions = head.logits(embeddings).argmax(axis=1)
    old = labels < base
    seen = np.unique(labels)
    scores = fair_scores(predictions, labels, seen[seen < base], seen[seen >= base])
    return scores, float(np.mean(predictions[old] >= base))


def _before_old_accuracy(head: Head, test: tuple[np.ndarray, np.ndarray], base: int) -> float:
    embeddings, labels = test
    old = labels < base
    return per_class_accuracy(head.logits(embeddings[old]).argmax(axis=1), labels[old], np.unique(labels[old]))


def bytes_per_class(method: str, embedding_size: int, replay_examples_per_class: float = 0.0) -> int:
    """Bytes a method keeps per class: the head column and bias, plus what later updates need."""
    column = 4 * embedding_size + 4
    statistics = 8 * embedding_size + 8
    if method in ("ridge", RESOLVE, "center_l2", "imprint", "imprint_calibrated"):
        return column + statistics
    if method in (JOINT, JOINT_SHOTS):
        return column + int(round(replay_examples_per_class * 4 * embedding_size))
    return column


def _base_heads(data: OrderData, options: IncrementalBenchmarkOptions) -> dict[str, Head]:
    from edgeadapt.head_training import DEFAULT_NORMALIZATION, HeadTrainingOptions, train_head

    embeddings, labels = data.train
    old = labels < data.base
    validation_embeddings, validation_labels = data.validation
    validation_old = validation_labels < data.base
    validation = (validation_embeddings[validation_old], validation_labels[validation_old])
    return {
        "default": train_head(embeddings[old], labels[old], data.base,
                              HeadTrainingOptions(seed=options.seed, normalization=DEFAULT_NORMALIZATION,
                                                 epochs=HEAD_EPOCHS, patience=HEAD_PATIENCE),
                              validation=validation),
        "cosine": train_head(embeddings[old], labels[old], data.base,
                             HeadTrainingOptions(seed=options.seed, normalization="center_l2", temperature=COSINE_TEMPERATURE,
                                                 epochs=HEAD_EPOCHS, patience=HEAD_PATIENCE), validation=validation),
    }


def _joint(data: OrderData, arrays: list[np.ndarray] | None, options: IncrementalBenchmarkOptions) -> tuple[Head, float]:
    """Retrain the whole head: all old data + ``arrays`` (None: all new training data too)."""
    from edgeadapt.head_training import DEFAULT_NORMALIZATION, HeadTrainingOptions, train_head

    embeddings, labels = data.train
    count = len(data.class_names)
    if arrays is not None:
        old = labels < data.base
        embeddings = np.concatenate([embeddings[old]] + arrays)
        labels = np.concatenate([labels[old]] + [np.full(len(array), data.base + offset, np.int64)
                                                 for offset, array in enumerate(arrays)])
    start = time.perf_counter()
    head = train_head(embeddings, labels, count,
                      HeadTrainingOptions(seed=options.seed, normalization=DEFAULT_NORMALIZATION,
                                          epochs=HEAD_EPOCHS, patience=HEAD_PATIENCE),
                      validation=data.validation if arrays is None else None)
    return head, time.perf_counter() - start


def measure_order(data: OrderData, options: IncrementalBenchmarkOptions) -> tuple[dict, dict]:
    """All rows of one order: {(shots, method): Measurement} and the order's description."""
    base = data.base
    new_classes = list(range(base, len(data.class_names)))
    heads = _base_heads(data, options)
    embeddings, labels = data.train
    old = labels < base
    stats = ClassStats.from_embeddings(embeddings[old], labels[old], base)
    before = {name: _before_old_accuracy(head, data.test, base) for name, head in heads.items()}
    size = data.embedding_size
    replay_per_class = float(np.sum(old)) / base
    results: dict[tuple[int, str], Measurement] = {}

    joint_head, joint_seconds = _joint(data, None, options)
    joint_harmonic = _evaluate(joint_head, data.test, base)[0]["harmonic_mean"]

    def record(shots: int, method: str, head: Head, seconds: float, before_old: float, identical: bool | None,
               stored: int) -> None:
        scores, false_positive = _evaluate(head, data.test, base)
        ratio = scores["harmonic_mean"] / joint_harmonic if joint_harmonic > 0 else 0.0
        results[(shots, method)] = Measurement(scores["old_accuracy"], scores["new_recall"], scores["harmonic_mean"],
                                               ratio, before_old - scores["old_accuracy"], false_positive, seconds,
                                               stored, identical)

    test_embeddings = data.test[0]
    for shots in options.shots:
        arrays = _select_shots(embeddings, labels, new_classes, shots, options.seed, data.order)
        for method in options.methods:
            base_head = heads["cosine" if method == "center_l2" else "default"]
            method_options = dataclasses.replace(options.add_options, method=method)
            start = time.perf_counter()
            head, updated = head_math.add_classes(base_head, stats, arrays, method_options)
            seconds = time.perf_counter() - start
            identical = head_math.old_logits_unchanged(base_head, head, test_embeddings)
            record(shots, method, head, seconds, before["cosine" if method == "center_l2" else "default"], identical,
                   bytes_per_class(method, size))
            if method == DEFAULT_METHOD and updated is not None:
                start = time.perf_counter()
                resolved = head_math.resolve_all(head, updated, method_options)
                record(shots, RESOLVE, resolved, seconds + time.perf_counter() - start, before["default"],
                       head_math.old_logits_unchanged(base_head, resolved, test_embeddings), bytes_per_class(RESOLVE, size))
        shots_head, shots_seconds = _joint(data, arrays, options)
        record(shots, JOINT_SHOTS, shots_head, shots_seconds, before["default"], None,
               bytes_per_class(JOINT_SHOTS, size, replay_per_class))
        record(shots, JOINT, joint_head, joint_seconds, before["default"], None,
               bytes_per_class(JOINT, size, replay_per_class))
    description = {
        "order": data.order,
        "base_classes": data.class_names[:base],
        "new_classes": data.class_names[base:],
        "train_seconds": data.train_seconds,
        "cached": data.cached,
        "backbone": data.backbone,
        "before_old": before["default"],
        "before_old_cosine": before["cosine"],
        "train_examples": int(len(labels)),
        "test_examples": int(len(data.test[1])),
    }
    return {f"{shots}|{method}": measurement for (shots, method), measurement in results.items()}, description


def _row_order(methods: Sequence[str]) -> list[str]:
    order = [JOINT]
    for method in METHODS:
        if method in methods:
            order.append(method)
            if method == DEFAULT_METHOD:
                order.append(RESOLVE)
    order.append(JOINT_SHOTS)
    return order


def _figures(rows: list[dict], shots: Sequence[int]) -> dict:
    def find(shot: int, method: str) -> dict | None:
        return next((row for row in rows if row["shots"] == shot and row["method"] == method), None)

    checks = []
    joint_all = find(ALL_SHOTS, JOINT) or next((row for row in rows if row["method"] == JOINT), None)
    default_all = find(ALL_SHOTS, DEFAULT_METHOD)
    if joint_all and default_all:
        gap = default_all["mean"]["harmonic_mean"] - joint_all["mean"]["harmonic_mean"]
        checks.append({"name": "all_shots_harmonic_mean", "value": gap, "passed": gap >= -0.02,
                       "text": f"all new images, no old images: {DEFAULT_METHOD} harmonic mean of old-class accuracy "
                               f"and new-class recall {default_all['mean']['harmonic_mean']:.3f} vs joint upper bound "
                               f"{joint_all['mean']['harmonic_mean']:.3f} ({gap:+.3f}; within 2 points)"})
        gap_old = default_all["mean"]["old"] - joint_all["mean"]["old"]
        checks.append({"name": "all_shots_old_classes", "value": gap_old, "passed": gap_old >= -0.02,
                       "text": f"all new images: {DEFAULT_METHOD} old-class accuracy {default_all['mean']['old']:.3f} "
                               f"vs joint {joint_all['mean']['old']:.3f} ({gap_old:+.3f}; within 2 points)"})
    # few-shot targets: k = 1 / 5 / 20 reach 0.6 / 0.85 / 0.95 of the joint's harmonic mean; k = 5 loses <= 3 points
    for shot, floor, name in ((1, 0.6, "one_shot_ratio"), (5, 0.85, "five_shots_ratio"), (20, 0.95, "twenty_shots_ratio")):
        row = find(shot, DEFAULT_METHOD)
        if joint_all and row:
            ratio = row["mean"]["ratio_to_joint"]
            checks.append({"name": name, "value": ratio, "passed": ratio >= floor,
                           "text": f"{shot} shot(s): {DEFAULT_METHOD} harmonic mean {row['mean']['harmonic_mean']:.3f} "
                                   f"(old {row['mean']['old']:.3f}, new recall {row['mean']['new']:.3f}) = "
                                   f"{ratio:.1%} of the joint's (at least {floor:.0%})"})
    default_five = find(5, DEFAULT_METHOD)
    if default_five:
        drop = default_five["mean"]["old_drop"]
        checks.append({"name": "five_shots_old_drop", "value": drop, "passed": drop <= 0.03,
                       "text": f"5 shots: {DEFAULT_METHOD} old-class drop {drop:+.3f} against the base model "
                               "(at most 3 points)"})
    append_only = [row for row in rows if row["old_logits_identical"] is not None and row["method"] != RESOLVE]
    if append_only:
        identical = all(row["old_logits_identical"] for row in append_only)
        checks.append({"name": "old_logits_identical", "value": identical, "passed": identical,
                       "text": "old-class logits bit-identical after every append-only update "
                               f"({len(append_only)} method x shot rows, every order)"})
    return {"checks": checks, "passed": all(check["passed"] for check in checks)}


def run_incremental_benchmark(options: IncrementalBenchmarkOptions, dataset=None) -> IncrementalBenchmarkReport:
    """Run the benchmark; ``dataset`` overrides ``options.data`` (an :class:`edgeadapt.data.Dataset`)."""
    if options.backbone_bundle is None:
        return _run(options, dataset, None)
    bundle = BundleBackbone.open(options.backbone_bundle, options.backbone_backend)
    try:
        return _run(options, dataset, bundle)
    finally:
        bundle.close()


def _run(options: IncrementalBenchmarkOptions, dataset, bundle: BundleBackbone | None) -> IncrementalBenchmarkReport:
    start = time.perf_counter()
    dataset = dataset if dataset is not None else load_dataset(options, bundle.spec if bundle is not None else None)
    orders = class_orders(len(dataset.class_names), options.base, options.step, options.orders, options.seed)
    per_order: list[dict] = []
    descriptions: list[dict] = []
    size = 0
    for order, (seed_index, classes) in enumerate(orders):
        data = order_embeddings(options, dataset, order, classes, seed_index, bundle)
        size = data.embedding_size
        measurements, description = measure_order(data, options)
        per_order.append(measurements)
        descriptions.append(description)
        logger.info("order %d measured", order)
    rows = []
    for shots in options.shots:
        for method in _row_order(options.methods):
            key = f"{shots}|{method}"
            values = [order[key] for order in per_order if key in order]
            if not values:
                continue
            metrics = ("old", "new", "harmonic_mean", "ratio_to_joint", "old_drop", "new_false_positive_rate",
                       "update_seconds")
            identical = [value.old_logits_identical for value in values]
            rows.append({
                "shots": shots,
                "method": method,
                "mean": {name: float(np.mean([getattr(value, name) for value in values])) for name in metrics},
                "std": {name: float(np.std([getattr(value, name) for value in values])) for name in metrics},
                "per_order": [dataclasses.asdict(value) for value in values],
                "bytes_per_class": int(np.mean([value.bytes_per_class for value in values])),
                "old_logits_identical": None if identical[0] is None else bool(all(identical)),
            })
    name = "built-in synthetic shapes" if options.data is None and dataset is not None else str(options.data)
    if options.data is not None:
        name = f"{Path(options.data).name} ({len(dataset.class_names)} classes)"
    resolved_options = dataclasses.asdict(options)
    resolved_options["image_size"] = dataset.spec.height
    return IncrementalBenchmarkReport(options=resolved_options, dataset=name, embedding_size=size,
                                      backbone=bundle.describe() if bundle is not None else {"kind": "built-in"},
                                      orders=descriptions, rows=rows, figures=_figures(rows, options.shots),
                                      seconds=time.perf_counter() - start)
