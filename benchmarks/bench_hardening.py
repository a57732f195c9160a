"""Figures of the hostile-input hardening: fuzz cases run and outcomes by kind, peak memory of the worst case, and the
cost of validation on bundle open (before/after).

    python benchmarks/bench_hardening.py --fixtures DIR [--data /work/shared/data] [--budget 40]
                                         [--trace-every 1] [--baseline-ref REF] [--repeats 20]

* Fuzzing: runs the hypothesis suite (tests/device/test_fuzz_*.py) in this process with
  ``EDGEADAPT_FUZZ_BUDGET=--budget`` and prints every case's outcome by kind (a correct open or
  the EdgeAdaptError subclass; "non-typed" outcomes fail the suite), the worst case's peak of
  traced memory (tracemalloc, every ``--trace-every``-th case) and this process's peak RSS.
* Open time: median wall time of ``Bundle.open`` (verify) + loading the head and statistics, and of
  ``Runtime.open`` + ``close``, in a fresh process, for the code at ``--baseline-ref`` (before the
  validation; default: the merge base with ``main``) and the working tree (after). Bundles: the tiny
  test bundle (``tests/build_fixtures.py DIR`` -> DIR/tiny.eab) and, with ``--data``, MobileNet v1
  0.75/192 imported with ``edgeadapt import`` (skipped when the model is absent). ``--skip-open`` /
  ``--skip-fuzz`` run one half.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MOBILENET = "imagenet_mobilenet/mobilenet_v1_0.75_192_quant.tflite"

OPEN_CHILD = """
import json, statistics, sys, time
from edgeadapt.device import Bundle, Runtime
path, repeats = sys.argv[1], int(sys.argv[2])
def bundle_open():
    bundle = Bundle.open(path)
    bundle.load_head()
    bundle.load_class_stats()
def runtime_open():
    runtime = Runtime.open(path)
    runtime.close()
result = {"module": Bundle.__module__ and sys.modules["edgeadapt.device.bundle"].__file__}
for name, function in (("bundle_open", bundle_open), ("runtime_open", runtime_open)):
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    result[name] = min(times)
print(json.dumps(result))
"""


def baseline_package(ref: str, folder: Path) -> Path:
    """The edgeadapt package (sdk, device, converters) of ``ref``, laid out for PYTHONPATH."""
    package = folder / "edgeadapt"
    for source, destination in (("sdk", package), ("device", package / "device"), ("converters", package / "converters")):
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, source], check=True, capture_output=True).stdout
        extract = folder / f"extract-{source}"
        extract.mkdir(parents=True)
        subprocess.run(["tar", "-x", "-C", str(extract)], input=archive, check=True)
        shutil.move(str(extract / source), str(destination))
    return folder


def open_times(bundle: Path, repeats: int, pythonpath: Path | None) -> dict:
    environment = dict(os.environ)
    if pythonpath is not None:
        environment["PYTHONPATH"] = str(pythonpath)
    result = subprocess.run([sys.executable, "-c", OPEN_CHILD, str(bundle), str(repeats)], capture_output=True,
                            text=True, env=environment, timeout=1800)
    if result.returncode:
        raise SystemExit(f"open-time child failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def import_mobilenet(data: Path, folder: Path) -> Path | None:
    model = data / MOBILENET
    if not model.is_file():
        print(f"(no {model}: MobileNet open time skipped)")
        return None
    output = folder / "mobilenet.eab"
    command = [str(Path(sys.executable).with_name("edgeadapt")), "import", str(model), "--labels",
               str(model.parent / "imagenet_labels.txt"), "--out", str(output), "--no-onnx"]
    subprocess.run(command, check=True, capture_output=True, timeout=1800)
    return output


def run_fuzz(budget: int, trace_every: int) -> int:
    os.environ["EDGEADAPT_FUZZ_BUDGET"] = str(budget)
    os.environ["EDGEADAPT_FUZZ_TRACE_EVERY"] = str(trace_every)
    sys.path.insert(0, str(ROOT / "tests"))
    import pytest

    import fuzz_support

    start = time.perf_counter()
    code = pytest.main([str(path) for path in sorted((ROOT / "tests" / "device").glob("test_fuzz_*.py"))]
                       + ["-q", "-p", "no:cacheprovider", "-x"])
    seconds = time.perf_counter() - start
    outcomes = fuzz_support.OUTCOMES
    print(f"\n== fuzzing: budget {budget} examples per test (x share), seed fixed, memory traced every "
          f"{trace_every} case(s)")
    print(f"cases run: {outcomes.total()} in {seconds:.0f} s; pytest exit code {int(code)}")
    kinds: dict[str, dict[str, int]] = {}
    for (kind, outcome), count in sorted(outcomes.counts.items()):
        kinds.setdefault(kind, {})[outcome] = count
    for kind, counts in kinds.items():
        print(f"  {kind:<22} " + ", ".join(f"{outcome}: {count}" for outcome, count in counts.items()))
    totals: dict[str, int] = {}
    for (_, outcome), count in outcomes.counts.items():
        totals[outcome] = totals.get(outcome, 0) + count
    print("  all kinds              " + ", ".join(f"{outcome}: {count}" for outcome, count in sorted(totals.items())))
    non_typed = sum(count for outcome, count in totals.items() if outcome.startswith("non-typed"))
    print(f"non-typed outcomes: {non_typed}")
    print(f"peak traced memory of the worst case: {outcomes.peak_bytes / 2**20:.2f} MiB ({outcomes.peak_case}); "
          f"limit {fuzz_support.MEMORY_LIMIT / 2**20:.0f} MiB")
    print(f"peak RSS of the whole fuzz process: {peak_rss_mb():.0f} MiB")
    return int(code)


def peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--fixtures", type=Path, default=os.environ.get("EDGEADAPT_TEST_FIXTURES"),
                        help="folder built by tests/build_fixtures.py (tiny.eab); default $EDGEADAPT_TEST_FIXTURES")
    parser.add_argument("--data", type=Path, help="shared data folder (for the MobileNet import); optional")
    parser.add_argument("--mobilenet", type=Path,
                        help="an already imported MobileNet bundle (instead of importing it from --data)")
    parser.add_argument("--budget", type=int, default=40, help="fuzz examples per test (EDGEADAPT_FUZZ_BUDGET)")
    parser.add_argument("--trace-every", type=int, default=1, help="trace the memory of every N-th fuzz case")
    parser.add_argument("--baseline-ref", help="git ref of the code before validation (default: merge base with main)")
    parser.add_argument("--repeats", type=int, default=20, help="timed opens per bundle and code version")
    parser.add_argument("--rounds", type=int, default=5, help="alternating before/after processes per bundle")
    parser.add_argument("--skip-fuzz", action="store_true", help="only measure open times")
    parser.add_argument("--skip-open", action="store_true", help="only run the fuzzing")
    arguments = parser.parse_args()
    if arguments.fixtures is None or not (Path(arguments.fixtures) / "tiny.eab").is_dir():
        parser.error("give --fixtures DIR (built by `python tests/build_fixtures.py DIR`)")
    os.environ["EDGEADAPT_TEST_FIXTURES"] = str(arguments.fixtures)
    code = 0
    if not arguments.skip_open:
        reference = arguments.baseline_ref or subprocess.run(
            ["git", "-C", str(ROOT), "merge-base", "HEAD", "main"], check=True, capture_output=True, text=True
        ).stdout.strip()
        with tempfile.TemporaryDirectory(prefix="bench-hardening-") as folder:
            baseline = baseline_package(reference, Path(folder) / "baseline")
            bundles = {"tiny (test fixture)": Path(arguments.fixtures) / "tiny.eab"}
            if arguments.mobilenet is not None:
                bundles["MobileNet v1 0.75/192 (imported)"] = arguments.mobilenet
            elif arguments.data is not None:
                mobilenet = import_mobilenet(arguments.data, Path(folder))
                if mobilenet is not None:
                    bundles["MobileNet v1 0.75/192 (imported)"] = mobilenet
            print(f"== open time: fastest of {arguments.repeats} opens per process, median over {arguments.rounds} "
                  f"alternating before/after processes (before = {reference[:12]}, after = working tree)")
            print("   bundle_open = Bundle.open (verify) + load_head + load_class_stats; "
                  "runtime_open = Runtime.open + close")
            for name, bundle in bundles.items():
                rounds: dict[str, list[dict]] = {"before": [], "after": []}
                for _ in range(arguments.rounds):
                    rounds["before"].append(open_times(bundle, arguments.repeats, baseline))
                    rounds["after"].append(open_times(bundle, arguments.repeats, None))
                if not rounds["before"][0]["module"].startswith(str(baseline)):
                    raise SystemExit(f"the baseline run imported {rounds['before'][0]['module']}, not the baseline")
                for key in ("bundle_open", "runtime_open"):
                    before = statistics.median(result[key] for result in rounds["before"])
                    after = statistics.median(result[key] for result in rounds["after"])
                    print(f"  {name:<34} {key:<13} before {before * 1e3:8.2f} ms  after {after * 1e3:8.2f} ms  "
                          f"({after / before - 1:+.1%})")
    if not arguments.skip_fuzz:
        code = run_fuzz(arguments.budget, arguments.trace_every)
    return code


if __name__ == "__main__":
    sys.exit(main())
