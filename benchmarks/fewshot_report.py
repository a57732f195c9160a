"""Tables and figures of ``edgeadapt bench fewshot`` (matplotlib is imported only to draw)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from edgeadapt.device.errors import InputError
from edgeadapt.device.safefs import durable_write

REPORT_SUFFIXES = (".html", ".png")


def _number(value, width: int = 7, signed: bool = False) -> str:
    if value is None:
        return f"{'-':>{width}}"
    return f"{value:>+{width}.3f}" if signed else f"{value:>{width}.3f}"


def _method_label(name: str, report: dict) -> str:
    if name == report.get("default_method"):
        return f"{name} (default)"
    if name == report.get("statistics_free_method"):
        return f"{name} (statistics-free)"
    if name in report.get("baselines", []):
        return f"{name} (reference)"
    return name


def fewshot_table(report: dict) -> str:
    """The readable table of a class-folder run (:func:`edgeadapt.benchmarks.fewshot.summarise`)."""
    dataset = report.get("dataset", {})
    backbone = report.get("backbone", {})
    splits = report.get("splits", [])
    lines = [
        f"few-shot benchmark: {dataset.get('data', '?')} ({len(dataset.get('classes', []))} classes, "
        f"{dataset.get('photos', '?')} photos; {dataset.get('split', '')})",
    ]
    if backbone:
        lines.append(f"  backbone: {backbone.get('name')} from {backbone.get('bundle')} ({backbone.get('embedding_size')}-d, "
                     f"{backbone.get('model_file')} on {backbone.get('backend')}, fingerprint "
                     f"{str(backbone.get('fingerprint', '')).split(':')[-1][:12]})")
    for number, split in enumerate(splits):
        lines.append(f"  split {number}: base {', '.join(split['base_classes'])} -> new {', '.join(split['new_classes'])}"
                     f"  (base old acc {split['base_old_accuracy']:.3f}; joint old {split['joint']['old_accuracy']:.3f} "
                     f"new {split['joint']['new_recall']:.3f} hm {split['joint']['harmonic_mean']:.3f}; "
                     f"{split['train_photos']} train / {split['test_photos']} test photos)")
    joint = report["joint"]
    lines.append(f"  medians over {len(splits)} split(s) x {report.get('draws')} draw(s): base head old-class accuracy "
                 f"{report['base_old_accuracy']:.3f}; joint retrain old {joint['old_accuracy']:.3f}, new "
                 f"{joint['new_recall']:.3f}, harmonic mean {joint['harmonic_mean']:.3f}")
    lines.append("")
    lines.append(f"{'k':>3}  {'method':<38}{'old acc':>8}{'new rec':>8}{'h-mean':>8}{'/joint':>8}{'old drop':>9}"
                 f"{'ms':>8}")
    for shots in [str(k) for k in report["shots"]]:
        for name, by_shot in report["methods"].items():
            entry = by_shot[shots]
            label = _method_label(name, report)
            if entry.get("n/a"):
                lines.append(f"{shots:>3}  {label:<38}n/a: {entry['n/a'][:100]}")
                continue
            milliseconds = entry.get("update_ms")
            lines.append(f"{shots:>3}  {label:<38}{_number(entry['old_accuracy'], 8)}{_number(entry['new_recall'], 8)}"
                         f"{_number(entry['harmonic_mean'], 8)}{_number(entry['ratio_to_joint'], 8)}"
                         f"{_number(entry['old_drop'], 9, signed=True)}"
                         f"{'' if milliseconds is None else f'{milliseconds:>8.1f}'}")
        lines.append("")
    lines.append("old acc: mean per-class accuracy of the old classes; new rec: mean per-class recall of the new "
                 "classes (argmax over all classes); h-mean: their harmonic mean; /joint: h-mean over the joint "
                 "retrain's (same split); old drop: base head's old-class accuracy minus the updated head's "
                 "(positive = lost); ms: head update time")
    return "\n".join(lines)


def stability_table(report: dict) -> str:
    """The readable table of an ``--imported-head`` run (:mod:`edgeadapt.benchmarks.fewshot_stability`)."""
    stability = report["stability"]
    carries = report.get("bundle_carries", {})
    lines = [
        f"seed scenario: {len(report['new_classes'])} new classes ({', '.join(report['new_classes'])}) added to the "
        f"bundle's own {report['base_classes']}-class head ({report.get('backbone', {}).get('bundle', '')})",
        f"  bundle carries: statistics {'yes' if carries.get('statistics') else 'no'}"
        f"{' (with Gram)' if carries.get('gram') else ''}, {carries.get('calibration_embeddings', 0)} calibration "
        f"embeddings (references + background)",
        f"  stability photos: {stability['photos']} from {stability.get('folder', '?')}"
        + (f"; top-1 accuracy before {stability['top1_accuracy_before']:.3f} ({stability['labelled']} labelled)"
           if stability.get("top1_accuracy_before") is not None else ""),
        f"  medians over {report['draws']} draw(s)",
        "",
        f"{'k':>3}  {'method':<38}{'changed':>9}{'to new':>8}{'new rec':>9}{'top-1 after':>13}{'ms':>8}",
    ]
    for shots in [str(k) for k in report["shots"]]:
        for name, by_shot in report["methods"].items():
            entry = by_shot[shots]
            label = _method_label(name, report)
            if entry.get("n/a"):
                lines.append(f"{shots:>3}  {label:<38}n/a: {entry['n/a'][:100]}")
                continue
            lines.append(f"{shots:>3}  {label:<38}{entry['changed_share']:>9.3f}{entry['new_claim_share']:>8.3f}"
                         f"{entry['new_recall']:>9.3f}{_number(entry['top1_accuracy_after'], 13)}"
                         f"{entry['update_ms']:>8.1f}")
        lines.append("")
    lines.append("changed: share of the stability photos whose top-1 changed; to new: share now predicted as a new "
                 "class; new rec: mean per-class recall of the new classes on their held-out photos; top-1 after: "
                 "accuracy on the labelled stability photos after the update")
    return "\n".join(lines)


def report_table(report: dict) -> str:
    """The table for either kind of report."""
    return stability_table(report) if report.get("mode") == "imported-head" else fewshot_table(report)


def _figure_png(report: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot

    stability = report.get("mode") == "imported-head"
    panels = (("changed_share", "stability photos whose top-1 changed"), ("new_recall", "new-class recall")) \
        if stability else (("old_accuracy", "old-class accuracy"), ("new_recall", "new-class recall"))
    shots = [int(k) for k in report["shots"]]
    figure, axes = pyplot.subplots(1, 2, figsize=(13, 4.2))
    for axis, (metric, title) in zip(axes, panels):
        for name, by_shot in report["methods"].items():
            values = [by_shot[str(k)].get(metric) for k in shots]
            if name == "joint" or all(value is None for value in values):
                continue
            default = name == report.get("default_method")
            axis.plot(shots, [float("nan") if value is None else value for value in values], marker="o",
                      linewidth=2.8 if default else 1.4, label=_method_label(name, report),
                      linestyle="--" if name in report.get("baselines", []) else "-")
        if not stability:
            axis.axhline(report["joint"][metric], color="black", linestyle=":", linewidth=1.5,
                         label="joint retrain (all photos)")
        axis.set_xscale("log")
        axis.set_xticks(shots)
        axis.set_xticklabels([str(k) for k in shots])
        axis.set_xlabel("shots per new class (k)")
        axis.set_title(title)
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    figure.legend(handles, labels, fontsize=8, loc="center right")
    figure.tight_layout(rect=(0, 0, 0.78, 1))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    pyplot.close(figure)
    return buffer.getvalue()


def write_report(report: dict, path: str | Path) -> Path:
    """Write the figure (``.png``) or a page with the figure and the table (``.html``).

    Raises:
        InputError: for another file suffix.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in REPORT_SUFFIXES:
        raise InputError(f"--report {path}: the file must end in {' or '.join(REPORT_SUFFIXES)}")
    png = _figure_png(report)
    if suffix == ".png":
        content = png
    else:
        encoded = base64.b64encode(png).decode("ascii")
        content = ("<!doctype html><html><head><meta charset='utf-8'><title>edgeadapt bench fewshot</title></head>"
                   "<body><h1>edgeadapt bench fewshot</h1>"
                   f"<img alt='few-shot curves' src='data:image/png;base64,{encoded}'>"
                   f"<pre>{html.escape(report_table(report))}</pre></body></html>").encode("utf-8")
    return durable_write(path, content)
