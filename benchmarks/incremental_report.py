"""The report of the class-incremental benchmark: rows averaged over orders, figures, table.

Owns :class:`IncrementalBenchmarkReport` (its table and JSON), the row order of the table,
averaging each (shots, method) over the class orders and the figure checks of
docs/INCREMENTAL.md.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeadapt.benchmarks.incremental_measure import ALL_SHOTS, JOINT, JOINT_SHOTS, RESOLVE
from edgeadapt.device.incremental import DEFAULT_METHOD, METHODS


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



def row_order(methods: Sequence[str]) -> list[str]:
    """The table's method order: the joint retrain, each method run (``resolve_all`` after the default), the
    joint retrain on old data + shots.

    Args:
        methods: the methods the benchmark ran.

    Returns:
        Method and baseline names in table order.
    """
    order = [JOINT]
    for method in METHODS:
        if method in methods:
            order.append(method)
            if method == DEFAULT_METHOD:
                order.append(RESOLVE)
    order.append(JOINT_SHOTS)
    return order


def benchmark_figures(rows: list[dict], shots: Sequence[int]) -> dict:
    """The figure checks of docs/INCREMENTAL.md on the averaged rows.

    Args:
        rows: the report's rows (:func:`aggregate_rows`).
        shots: the shot counts run.

    Returns:
        ``{"checks": [{"name", "value", "passed", "text"}], "passed": all passed}``.
    """
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


def aggregate_rows(per_order: list[dict], shots_list: Sequence[int], methods: Sequence[str]) -> list[dict]:
    """One row per (shots, method): mean, std and per-order values of each order's measurements.

    Args:
        per_order: each order's ``{"shots|method": Measurement}`` (from ``measure_order``).
        shots_list: the shot counts, in table order.
        methods: the methods the benchmark ran (the row order adds the baselines).

    Returns:
        The report's rows, in table order; (shots, method) pairs no order measured are left out.
    """
    rows = []
    for shots in shots_list:
        for method in row_order(methods):
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
    return rows
