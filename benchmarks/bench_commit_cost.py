"""What one on-device commit costs: bytes written and end-to-end milliseconds per added class.

    python benchmarks/bench_commit_cost.py [--work DIR] [--repeats N] [--json-out FILE] [--baseline FILE]

Opens the 1000-class x 1280-d int8 bundle of ``bench_device_update.py`` (built once with
TensorFlow, kept in the work folder), then adds classes one at a time with
``HeadUpdater.add_class`` from 5 images and reports, per added class (median):

- the end-to-end time of ``add_class`` against the 5 backbone inferences it runs;
- the bytes the process wrote (``wchar`` of /proc/self/io: every ``write`` call, the
  manifest, the version record and a new table segment included; median, mean and max over
  the repeats: a commit that rolls the manifest's delta into a segment writes more than the
  others) and the bytes of the new files the version lists;
- what a compaction (``HeadUpdater.compact``, when available) writes and costs.

``--baseline FILE`` (the ``--json-out`` of an earlier run, e.g. on the code before a change)
prints both runs side by side. Goal: add_class <= 5 inferences + 20 ms and <= 100 KB per class.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from edgeadapt.device.add_options import METHODS  # noqa: E402


def written_bytes() -> int:
    """Bytes this process has passed to ``write`` so far (Linux ``/proc/self/io`` ``wchar``)."""
    with open("/proc/self/io") as handle:
        for line in handle:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return 0


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def bench(bundle: Path, images: np.ndarray, repeats: int, method: str | None) -> dict:
    from edgeadapt.device.incremental import AddClassOptions
    from edgeadapt.device.runtime import Runtime
    from edgeadapt.device.updater import HeadUpdater
    from edgeadapt.device.versions import VersionStore

    with tempfile.TemporaryDirectory(dir=bundle.parent) as folder:
        copy = Path(folder) / bundle.name
        shutil.copytree(bundle, copy)
        runtime = Runtime.open(copy)
        examples = [images[index % len(images)] for index in range(5)]
        runtime.embed(np.stack(examples))
        inference = []
        for _ in range(repeats):
            start = time.perf_counter()
            runtime.embed(np.stack(examples))
            inference.append(time.perf_counter() - start)
        options = None if method is None else AddClassOptions(method=method)
        updater = HeadUpdater(runtime, reader_grace_seconds=0.0, options=options)
        mark = written_bytes()
        updater.add_class("warm-up", examples, force=True)
        first = written_bytes() - mark
        times, wrote, listed, breakdown = [], [], [], []
        for repeat in range(repeats):
            before = VersionStore(copy).read_manifest().files
            mark = written_bytes()
            start = time.perf_counter()
            result = updater.add_class(f"added{repeat}", examples, force=True)
            times.append(time.perf_counter() - start)
            wrote.append(written_bytes() - mark)
            after = VersionStore(copy).read_manifest().files
            listed.append(sum(int(entry["size"]) for name, entry in after.items() if name not in before))
            breakdown.append(result.timings)
        compaction = None
        if hasattr(updater, "compact"):
            mark = written_bytes()
            start = time.perf_counter()
            updater.compact()
            compaction = {"ms": (time.perf_counter() - start) * 1000.0, "bytes": written_bytes() - mark}
        disk = sum(path.stat().st_size for path in copy.rglob("*") if path.is_file())
    keys = ("embed", "lock", "load", "math", "gate", "assemble", "commit")
    return {
        "classes": runtime.head.num_classes - repeats - 1, "dimension": runtime.head.embedding_size,
        "five_inferences_ms": median(inference) * 1000.0, "add_class_ms": median(times) * 1000.0,
        "add_class_min_ms": min(times) * 1000.0,
        "overhead_ms": (median(times) - median(inference)) * 1000.0,
        "bytes_written": int(median(wrote)), "bytes_new_files": int(median(listed)),
        "bytes_written_first": int(first), "bytes_written_mean": int(statistics.fmean(wrote)), "bytes_written_max": int(max(wrote)),
        "breakdown_ms": {key: median([part.get(key, 0.0) for part in breakdown]) * 1000.0 for key in keys},
        "compaction": compaction, "bundle_bytes_after": disk, "repeats": repeats,
        "method": method or "automatic",
    }


def report(row: dict, title: str) -> list[str]:
    parts = ", ".join(f"{key} {value:.1f}" for key, value in row["breakdown_ms"].items())
    lines = [f"{title}: {row['classes']} classes x {row['dimension']}-d, method {row.get('method')}, "
             f"median of {row['repeats']} add_class",
             f"   add_class {row['add_class_ms']:.1f} ms (min {row['add_class_min_ms']:.1f}) = 5 inferences "
             f"{row['five_inferences_ms']:.1f} ms + {row['overhead_ms']:.1f} ms   [{parts}]",
             f"   written per added class: {row['bytes_written'] / 1e3:,.1f} KB (new files listed: "
             f"{row['bytes_new_files'] / 1e3:,.1f} KB)"]
    if "bytes_written_max" in row:
        lines[-1] += (f"; mean {row['bytes_written_mean'] / 1e3:,.1f} KB, max "
                      f"{row['bytes_written_max'] / 1e3:,.1f} KB; the first commit on the exported bundle "
                      f"{row['bytes_written_first'] / 1e3:,.1f} KB")
    if row.get("compaction"):
        lines.append(f"   compaction: {row['compaction']['bytes'] / 1e6:.1f} MB written in {row['compaction']['ms']:.0f} ms")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edgeadapt-bench-device-update",
                        help="folder of the built bundle (shared with bench_device_update.py)")
    parser.add_argument("--classes", type=int, default=1000, help="classes of the large bundle")
    parser.add_argument("--dimension", type=int, default=1280, help="embedding size of the large bundle")
    parser.add_argument("--image-size", type=int, default=128, help="input size of the large bundle")
    parser.add_argument("--repeats", type=int, default=10, help="added classes measured (the median is printed)")
    parser.add_argument("--method", default="auto", choices=("auto", *METHODS),
                        help="head math of the update ('auto': the automatic choice, claim)")
    parser.add_argument("--json-out", type=Path, metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--baseline", type=Path, metavar="FILE", help="an earlier --json-out to compare with")
    arguments = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_device_update import build_large_bundle

    arguments.work.mkdir(parents=True, exist_ok=True)
    large = build_large_bundle(arguments.work / f"large{arguments.classes}x{arguments.dimension}.eab",
                               arguments.classes, arguments.dimension, arguments.image_size)
    images = np.random.default_rng(0).integers(0, 256, size=(5, arguments.image_size, arguments.image_size, 3),
                                               dtype=np.uint8)
    row = bench(large, images, arguments.repeats, None if arguments.method == "auto" else arguments.method)
    lines = []
    if arguments.baseline is not None:
        lines += report(json.loads(arguments.baseline.read_text()), "before")
    lines += report(row, "after" if arguments.baseline is not None else "this code")
    lines.append("   goal: add_class <= 5 inferences + 20 ms, <= 100 KB written per added class")
    print("\n".join(lines))
    if arguments.json_out:
        arguments.json_out.write_text(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
