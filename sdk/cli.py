"""``edgeadapt``: the host command line (train, export, inspect, adapt)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from edgeadapt.device.errors import EdgeAdaptError

#: Modules that add sub-commands; each defines ``register(subparsers)``.
COMMAND_MODULES = (
    "edgeadapt.cli_demo",
    "edgeadapt.cli_deltas",
    "edgeadapt.cli_import",
    "edgeadapt.cli_finetune",
    "edgeadapt.cli_incremental",
)


def _inspect(arguments: argparse.Namespace) -> int:
    from edgeadapt.device.bundle import Bundle
    from edgeadapt.device.inspection import describe_bundle

    print(describe_bundle(Bundle.open(arguments.bundle), max_classes=arguments.max_classes))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeadapt",
        description="Adapt image classifiers for edge devices: train a head, add classes without forgetting, "
        "export int8 TFLite/ONNX bundles that the TensorFlow-free device runtime (edgeadapt-device) runs.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect = subparsers.add_parser("inspect", help="print a readable summary of a bundle",
                                    description="Verify a bundle's checksums and summarise it.")
    inspect.add_argument("bundle", type=Path, help="bundle directory (NAME.eab) or packed bundle (.zip)")
    inspect.add_argument("--max-classes", type=int, default=20, help="list at most this many classes (default 20)")
    inspect.set_defaults(handler=_inspect)
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
