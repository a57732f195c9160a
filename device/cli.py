"""``edgeadapt-device``: the device command line (no TensorFlow).

Conventions (help with defaults, ``-v/-q``, exit codes 0/1/2, ``--json``) come from
:mod:`edgeadapt.device.cli_common` and reach every sub-command registered here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from edgeadapt.device.cli_common import add_backend_option, add_json_options, command_parser, emit_report, run_main
from edgeadapt.device.trust import add_trust_arguments, trusted_keys_from_arguments

#: Modules that add sub-commands; each defines ``register(subparsers)``.
COMMAND_MODULES: tuple[str, ...] = (
    "edgeadapt.device.cli_update",
    "edgeadapt.device.cli_detect",
    "edgeadapt.device.cli_signing",
)


def _predict(arguments: argparse.Namespace) -> int:
    from edgeadapt.device.runtime import Runtime

    runtime = Runtime.open(arguments.bundle, backend=arguments.backend, num_threads=arguments.threads,
                           trusted_keys=trusted_keys_from_arguments(arguments))
    results = []
    for image in arguments.images:
        predictions = runtime.predict(image, top_k=arguments.top_k)
        results.append({"image": str(image), "predictions": [
            {"label": p.label, "score": round(p.score, 6), "index": p.index} for p in predictions]})
    lines = []
    for result in results:
        lines.append(result["image"])
        lines += [f"  {rank}. {entry['label']:<30} {entry['score']:.4f}"
                  for rank, entry in enumerate(result["predictions"], start=1)]
    emit_report(arguments, "\n".join(lines), {"backend": runtime.backend_name, "results": results})
    return 0


def _inspect(arguments: argparse.Namespace) -> int:
    from edgeadapt.device.bundle import Bundle
    from edgeadapt.device.inspection import describe_bundle

    bundle = Bundle.open(arguments.bundle, trusted_keys=trusted_keys_from_arguments(arguments))
    print(describe_bundle(bundle, max_classes=arguments.max_classes))
    return 0


def register_inspect(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``inspect`` sub-command, shared by ``edgeadapt`` and ``edgeadapt-device``.

    Args:
        subparsers: The sub-parser group of the main parser.

    Returns:
        None.
    """
    inspect = subparsers.add_parser("inspect", help="print a readable summary of a bundle",
                                    description="Verify a bundle's checksums and summarise it.")
    inspect.add_argument("bundle", type=Path, help="bundle directory (NAME.eab) or packed bundle (.zip)")
    inspect.add_argument("--max-classes", type=int, default=20, help="list at most this many classes")
    add_trust_arguments(inspect)
    inspect.set_defaults(handler=_inspect)


def _register_predict(subparsers: Any) -> None:
    predict = subparsers.add_parser("predict", help="classify images with a bundle",
                                    description="Print the top-k classes of each image.")
    predict.add_argument("bundle", type=Path, help="bundle directory (NAME.eab) or packed bundle (.zip)")
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="JPEG/PNG/BMP files")
    predict.add_argument("--top-k", type=int, default=5, help="how many classes to show per image")
    add_json_options(predict, "the predictions")
    add_backend_option(predict)
    predict.add_argument("--threads", type=int, help="interpreter threads (default: the backend's choice)")
    add_trust_arguments(predict)
    predict.set_defaults(handler=_predict)


def build_parser() -> argparse.ArgumentParser:
    """The ``edgeadapt-device`` parser with every sub-command of :data:`COMMAND_MODULES` and the shared conventions.

    Returns:
        The parser; each sub-command sets ``handler``.
    """
    return command_parser(
        "edgeadapt-device",
        "Run an edgeadapt bundle on the device with LiteRT, tflite-runtime or ONNX Runtime "
        "(no TensorFlow): classify images and update the head from a few examples.",
        COMMAND_MODULES, register=(_register_predict, register_inspect))


def main(argv: list[str] | None = None) -> int:
    """Run ``edgeadapt-device``.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 success, 1 error, 2 usage error (raised as ``SystemExit`` by
        argparse).
    """
    return run_main(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
