"""``edgeadapt bench fewshot``: few-shot class addition measured fairly (docs/INCREMENTAL.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from edgeadapt.device.cli_common import BACKEND_CHOICES


def _names(text: str | None, option: str) -> list[str] | None:
    if text is None:
        return None
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        from edgeadapt.device.errors import InputError

        raise InputError(f"{option} {text!r} has an empty name; give comma-separated class folder names")
    return names


def _shots(text: str) -> tuple[int, ...]:
    from edgeadapt.device.errors import InputError

    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError as error:
        raise InputError(f"--shots {text!r}: give comma-separated counts such as 1,5,20") from error
    if not values or min(values) < 1:
        raise InputError(f"--shots {text!r}: every count must be at least 1 photo per new class")
    return values


def bench_fewshot_command(arguments: argparse.Namespace) -> int:
    """Run the benchmark, print the table (or JSON), write --json-out / --report."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from edgeadapt.benchmarks.fewshot import FewShotOptions
    from edgeadapt.benchmarks.fewshot_data import run_folder_benchmark, run_imported_head_benchmark
    from edgeadapt.device.errors import InputError
    from edgeadapt.benchmarks.fewshot_report import REPORT_SUFFIXES, report_table, write_report

    if arguments.report is not None and arguments.report.suffix.lower() not in REPORT_SUFFIXES:
        raise InputError(f"--report {arguments.report}: the file must end in {' or '.join(REPORT_SUFFIXES)}")
    options = FewShotOptions(shots=_shots(arguments.shots), draws=arguments.draws, splits=arguments.splits,
                             seed=arguments.seed, methods=tuple(_names(arguments.methods, "--methods") or ()) or None)
    base = _names(arguments.base_classes, "--base-classes")
    new = _names(arguments.new_classes, "--new-classes")
    common = {"background": arguments.background, "cache_dir": arguments.cache, "verbose": arguments.verbose,
              "backend": arguments.backend}
    if arguments.imported_head:
        if arguments.stability is None:
            raise InputError("--imported-head measures the bundle's own head on --stability DIR (ordinary photos of "
                             "its classes); give --stability")
        if base is not None:
            raise InputError("--imported-head uses the bundle's own classes as base classes; leave --base-classes out")
        report = run_imported_head_benchmark(arguments.data, arguments.backbone_bundle, options, arguments.stability,
                                             new=new, **common)
    else:
        if arguments.stability is not None:
            raise InputError("--stability measures the bundle's own head; add --imported-head (base head = the "
                             "bundle's head, new classes from --new-classes)")
        report = run_folder_benchmark(arguments.data, arguments.backbone_bundle, options, base=base, new=new, **common)
    text = json.dumps(report, indent=2)
    if arguments.json_out is not None:
        arguments.json_out.parent.mkdir(parents=True, exist_ok=True)
        arguments.json_out.write_text(text + "\n", encoding="utf-8")
    if arguments.report is not None:
        write_report(report, arguments.report)
        print(f"report written to {arguments.report}", file=sys.stderr)
    print(text if arguments.json else report_table(report))
    return 0


def add_fewshot_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``edgeadapt bench fewshot``."""
    from edgeadapt.benchmarks.fewshot import available_methods

    parser.add_argument("--data", type=Path, required=True, help="image folder: one sub-folder of photos per class")
    parser.add_argument("--backbone-bundle", type=Path, required=True, metavar="BUNDLE",
                        help="bundle whose backbone embeds every photo (e.g. `edgeadapt import MODEL.tflite ...`)")
    parser.add_argument("--base-classes", metavar="A,B,..",
                        help="base classes (default: the classes not in --new-classes, or --splits seeded splits)")
    parser.add_argument("--new-classes", metavar="X,Y,..",
                        help="classes added from k shots (default: the classes not in --base-classes, or --splits "
                        "seeded splits; with --imported-head: every class folder)")
    parser.add_argument("--shots", default="1,5,20", help="photos per new class, comma-separated (default 1,5,20)")
    parser.add_argument("--draws", type=int, default=10, help="random draws of the shots per split (default 10)")
    parser.add_argument("--splits", type=int, default=4,
                        help="seeded base/new class splits (new = about 3/7 of the classes) when neither "
                        "--base-classes nor --new-classes is given (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the photo split, class splits and draws (default 0)")
    parser.add_argument("--methods", metavar="M1,M2",
                        help=f"methods to run (default: all): {', '.join(available_methods())}")
    parser.add_argument("--background", type=Path, metavar="DIR",
                        help="folder of ordinary photos (unlabelled) whose embeddings join the calibration "
                        "embeddings, as a bundle imported with a background carries them")
    parser.add_argument("--stability", type=Path, metavar="DIR",
                        help="with --imported-head: photos whose top-1 under the bundle's own head should not change "
                        "(optional index.csv: file -> label_index_1001 / imagenet_index)")
    parser.add_argument("--imported-head", action="store_true",
                        help="seed scenario: the base head is the bundle's own head (e.g. 1001 ImageNet classes); "
                        "the new classes are added to it")
    parser.add_argument("--cache", type=Path, metavar="DIR",
                        help="embedding cache folder (default ~/.cache/edgeadapt/embeddings)")
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                        help="interpreter that runs the backbone (default auto: LiteRT first)")
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    parser.add_argument("--json-out", type=Path, metavar="FILE", help="also write the JSON report to FILE")
    parser.add_argument("--report", type=Path, metavar="FILE",
                        help="write the curves (old-class accuracy and new-class recall against shots) to FILE.png, "
                        "or FILE.html (figure + table)")


def register(subparsers) -> None:
    """Add ``bench fewshot`` to the ``bench`` group."""
    from edgeadapt.cli.incremental import _bench_subparsers

    benchmarks = _bench_subparsers(subparsers)
    parser = benchmarks.add_parser(
        "fewshot",
        help="few-shot class addition: old-class accuracy, new-class recall and harmonic mean against the joint "
        "retrain, for every method and reference baseline",
        description="Split each class's photos 60/40 (seeded), train the base head on the base classes, add the new "
        "classes from k photos each with every SDK method (as the device does) and the reference baselines "
        "(SimpleShot, shrinkage discriminant), over several draws and class splits; report old-class accuracy, "
        "new-class recall, their harmonic mean and ratio to the joint retrain, and the old-class drop. With "
        "--imported-head, add the classes to the bundle's own head and report how many --stability photos change.",
    )
    add_fewshot_arguments(parser)
    parser.set_defaults(handler=bench_fewshot_command)
