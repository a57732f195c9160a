"""Class-incremental benchmark: the same as ``edgeadapt bench incremental``.

    python benchmarks/bench_incremental.py --data ../shared/data/flowers --base 2 --step 2 --image-size 64 \\
        [--shots 1,5,20,all] [--orders 3] [--cache .cache/incremental] [--json-out OUT]
        [--backbone-bundle mobilenet.eab]

Trains the built-in classifier on the base classes only (one backbone per class order), or
with --backbone-bundle embeds the images with a bundle's pretrained backbone (e.g. the
ImageNet MobileNet imported with `edgeadapt import`), then adds the new classes with every
method of edgeadapt.device.incremental and the baselines; prints the table and, with
--json-out, writes every figure. See docs/INCREMENTAL.md.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from edgeadapt.cli.incremental import bench_incremental_command, add_bench_arguments
    from edgeadapt.device.errors import EdgeAdaptError

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(parser)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if arguments.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return bench_incremental_command(arguments)
    except EdgeAdaptError as error:
        print(f"bench_incremental: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
