"""``edgeadapt demo``: the whole pipeline in one command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgeadapt.device.cli_common import add_json_options, emit_report, keras_verbosity, verbosity_of


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` sub-command.

    Args:
        subparsers: The sub-parser group of the main parser.

    Returns:
        None.
    """
    parser = subparsers.add_parser(
        "demo",
        help="train a classifier, export an int8 TFLite + ONNX bundle, classify with the device runtime",
        description="Train the built-in compact CNN on the built-in synthetic dataset (or on --data, a folder "
        "with one sub-folder of images per class), split it into backbone + head, export int8 TFLite and "
        "int8 ONNX backbones into OUT/model.eab with measured float-vs-int8 parity, then load the bundle "
        "with the TensorFlow-free device runtime and report accuracy, size and latency.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory (created)")
    parser.add_argument("--data", type=Path, help="image folder: one sub-folder per class (default: built-in data)")
    parser.add_argument("--image-size", type=int, help="train/export resolution (default 32 built-in, 64 for --data)")
    parser.add_argument("--epochs", type=int, help="training epochs (default 15)")
    parser.add_argument("--formats", default="tflite,onnx", help="comma-separated: tflite,onnx")
    parser.add_argument("--seed", type=int, default=0, help="random seed for split, init and augmentation")
    add_json_options(parser)
    parser.add_argument("--min-accuracy", type=float,
                        help="exit with status 1 if the int8 device accuracy of any format is below this")
    parser.set_defaults(handler=run)


def run(arguments: argparse.Namespace) -> int:
    """Run ``edgeadapt demo``.

    Args:
        arguments: The parsed command line.

    Returns:
        0, or 1 when ``--min-accuracy`` is not reached.

    Raises:
        EdgeAdaptError: When the data, the training or an export fails.
    """
    from edgeadapt.pipeline import DemoOptions, run_demo

    report = run_demo(
        DemoOptions(
            output=arguments.out,
            data=arguments.data,
            image_size=arguments.image_size,
            epochs=arguments.epochs,
            formats=tuple(name.strip() for name in arguments.formats.split(",") if name.strip()),
            seed=arguments.seed,
            verbose=keras_verbosity(verbosity_of(arguments)),
        )
    )
    emit_report(arguments, report.table(), report.to_dict())
    if arguments.min_accuracy is not None:
        worst = min(row.runtime_accuracy for row in report.formats)
        if worst < arguments.min_accuracy:
            print(f"edgeadapt: int8 device accuracy {worst:.3f} is below the floor {arguments.min_accuracy:.3f}",
                  file=sys.stderr)
            return 1
    return 0
