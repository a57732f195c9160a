"""Detection benchmark: the same as ``edgeadapt bench detection``.

    python benchmarks/bench_detection.py --data ../shared/data/detection [--json]

Adds raccoon and kangaroo to the COCO SSD MobileNet v1 (every 4th photo of each class held
out, half of coco_old used as negatives) and prints old-class mAP@[.5:.95]/AP50 before and
after with fast and regular NMS, bit-identity of the old scores, new-class AP50 on the
held-out photos, new-class false positives on COCO photos, ms/image at 1 and 2 threads and
the add-classes time. See docs/DETECTION.md.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from edgeadapt.cli import main as cli_main

    return cli_main(["bench", "detection", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
