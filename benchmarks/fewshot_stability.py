"""The seed scenario of ``edgeadapt bench fewshot --imported-head``: new classes on a pretrained head.

The base head is the bundle's OWN head (e.g. the 1001-class ImageNet head of an imported
MobileNet) with whatever the bundle carries (class statistics, references, background). At
each k the new classes are added from k training photos each, and per method we report:

- ``changed_share``: the share of the stability photos (ordinary photos of the old classes)
  whose top-1 changes; ``new_claim_share``: the share now predicted as a new class;
- ``new_recall``: mean per-class recall of the new classes on their held-out photos
  (argmax over all classes);
- with labelled stability photos (``index.csv``): top-1 accuracy before and after.
"""

from __future__ import annotations

import logging
from typing import Mapping

import numpy as np

from edgeadapt.benchmarks.fewshot import FewShotOptions, MethodFunction, Setup, method_functions, run_draws
from edgeadapt.device import incremental as head_math
from edgeadapt.device.errors import InputError
from edgeadapt.device.head import ClassStats, Head
from edgeadapt.benchmarks.fewshot_measure import per_class_accuracy

logger = logging.getLogger(__name__)

STABILITY_METRICS = ("changed_share", "new_claim_share", "new_recall", "top1_accuracy_after")


def run_stability_on_embeddings(
    base_head: Head,
    stats: ClassStats | None,
    calibration: np.ndarray | None,
    new_train: tuple[np.ndarray, np.ndarray],
    new_test: tuple[np.ndarray, np.ndarray],
    new_classes: list[str],
    stability: np.ndarray,
    stability_labels: np.ndarray | None,
    options: FewShotOptions,
    methods: Mapping[str, MethodFunction] | None = None,
) -> dict:
    """Add ``new_classes`` to ``base_head`` at every k and measure old-photo stability and new recall.

    Args:
        base_head: the bundle's own head (C classes).
        stats: the bundle's class statistics, or None.
        calibration: the bundle's calibration embeddings (references, background), or None.
        new_train: (embeddings, labels 0..N-1) of the new classes' training photos.
        new_test: (embeddings, labels 0..N-1) of their held-out photos.
        new_classes: the N new class names.
        stability: embeddings (M, D) of the stability photos.
        stability_labels: each stability photo's true head column (-1: unknown), or None.
        options: shots, draws, seed, methods.
        methods: replacement methods by name (None: :func:`method_functions` of ``options.methods``).

    Returns:
        The report: ``{"mode": "imported-head", "default_method", "stability": {...}, "methods": {name:
        {k: {"changed_share", "new_claim_share", "new_recall", "top1_accuracy_after", "update_ms"} or
        {"n/a": reason}}}}`` (medians over draws).

    Raises:
        InputError: for an empty stability set or embeddings of the wrong size.
    """
    stability = np.asarray(stability, dtype=np.float32)
    if stability.ndim != 2 or stability.shape[0] == 0 or stability.shape[1] != base_head.embedding_size:
        raise InputError(f"stability embeddings must be (M >= 1, {base_head.embedding_size}), got {stability.shape}")
    methods = dict(methods) if methods is not None else method_functions(options.methods)
    count = base_head.num_classes
    before, labelled, top1_before = _before_update(base_head, stability, stability_labels)
    setup = Setup(base_head, stats, calibration, None)
    new_labels = list(range(len(new_classes)))

    def score(head: Head) -> dict:
        after = head.logits(stability).argmax(axis=1)
        predicted_new = head.logits(new_test[0]).argmax(axis=1) - count
        return {
            "changed_share": float(np.mean(after != before)),
            "new_claim_share": float(np.mean(after >= count)),
            "new_recall": per_class_accuracy(predicted_new, new_test[1], new_labels),
            "top1_accuracy_after": None if top1_before is None
            else float(np.mean(after[labelled] == stability_labels[labelled])),
        }

    results = run_draws(new_train, new_labels, setup, methods, options, 0, "stability", score)
    summary = {name: {k: _median(entries) for k, entries in by_shot.items()} for name, by_shot in results.items()}
    return {
        "mode": "imported-head",
        "default_method": head_math.DEFAULT_METHOD,
        # what the device may use instead when the default needs statistics the bundle lacks (read at run time)
        "statistics_free_method": getattr(head_math, "STATISTICS_FREE_METHOD", None),
        "base_classes": count,
        "baselines": [name for name in methods if name not in head_math.METHODS],
        "new_classes": list(new_classes),
        "stability": {"photos": int(stability.shape[0]),
                      "labelled": int(np.sum(labelled)) if labelled is not None else 0,
                      "top1_accuracy_before": top1_before},
        "bundle_carries": {"statistics": stats is not None, "gram": stats is not None and stats.gram is not None,
                           "calibration_embeddings": 0 if calibration is None else int(len(calibration))},
        "shots": [int(k) for k in options.shots],
        "draws": options.draws,
        "seed": options.seed,
        "measure": "medians over draws; changed_share: stability photos whose top-1 changed; new_claim_share: "
                   "stability photos now predicted as a new class; new_recall: mean per-class recall of the new "
                   "classes on their held-out photos (argmax over all classes)",
        "methods": summary,
    }


def _before_update(base_head: Head, stability: np.ndarray, stability_labels: np.ndarray | None
                   ) -> tuple[np.ndarray, np.ndarray | None, float | None]:
    """(the base head's top-1 on the stability photos, which are labelled, their top-1 accuracy or None)."""
    before = base_head.logits(stability).argmax(axis=1)
    labelled = None if stability_labels is None else np.asarray(stability_labels) >= 0
    top1_before = None
    if labelled is not None and np.any(labelled):
        top1_before = float(np.mean(before[labelled] == stability_labels[labelled]))
    return before, labelled, top1_before


def _median(entries: list[dict]) -> dict:
    scored = [entry for entry in entries if "n/a" not in entry]
    if not scored:
        return {**{metric: None for metric in STABILITY_METRICS}, "n/a": entries[0]["n/a"] if entries else "not run"}
    summary = {}
    for metric in STABILITY_METRICS:
        values = [entry[metric] for entry in scored if entry[metric] is not None]
        summary[metric] = float(np.median(values)) if values else None
    summary["update_ms"] = float(np.median([entry["seconds"] for entry in scored]) * 1000.0)
    return summary
