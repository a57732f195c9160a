"""``edgeadapt bench fewshot``: learn new classes from 1-20 photos, measured fairly.

On a folder of class folders and a backbone bundle:

1. every image is embedded once by the bundle's device Runtime (cached on disk by backbone
   identity + file path, size and mtime; :mod:`edgeadapt.data.embedding_cache`);
2. each class's de-duplicated files are split 60/40 into training and test photos
   (seeded by the class name, so a photo stays on its side whatever the class split);
3. for each base/new class split: the base head is trained on the base classes' training
   embeddings (normalisation "center", the SDK default) with the class statistics (Gram
   matrix) and calibration embeddings (5 references per base class, plus the background) a
   trained bundle carries; the joint retrain is trained on every training photo of every class;
4. for each draw and each k, k shots per new class are drawn from its training photos, and
   every method adds the new classes: each SDK method exactly as the device calls it
   (:func:`edgeadapt.device.incremental.add_classes`), and the reference baselines
   (:mod:`edgeadapt.benchmarks.fewshot_measure`);
5. every update is scored with the fair measure (old-class accuracy, new-class recall,
   harmonic mean, each against the joint; old-class drop against the base head), and medians
   are taken over splits x draws.

The core, :func:`run_fewshot_on_embeddings`, works on precomputed embeddings (no model needed).
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from edgeadapt.device import incremental as head_math
from edgeadapt.device.errors import EdgeAdaptError, IncompatibleModelError, InputError
from edgeadapt.device.head import ClassStats, Head
from edgeadapt.benchmarks.fewshot_measure import (
    against_joint,
    background_imprint_head,
    head_scores,
    per_class_accuracy,
    shrinkage_discriminant_head,
    simpleshot_head,
)

logger = logging.getLogger(__name__)

JOINT = "joint"
#: Reference baselines implemented here (plain imprinting is the SDK's method "imprint").
BASELINES = ("simpleshot", "shrinkage_discriminant", "imprint_background")
METRICS = ("old_accuracy", "new_recall", "harmonic_mean", "ratio_to_joint", "old_drop")


@dataclass(frozen=True)
class FewShotOptions:
    """What :func:`run_fewshot_on_embeddings` measures.

    ``shots``: examples per new class (each >= 1). ``draws``: random draws of the shots per
    split. ``splits``: seeded base/new class splits when the classes are not given.
    ``methods``: SDK methods (:data:`edgeadapt.device.incremental.METHODS`) and baselines
    (:data:`BASELINES`) to run; None: all. ``test_fraction``: share of each class's photos held
    out for testing. ``references_per_class``: base-class training embeddings kept as
    calibration embeddings (what a bundle stores as references). ``head_epochs``: epochs of
    the base head and of the joint retrain.
    """

    shots: tuple[int, ...] = (1, 5, 20)
    draws: int = 10
    splits: int = 4
    seed: int = 0
    methods: tuple[str, ...] | None = None
    test_fraction: float = 0.4
    references_per_class: int = 5
    head_epochs: int = 100

    def __post_init__(self) -> None:
        if not self.shots or any(int(shot) < 1 for shot in self.shots):
            raise InputError(f"shots must be counts of at least 1 photo per new class, got {self.shots}")
        if self.draws < 1:
            raise InputError(f"draws must be at least 1, got {self.draws}")
        if self.splits < 1:
            raise InputError(f"splits must be at least 1, got {self.splits}")
        if not 0.0 < self.test_fraction < 1.0:
            raise InputError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.references_per_class < 0:
            raise InputError(f"references_per_class must be non-negative, got {self.references_per_class}")
        if self.head_epochs < 1:
            raise InputError(f"head_epochs must be at least 1, got {self.head_epochs}")
        if self.methods is not None:
            known = available_methods()
            unknown = [name for name in self.methods if name not in known]
            if unknown:
                raise InputError(f"unknown method(s) {unknown}; choose from {', '.join(known)}")


def available_methods() -> tuple[str, ...]:
    """Every SDK method (read at run time) followed by the reference baselines."""
    return tuple(head_math.METHODS) + BASELINES


@dataclass
class EmbeddedData:
    """Precomputed embeddings of a class-folder dataset, already split per class.

    ``train``/``test``: (embeddings (N, D), labels (N,)) with labels indexing ``class_names``.
    ``background``: optional embeddings (M, D) of ordinary photos (calibration only).
    """

    class_names: list[str]
    train: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    background: np.ndarray | None = None
    description: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, (embeddings, labels) in (("train", self.train), ("test", self.test)):
            if embeddings.ndim != 2 or labels.shape != (embeddings.shape[0],):
                raise InputError(f"{name} embeddings {embeddings.shape} and labels {labels.shape} do not match")
            if not np.all(np.isfinite(embeddings)):
                raise InputError(f"{name} embeddings contain NaN or infinite values; check the backbone and images")
            missing = [self.class_names[index] for index in range(len(self.class_names)) if not np.any(labels == index)]
            if missing:
                raise InputError(f"class(es) {missing} have no {name} photo; every class needs at least 2 photos")


@dataclass
class Setup:
    """What a method may use: the base head and what a trained bundle carries with it."""

    base_head: Head
    stats: ClassStats | None
    calibration: np.ndarray | None
    base_train: tuple[np.ndarray, np.ndarray] | None  # None for an imported head (no base photos)


#: A method: (setup, one (k, D) array of shots per new class) -> the updated head (old classes first).
MethodFunction = Callable[[Setup, list[np.ndarray]], Head]


def sdk_method(name: str) -> MethodFunction:
    """The SDK method ``name`` called exactly as the device calls it."""

    def run(setup: Setup, shots: list[np.ndarray]) -> Head:
        head, _ = head_math.add_classes(setup.base_head, setup.stats, shots, head_math.AddClassOptions(method=name),
                                        calibration=setup.calibration)
        return head

    return run


def _simpleshot(setup: Setup, shots: list[np.ndarray]) -> Head:
    if setup.base_train is None:
        raise IncompatibleModelError("SimpleShot needs the base classes' training embeddings, and this head has none "
                                     "(an imported head comes without its training photos)")
    return simpleshot_head(setup.base_train[0], setup.base_train[1], setup.base_head.num_classes, shots)


def _discriminant(setup: Setup, shots: list[np.ndarray]) -> Head:
    return shrinkage_discriminant_head(setup.stats, shots)


def _background_imprint(setup: Setup, shots: list[np.ndarray]) -> Head:
    return background_imprint_head(setup.base_head, shots, setup.calibration)


def method_functions(names: Sequence[str] | None = None) -> dict[str, MethodFunction]:
    """The runnable methods named ``names`` (None: every SDK method, then the baselines)."""
    baselines: dict[str, MethodFunction] = {"simpleshot": _simpleshot, "shrinkage_discriminant": _discriminant,
                                            "imprint_background": _background_imprint}
    chosen = available_methods() if names is None else tuple(names)
    return {name: baselines[name] if name in baselines else sdk_method(name) for name in chosen}


# ============================================================================= splits
def per_class_split(labels: np.ndarray, class_names: Sequence[str], test_fraction: float,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class (train, test) indices, seeded by ``seed`` and the class name.

    A class with n >= 2 photos keeps ``round(test_fraction n)`` (at least 1, at most n - 1)
    for testing. The same photo lands on the same side whatever other classes there are.
    """
    labels = np.asarray(labels).reshape(-1)
    train, test = [], []
    for index, name in enumerate(class_names):
        members = np.flatnonzero(labels == index)
        if members.size < 2:
            raise InputError(f"class {name!r} has {members.size} distinct photo(s); it needs at least 2 (train and test)")
        order = np.random.default_rng([seed, zlib.crc32(name.encode())]).permutation(members)
        count = min(max(1, round(test_fraction * members.size)), members.size - 1)
        test.append(order[:count])
        train.append(order[count:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def class_splits(class_names: Sequence[str], base: Sequence[str] | None, new: Sequence[str] | None,
                 splits: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """Base/new class splits: the given one, or ``splits`` distinct seeded ones (new = about 3/7).

    Raises:
        InputError: for unknown or overlapping names, fewer than 2 base classes or no new class.
    """
    names = list(class_names)
    for given in (base or [], new or []):
        unknown = [name for name in given if name not in names]
        if unknown:
            raise InputError(f"class(es) {unknown} are not class folders of the data; available: {names}")
        if len(set(given)) != len(given):
            raise InputError(f"class list {list(given)} names a class twice")
    if base is not None or new is not None:
        base_list = list(base) if base is not None else [name for name in names if name not in (new or [])]
        new_list = list(new) if new is not None else [name for name in names if name not in base_list]
        overlap = sorted(set(base_list) & set(new_list))
        if overlap:
            raise InputError(f"class(es) {overlap} are both base and new classes; a class is either one")
        _check_split_sizes(len(base_list), len(new_list))
        return [(base_list, new_list)]
    new_count = max(1, round(3 * len(names) / 7))
    _check_split_sizes(len(names) - new_count, new_count)
    wanted = min(splits, math.comb(len(names), new_count))
    chosen: list[tuple[list[str], list[str]]] = []
    seen: set[frozenset] = set()
    candidate = 0
    while len(chosen) < wanted:
        order = np.random.default_rng([seed, 7919, candidate]).permutation(len(names))
        new_set = frozenset(int(index) for index in order[:new_count])
        candidate += 1
        if new_set in seen:
            continue
        seen.add(new_set)
        chosen.append(([names[i] for i in range(len(names)) if i not in new_set],
                       [names[int(i)] for i in order[:new_count]]))
    return chosen


def _check_split_sizes(base: int, new: int) -> None:
    if base < 2:
        raise InputError(f"{base} base class(es): the base head needs at least 2; give more class folders")
    if new < 1:
        raise InputError("no new class: give --new-classes or leave some class folders out of --base-classes")


# ============================================================================= one split
def base_setup(train: tuple[np.ndarray, np.ndarray], base_count: int, background: np.ndarray | None,
               options: FewShotOptions, split_seed: int) -> Setup:
    """The base head (normalisation "center"), statistics with Gram, and calibration embeddings."""
    from edgeadapt.training.head_training import DEFAULT_NORMALIZATION, HeadTrainingOptions, train_head

    embeddings, labels = train
    head = train_head(embeddings, labels, base_count,
                      HeadTrainingOptions(seed=split_seed, normalization=DEFAULT_NORMALIZATION,
                                          epochs=options.head_epochs))
    stats = ClassStats.from_embeddings(embeddings, labels, base_count, with_gram=True)
    with_basis = getattr(head_math, "with_ridge_basis", None)
    if with_basis is not None:
        stats = with_basis(head, stats) or stats
    parts = []
    rng = np.random.default_rng([split_seed, 104729])
    for label in range(base_count):
        members = np.flatnonzero(labels == label)
        count = min(options.references_per_class, members.size)
        if count:
            parts.append(embeddings[np.sort(rng.choice(members, count, replace=False))])
    if background is not None and len(background):
        parts.append(np.asarray(background, dtype=np.float32))
    calibration = np.concatenate(parts).astype(np.float32) if parts else None
    return Setup(head, stats, calibration, (embeddings, labels))


def draw_shots(labels: np.ndarray, embeddings: np.ndarray, new_labels: Sequence[int], shots: int, seed: int,
               split: int, draw: int) -> list[np.ndarray]:
    """``shots`` training embeddings per new class; the draw is nested (k=5 contains k=1's photo)."""
    arrays = []
    for label in new_labels:
        members = np.flatnonzero(labels == label)
        order = np.random.default_rng([seed, split, draw, int(label)]).permutation(members)
        arrays.append(embeddings[np.sort(order[: min(shots, members.size)])])
    return arrays


def run_draws(train: tuple[np.ndarray, np.ndarray], new_labels: Sequence[int], setup: Setup,
              methods: Mapping[str, MethodFunction], options: FewShotOptions, split: int, what: str,
              score: Callable[[Head], dict]) -> dict[str, dict[str, list[dict]]]:
    """Every method at every k in every draw: the one loop of both few-shot scenarios.

    Args:
        train: (embeddings, labels) holding the new classes' training photos.
        new_labels: the new classes' labels in ``train``.
        setup: the base head and what it carries, handed to every method.
        methods: the methods by name.
        options: shots, draws and seed.
        split: the split number (seeds the draws with ``options.seed``).
        what: the scenario in the progress log ("split 0", "stability").
        score: the figures of an updated head.

    Returns:
        ``{name: {k: [score(head) + {"seconds"}, or {"n/a": reason}, one per draw]}}``.
    """
    results: dict[str, dict[str, list[dict]]] = {name: {str(k): [] for k in options.shots} for name in methods}
    for draw in range(options.draws):
        for shots in options.shots:
            arrays = draw_shots(train[1], train[0], new_labels, shots, options.seed, split, draw)
            for name, function in methods.items():
                start = time.perf_counter()
                try:
                    head = function(setup, arrays)
                except EdgeAdaptError as error:
                    results[name][str(shots)].append({"n/a": str(error)})
                    continue
                seconds = time.perf_counter() - start
                results[name][str(shots)].append({**score(head), "seconds": seconds})
        logger.info("%s draw %d measured", what, draw)
    return results


def run_split(data: EmbeddedData, base: Sequence[str], new: Sequence[str], options: FewShotOptions,
              split: int = 0, methods: Mapping[str, MethodFunction] | None = None) -> dict:
    """Measure every method on one base/new class split (see the module docstring).

    Returns:
        ``{"base_classes", "new_classes", "base_old_accuracy", "joint", "methods": {name: {k: [draw scores
        or {"n/a": reason}]}}}``, the per-draw scores being :func:`against_joint` dictionaries
        plus ``seconds``.
    """
    methods = dict(methods) if methods is not None else method_functions(options.methods)
    order = [data.class_names.index(name) for name in list(base) + list(new)]
    relabel = np.full(len(data.class_names), -1, np.int64)
    relabel[order] = np.arange(len(order))

    def subset(part: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        labels = relabel[part[1]]
        keep = labels >= 0
        return part[0][keep], labels[keep]

    train, test = subset(data.train), subset(data.test)
    base_count = len(base)
    old_classes, new_classes = list(range(base_count)), list(range(base_count, len(order)))
    old_train = train[1] < base_count
    split_seed = options.seed * 1000 + split
    setup = base_setup((train[0][old_train], train[1][old_train]), base_count, data.background, options, split_seed)
    old_test = test[1] < base_count
    base_predictions = setup.base_head.logits(test[0][old_test]).argmax(axis=1)
    base_old = per_class_accuracy(base_predictions, test[1][old_test], old_classes)

    from edgeadapt.training.head_training import DEFAULT_NORMALIZATION, HeadTrainingOptions, train_head

    joint_head = train_head(train[0], train[1], len(order), HeadTrainingOptions(
        seed=split_seed, normalization=DEFAULT_NORMALIZATION, epochs=options.head_epochs))
    joint = head_scores(joint_head, test[0], test[1], old_classes, new_classes)
    results = run_draws(train, new_classes, setup, methods, options, split, f"split {split}",
                        lambda head: against_joint(head_scores(head, test[0], test[1], old_classes, new_classes),
                                                   joint, base_old))
    results[JOINT] = {str(k): [against_joint(joint, joint, base_old)] for k in options.shots}
    return {"base_classes": list(base), "new_classes": list(new), "base_old_accuracy": base_old, "joint": joint,
            "train_photos": int(len(train[1])), "test_photos": int(len(test[1])), "methods": results}


# ============================================================================= summary
def _median_entry(entries: list[dict]) -> dict:
    scored = [entry for entry in entries if "n/a" not in entry]
    if not scored:
        reason = entries[0]["n/a"] if entries else "not run"
        return {**{metric: None for metric in METRICS}, "n/a": reason}
    summary = {metric: float(np.median([entry[metric] for entry in scored])) for metric in METRICS}
    if "seconds" in scored[0]:
        summary["update_ms"] = float(np.median([entry["seconds"] for entry in scored]) * 1000.0)
    if len(scored) < len(entries):
        summary["failed_draws"] = len(entries) - len(scored)
    return summary


def summarise(split_results: list[dict], options: FewShotOptions, default_method: str | None = None) -> dict:
    """The JSON report: medians over splits x draws, plus per-split medians over draws in ``splits``."""
    names = list(split_results[0]["methods"])
    methods = {}
    for name in names:
        methods[name] = {str(k): _median_entry([entry for result in split_results
                                                for entry in result["methods"][name][str(k)]])
                         for k in options.shots}
    joint = {metric: float(np.median([result["joint"][metric] for result in split_results]))
             for metric in ("old_accuracy", "new_recall", "harmonic_mean")}
    per_split = []
    for result in split_results:
        per_split.append({key: result[key] for key in ("base_classes", "new_classes", "base_old_accuracy", "joint",
                                                       "train_photos", "test_photos")}
                         | {"methods": {name: {k: _median_entry(entries) for k, entries in by_shot.items()}
                                        for name, by_shot in result["methods"].items()}})
    return {
        "base_old_accuracy": float(np.median([result["base_old_accuracy"] for result in split_results])),
        "joint": joint,
        "default_method": default_method or head_math.DEFAULT_METHOD,
        "methods": methods,
        "shots": [int(k) for k in options.shots],
        "draws": options.draws,
        "seed": options.seed,
        "baselines": list(BASELINES) + [JOINT],
        "measure": "medians over splits x draws; old_accuracy: mean per-class accuracy of the old classes, "
                   "new_recall: mean per-class recall of the new classes (argmax over all classes); "
                   "ratio_to_joint: harmonic mean / the joint retrain's on the same split; old_drop: base head's "
                   "old-class accuracy minus the updated head's (positive = lost)",
        "splits": per_split,
    }


def run_fewshot_on_embeddings(data: EmbeddedData, options: FewShotOptions, base: Sequence[str] | None = None,
                              new: Sequence[str] | None = None,
                              methods: Mapping[str, MethodFunction] | None = None) -> dict:
    """The few-shot benchmark on precomputed embeddings; returns the JSON report (see :func:`summarise`).

    Args:
        data: the embedded, per-class split dataset.
        options: shots, draws, splits, seed, methods.
        base: base class names (None: the classes not in ``new``, or seeded splits).
        new: new class names (None: the classes not in ``base``, or seeded splits).
        methods: extra or replacement methods by name (None: :func:`method_functions` of ``options.methods``).

    Raises:
        InputError: on bad class lists or options.
    """
    start = time.perf_counter()
    chosen = methods if methods is not None else method_functions(options.methods)
    results = [run_split(data, split_base, split_new, options, number, chosen)
               for number, (split_base, split_new) in enumerate(
                   class_splits(data.class_names, base, new, options.splits, options.seed))]
    report = summarise(results, options)
    report["dataset"] = data.description
    report["seconds"] = time.perf_counter() - start
    return report
