"""``edgeadapt add-classes``, ``edgeadapt merge-heads`` and ``edgeadapt bench incremental``."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from edgeadapt.device.cli_common import add_backend_option, add_json_options, emit_report


def _methods() -> tuple[str, ...]:
    from edgeadapt.device.incremental import METHODS

    return tuple(METHODS)


def _method_help() -> str:
    from edgeadapt.device.incremental import DEFAULT_METHOD, METHODS

    return f"calibration method: {', '.join(METHODS)} (default {DEFAULT_METHOD}; see docs/INCREMENTAL.md)"


def _methods() -> tuple[str, ...]:
    from edgeadapt.device.incremental import METHODS

    return METHODS


def _add_options(arguments: argparse.Namespace):
    from edgeadapt.device.incremental import DEFAULT_METHOD, AddClassOptions

    return AddClassOptions(method=arguments.method or DEFAULT_METHOD)


def _split_names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        from edgeadapt.device.errors import InputError

        raise InputError(f"--classes {text!r} has an empty name; give comma-separated class folder names")
    return names


def _add_classes(arguments: argparse.Namespace) -> int:
    from edgeadapt.bundles.incremental import add_classes

    result = add_classes(
        arguments.bundle,
        arguments.data,
        arguments.out,
        classes=_split_names(arguments.classes),
        options=_add_options(arguments) if arguments.method else None,  # None: chosen for what the bundle carries
        replay=arguments.replay,
        resolve=arguments.resolve,
        backend=arguments.backend,
        overwrite=arguments.overwrite,
    )
    emit_report(arguments, result.summary(), result.to_dict())
    return 0


def _merge_heads(arguments: argparse.Namespace) -> int:
    from edgeadapt.bundles.incremental import merge_heads

    result = merge_heads(arguments.a, arguments.b, arguments.out, options=_add_options(arguments),
                         overwrite=arguments.overwrite)
    emit_report(arguments, result.summary(), result.to_dict())
    return 0


def _parse_shots(text: str) -> tuple[int, ...]:
    from edgeadapt.device.errors import InputError

    shots = []
    for part in text.split(","):
        part = part.strip().lower()
        if part == "all":
            shots.append(0)
            continue
        try:
            value = int(part)
        except ValueError as error:
            raise InputError(f"--shots {text!r}: {part!r} is not a number or 'all'") from error
        if value < 1:
            raise InputError(f"--shots {text!r}: counts must be at least 1 (or 'all')")
        shots.append(value)
    return tuple(shots)


def bench_incremental_command(arguments: argparse.Namespace) -> int:
    """Run ``edgeadapt bench incremental``.

    Args:
        arguments: The parsed command line.

    Returns:
        0, or 1 with ``--check`` when a target figure is not reached.

    Raises:
        EdgeAdaptError: When the data or a method fails.
    """
    from edgeadapt.benchmarks.incremental import IncrementalBenchmarkOptions, run_incremental_benchmark
    from edgeadapt.device.incremental import METHODS

    methods = tuple(name.strip() for name in arguments.methods.split(",")) if arguments.methods else METHODS
    options = IncrementalBenchmarkOptions(
        data=arguments.data,
        base=arguments.base,
        step=arguments.step,
        shots=_parse_shots(arguments.shots),
        orders=arguments.orders,
        methods=methods,
        image_size=arguments.image_size,
        epochs=arguments.epochs,
        seed=arguments.seed,
        cache=arguments.cache,
        verbose=max(0, getattr(arguments, "verbose", 0)),
        backbone_bundle=arguments.backbone_bundle,
        backbone_backend=arguments.backbone_backend,
    )
    report = run_incremental_benchmark(options)
    if arguments.json_out:
        report.write_json(arguments.json_out)
    if arguments.json:  # the same document the file gets
        with tempfile.TemporaryDirectory() as directory:
            report.write_json(Path(directory) / "report.json")
            print((Path(directory) / "report.json").read_text())
    else:
        print(report.table())
    if arguments.check and not report.figures.get("passed", False):
        return 1
    return 0


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``edgeadapt bench incremental`` (shared with benchmarks/bench_incremental.py).

    Args:
        parser: The parser to add them to.

    Returns:
        None.
    """
    parser.add_argument("--data", type=Path, help="image folder: one sub-folder per class (default: built-in data)")
    parser.add_argument("--base", type=int, required=True, help="number of base classes the backbone is trained on")
    parser.add_argument("--step", type=int, required=True, help="number of new classes added in the step")
    parser.add_argument("--shots", default="1,5,20,all",
                        help="examples per new class, comma-separated, 'all' for every image")
    parser.add_argument("--orders", type=int, default=3, help="class orders, each with a fixed seed")
    parser.add_argument("--methods", help="comma-separated methods to compare (default: all)")
    parser.add_argument("--image-size", type=int,
                        help="resolution (default 64 for --data, 32 built-in; with --backbone-bundle the bundle's)")
    parser.add_argument("--epochs", type=int,
                        help="built-in backbone training epochs (default 25 for --data, 15 built-in)")
    parser.add_argument("--backbone-bundle", type=Path, metavar="BUNDLE",
                        help="use the pretrained backbone of this bundle (e.g. an imported ImageNet model, "
                        "`edgeadapt import`) instead of training the built-in CNN on the base classes; images are "
                        "embedded by the device runtime at the bundle's input size")
    add_backend_option(parser, "interpreter that runs --backbone-bundle (auto: LiteRT first)",
                       dest="backbone_backend", flag="--backbone-backend")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the orders and the shots")
    parser.add_argument("--cache", type=Path,
                        help="folder that keeps each order's embeddings, so a second run skips training")
    add_json_options(parser, "every figure")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 when a target figure of docs/INCREMENTAL.md is not reached")


def _bench_subparsers(subparsers):
    """The sub-commands of ``edgeadapt bench`` (created here unless another module already did)."""
    bench = subparsers.choices.get("bench")
    if bench is None:
        bench = subparsers.add_parser("bench", help="benchmarks (edgeadapt bench incremental ...)",
                                      description="Run a benchmark.")
    for action in bench._actions:  # reuse the group another module registered
        if isinstance(action, argparse._SubParsersAction):
            return action
    return bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``add-classes``, ``merge-heads`` and ``bench incremental`` sub-commands.

    Args:
        subparsers: The sub-parser group of the main parser.

    Returns:
        None.
    """
    add = subparsers.add_parser(
        "add-classes",
        help="add classes to a bundle without forgetting the old ones (writes a new bundle version)",
        description="Embed the images of the new classes with the bundle's backbone, append one calibrated head "
        "column per class (old-class rows stay bit-identical) and write the result as a new bundle version "
        "(version + 1, parent version recorded, each class's provenance). The parent bundle is not changed; "
        "nothing is written on error.",
    )
    add.add_argument("bundle", type=Path, help="the bundle to extend (NAME.eab or packed .zip)")
    add.add_argument("--data", type=Path, required=True, help="folder with one sub-folder of images per class")
    add.add_argument("--classes", help="comma-separated sub-folders of --data to add (default: all of them)")
    add.add_argument("--method", choices=_methods(),
                     help="calibration method (default: chosen for what the bundle carries: the default method when "
                     "it has class statistics, else the statistics-free one; see docs/INCREMENTAL.md)")
    add.add_argument("--out", type=Path, required=True, help="directory of the new bundle version")
    add.add_argument("--replay", type=Path,
                     help="optional folder with images of the OLD classes: builds missing class statistics, "
                     "negatives for trained methods, data for --resolve")
    add.add_argument("--resolve", action="store_true",
                     help="re-fit ALL rows jointly (better, but CHANGES old-class outputs)")
    add_backend_option(add, "interpreter that embeds the images")
    add.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_json_options(add, "the result")
    add.set_defaults(handler=_add_classes)

    merge = subparsers.add_parser(
        "merge-heads",
        help="append the classes of head B to bundle A (same backbone), writing a new version of A",
        description="Merge two heads trained on the same backbone, e.g. a base head and a head trained only on "
        "new classes. B's columns are calibrated against A's (default: recomputed from B's class statistics); "
        "A's rows stay bit-identical. Heads bound to different backbones are refused.",
    )
    merge.add_argument("a", type=Path, help="base bundle")
    merge.add_argument("b", type=Path, help="bundle whose classes are appended")
    merge.add_argument("--method", choices=_methods(), help=_method_help())
    merge.add_argument("--out", type=Path, required=True, help="directory of the new bundle version")
    merge.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_json_options(merge, "the result")
    merge.set_defaults(handler=_merge_heads)

    benchmarks = _bench_subparsers(subparsers)
    bench = benchmarks.add_parser(
        "incremental",
        help="class-incremental benchmark: add new classes to a model trained on base classes",
        description="Train the built-in classifier on the base classes only (or take the pretrained backbone of "
        "--backbone-bundle), then add the new classes with every method and the baselines (joint retrain = upper bound, uncalibrated = lower bound, plain imprinting) "
        "for several class orders and shot counts. Prints a table and optionally writes JSON.",
    )
    add_bench_arguments(bench)
    bench.set_defaults(handler=bench_incremental_command)
