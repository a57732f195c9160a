"""Head math of the default few-shot method (``claim``) at 1000 classes x 1280-d: build once, then per class.

    python benchmarks/bench_claim_speed.py [--classes 1000] [--size 1280] [--repeats 10] [--json-out FILE]

A synthetic head of that size (what an imported ImageNet MobileNet v2 head is), with and
without class statistics (20 examples per class, Gram matrix), and 1000 background embeddings
as the calibration set. Prints the time of the first ``add_classes`` in a process (it builds and
caches the solver state) and the median of the following ones (one class from 5 shots each),
against the 20 ms budget per added class.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from edgeadapt.device.head import ClassStats, Head
from edgeadapt.device.incremental import add_classes

BUDGET_MS = 20.0


def measure(classes: int, size: int, repeats: int, seed: int = 0) -> dict:
    """Times (ms) of ``add_classes`` with the default method on a head of ``classes`` x ``size``."""
    rng = np.random.default_rng(seed)
    head = Head(weights=rng.normal(0, 0.05, (size, classes)).astype(np.float32),
                bias=rng.normal(0, 0.1, classes).astype(np.float32),
                feature_mean=rng.normal(0, 1, size).astype(np.float32))
    examples = rng.normal(0, 1, (20 * classes, size))
    stats = ClassStats.from_embeddings(examples, np.arange(examples.shape[0]) % classes, classes, with_gram=True)
    background = rng.normal(0, 1, (1000, size)).astype(np.float32)
    figures = {}
    for label, statistics in (("with statistics", stats), ("without statistics", None)):
        times = []
        for _ in range(repeats + 1):
            shots = [rng.normal(0, 1, (5, size)).astype(np.float32)]
            start = time.perf_counter()
            add_classes(head, statistics, shots, calibration=background)
            times.append((time.perf_counter() - start) * 1e3)
        figures[label] = {"first_ms": times[0], "median_ms": float(np.median(times[1:])),
                          "within_budget": bool(np.median(times[1:]) <= BUDGET_MS)}
    return {"classes": classes, "embedding_size": size, "budget_ms": BUDGET_MS, "figures": figures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--classes", type=int, default=1000, help="classes in the head")
    parser.add_argument("--size", type=int, default=1280, help="embedding size")
    parser.add_argument("--repeats", type=int, default=10, help="timed additions after the first")
    parser.add_argument("--json-out", type=Path, metavar="FILE", help="also write the figures as JSON to FILE")
    arguments = parser.parse_args(argv)
    report = measure(arguments.classes, arguments.size, arguments.repeats)
    print(f"claim head math, {report['classes']} classes x {report['embedding_size']}-d, 1000 calibration embeddings")
    for label, row in report["figures"].items():
        verdict = "within" if row["within_budget"] else "OVER"
        print(f"  {label:<20} first (builds the solver) {row['first_ms']:8.1f} ms; then per class "
              f"{row['median_ms']:6.1f} ms (median; {verdict} the {BUDGET_MS:.0f} ms budget)")
    if arguments.json_out:
        arguments.json_out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
