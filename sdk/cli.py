"""``edgeadapt``: the host command line (train, export, inspect, adapt)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from edgeadapt.device.cli import register_inspect
from edgeadapt.device.errors import EdgeAdaptError

#: Modules that add sub-commands; each defines ``register(subparsers)``.
COMMAND_MODULES = (
    "edgeadapt.cli_demo",
    "edgeadapt.cli_deltas",
    "edgeadapt.cli_import",
    "edgeadapt.cli_finetune",
    "edgeadapt.cli_incremental",
    "edgeadapt.cli_detector",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeadapt",
        description="Adapt image classifiers for edge devices: train a head, add classes without forgetting, "
        "export int8 TFLite/ONNX bundles that the TensorFlow-free device runtime (edgeadapt-device) runs.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_inspect(subparsers)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def configure_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * min(verbosity, 2) if verbosity else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("tensorflow", "absl", "h5py", "tf2onnx", "onnx", "PIL"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    configure_logging(arguments.verbose)
    try:
        return int(arguments.handler(arguments) or 0)
    except EdgeAdaptError as error:
        print(f"edgeadapt: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
