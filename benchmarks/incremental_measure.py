"""Measuring one class order of the class-incremental benchmark.

Owns the methods and baselines a row can name (``joint``, ``joint (old data + shots)``,
``resolve_all`` beside :data:`edgeadapt.device.incremental.METHODS`), the base heads, the
shot selection, the fair scores of one updated head and the bytes a method keeps per class.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from edgeadapt.benchmarks.incremental_data import OrderData
from edgeadapt.device import incremental as head_math
from edgeadapt.device.head import ClassStats, Head
from edgeadapt.device.incremental import DEFAULT_METHOD
from edgeadapt.benchmarks.fewshot_measure import fair_scores, per_class_accuracy

if TYPE_CHECKING:
    from edgeadapt.benchmarks.incremental import IncrementalBenchmarkOptions

ALL_SHOTS = 0  # "all": every training image of the new classes
JOINT = "joint"
JOINT_SHOTS = "joint (old data + shots)"
RESOLVE = "resolve_all"
COSINE_TEMPERATURE = 0.1
#: Head training of the base heads and the joint baselines: long enough to converge on small data.
HEAD_EPOCHS = 200
HEAD_PATIENCE = 20


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
    from edgeadapt.training.head_training import DEFAULT_NORMALIZATION, HeadTrainingOptions, train_head

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
    from edgeadapt.training.head_training import DEFAULT_NORMALIZATION, HeadTrainingOptions, train_head

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

