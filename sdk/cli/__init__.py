"""``edgeadapt``: the host command line (train, export, inspect, adapt).

Conventions (help with defaults, ``-v/-q``, exit codes 0/1/2, ``--json``/``--json-out``) come
from :mod:`edgeadapt.device.cli_common` and reach every sub-command registered here.
"""

from __future__ import annotations

import argparse
import sys

from edgeadapt import __version__
from edgeadapt.device.cli import register_inspect
from edgeadapt.device.cli_common import command_parser, run_main

#: Modules that add sub-commands; each defines ``register(subparsers)``.
COMMAND_MODULES = (
    "edgeadapt.cli.demo",
    "edgeadapt.cli.deltas",
    "edgeadapt.cli.importing",
    "edgeadapt.cli.finetune",
    "edgeadapt.cli.incremental",
    "edgeadapt.cli.detector",
    "edgeadapt.cli.bench_fewshot",
    "edgeadapt.cli.export_head",
    "edgeadapt.cli.signing",
)


def build_parser() -> argparse.ArgumentParser:
    """The ``edgeadapt`` parser with every sub-command of :data:`COMMAND_MODULES` and the shared conventions.

    Returns:
        The parser; each sub-command sets ``handler``.
    """
    return command_parser(
        "edgeadapt",
        "Adapt image classifiers for edge devices: train a head, add classes without forgetting, "
        "export int8 TFLite/ONNX bundles that the TensorFlow-free device runtime (edgeadapt-device) runs.",
        COMMAND_MODULES, register=(register_inspect,), version=__version__)


def main(argv: list[str] | None = None) -> int:
    """Run ``edgeadapt``.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 success, 1 error or failed check, 2 usage error (raised as
        ``SystemExit`` by argparse).
    """
    return run_main(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
