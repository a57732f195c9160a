"""``edgeadapt-device``: the device command line (no TensorFlow)."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from edgeadapt.device.errors import EdgeAdaptError

#: Modules that add sub-commands; each defines ``register(subparsers)``.
COMMAND_MODULES: tuple[str, ...] = (
    "edgeadapt.device.cli_update",
    "edgeadapt.device.cli_detect",
)


def _predict(arguments: argparse.Namespace) -> int:
    from edgeadapt.device.runtime import Runtime

    runtime = Runtime.open(arguments.bundle, backend=arguments.backend, num_threads=arguments.threads)
    results = []
    for image in arguments.images:
        predictions = runtime.predict(image, top_k=arguments.top_k)
        results.append({"image": str(image), "predictions": [
            {"label": p.label, "score": round(p.score, 6), "index": p.index} for p in predictions]})
    if arguments.json:
        print(json.dumps({"backend": runtime.backend_name, "results": results}, indent=2))
    else:
        for result in results:
            print(result["image"])
            for rank, entry in enumerate(result["predictions"], start=1):
                print(f"  {rank}. {entry['label']:<30} {entry['score']:.4f}")
    return 0


def _inspect(arguments: argparse.Namespace) -> int:
    from edgeadapt.device.bundle import Bundle
    from edgeadapt.device.inspection import describe_bundle

    print(describe_bundle(Bundle.open(arguments.bundle), max_classes=arguments.max_classes))
    return 0


def register_inspect(subparsers) -> None:
    """The ``inspect`` sub-command, shared by ``edgeadapt`` and ``edgeadapt-device``."""
    inspect = subparsers.add_parser("inspect", help="print a readable summary of a bundle",
                                    description="Verify a bundle's checksums and summarise it.")
    inspect.add_argument("bundle", type=Path, help="bundle directory (NAME.eab) or packed bundle (.zip)")
    inspect.add_argument("--max-classes", type=int, default=20, help="list at most this many classes (default 20)")
    inspect.set_defaults(handler=_inspect)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeadapt-device",
        description="Run an edgeadapt bundle on the device with LiteRT, tflite-runtime or ONNX Runtime "
        "(no TensorFlow): classify images and update the head from a few examples.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    predict = subparsers.add_parser("predict", help="classify images with a bundle",
                                    description="Print the top-k classes of each image.")
    predict.add_argument("bundle", type=Path, help="bundle directory (NAME.eab) or packed bundle (.zip)")
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="JPEG/PNG/BMP files")
    predict.add_argument("--top-k", type=int, default=5, help="how many classes to show per image (default 5)")
    predict.add_argument("--json", action="store_true", help="print JSON instead of a table")
    predict.add_argument("--backend", default="auto",
                         help="auto (default), litert, tflite-runtime or onnxruntime")
    predict.add_argument("--threads", type=int, help="interpreter threads (default: the backend's choice)")
    predict.set_defaults(handler=_predict)
    register_inspect(subparsers)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(arguments.verbose, 2),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(arguments.handler(arguments) or 0)
    except EdgeAdaptError as error:
        print(f"edgeadapt-device: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
