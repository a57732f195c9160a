"""Device figures: cold start, peak RSS, and Runtime.predict overhead.

    python benchmarks/bench_device.py --bundle OUT/model.eab [--image IMG] [--repeats 300]

Without --bundle, a bundle is first built with `edgeadapt demo` on the built-in data (needs
TensorFlow). Cold start = process start -> import -> open bundle -> first prediction, measured
from the parent around a fresh interpreter process; peak RSS is the child's ru_maxrss. The same
steps are done through TensorFlow's own interpreter (tf.lite.Interpreter) when TensorFlow is
installed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EDGEADAPT_CHILD = """
import time, resource, sys, json
start = time.perf_counter()
def peak_rss_mb():
    # VmHWM of this process: ru_maxrss of a child forked from a large parent reports the parent's size
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

import numpy as np
from edgeadapt.device import Runtime
imported = time.perf_counter()
runtime = Runtime.open(sys.argv[1])
opened = time.perf_counter()
image = np.load(sys.argv[2]) if sys.argv[2].endswith('.npy') else sys.argv[2]
top = runtime.predict(image, top_k=1)[0]
done = time.perf_counter()
print(json.dumps({"import": imported - start, "open": opened - imported, "first_prediction": done - opened,
                  "label": top.label, "backend": runtime.backend_name,
                  "rss_mb": peak_rss_mb()}))
"""

TENSORFLOW_CHILD = """
import time, resource, sys, json, os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
start = time.perf_counter()
def peak_rss_mb():
    # VmHWM of this process: ru_maxrss of a child forked from a large parent reports the parent's size
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

import numpy as np
import tensorflow as tf
imported = time.perf_counter()
manifest = json.load(open(os.path.join(sys.argv[1], "manifest.json")))
model = next(m for m in manifest["backbone"]["models"] if m["format"] == "tflite")
interpreter = tf.lite.Interpreter(model_path=os.path.join(sys.argv[1], model["file"]))
interpreter.allocate_tensors()
weights = np.load(os.path.join(sys.argv[1], manifest["head"]["weights"]))
bias = np.load(os.path.join(sys.argv[1], manifest["head"]["bias"]))
opened = time.perf_counter()
image = np.load(sys.argv[2])
spec = manifest["input"]
detail = interpreter.get_input_details()[0]
scale, zero = detail["quantization"]
x = image.astype(np.float32) * spec["scale"] + spec["offset"]
if scale:
    x = np.clip(np.rint(x / scale) + zero, -128, 127)
interpreter.set_tensor(detail["index"], x[None].astype(detail["dtype"]))
interpreter.invoke()
embedding = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
label = manifest["classes"][int(np.argmax(embedding @ weights + bias))]["name"]
done = time.perf_counter()
print(json.dumps({"import": imported - start, "open": opened - imported, "first_prediction": done - opened,
                  "label": label, "backend": "tensorflow", "rss_mb": peak_rss_mb()}))
"""


def cold_start(code: str, bundle: Path, image: Path, runs: int) -> dict:
    results = []
    for _ in range(runs):
        start = time.perf_counter()
        completed = subprocess.run([sys.executable, "-c", code, str(bundle), str(image)],
                                   capture_output=True, text=True, check=True)
        total = time.perf_counter() - start
        figures = json.loads(completed.stdout.strip().splitlines()[-1])
        figures["total"] = total
        results.append(figures)
    best = min(results, key=lambda item: item["total"])
    best["total_median"] = statistics.median(item["total"] for item in results)
    return best


def predict_overhead(bundle: Path, image_array, repeats: int) -> dict:
    """Median per-image time of Runtime.predict vs bare set_tensor+invoke+get_tensor (batch 1)."""
    import numpy as np

    from edgeadapt.device import Runtime

    runtime = Runtime.open(bundle)
    backend = runtime._backend  # the interpreter the runtime itself uses
    prepared = runtime.model_input(image_array)
    interpreter = getattr(backend, "interpreter", None)

    def bare():
        if interpreter is None:
            return backend.run(prepared)
        interpreter.set_tensor(backend._input_index, prepared)
        interpreter.invoke()
        return interpreter.get_tensor(backend._output_index)

    def timed(function):
        for _ in range(20):
            function()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            function()
            samples.append(time.perf_counter() - start)
        return samples

    # Interleave the two measurements in rounds so machine noise hits both alike.
    bare_samples, predict_samples = [], []
    for _ in range(5):
        bare_samples += timed(bare)
        predict_samples += timed(lambda: runtime.predict(image_array, top_k=5))
    bare_ms = float(np.median(bare_samples) * 1000)
    predict_ms = float(np.median(predict_samples) * 1000)
    return {"backend": runtime.backend_name, "bare_invoke_ms": bare_ms, "predict_ms": predict_ms,
            "overhead_percent": 100.0 * (predict_ms - bare_ms) / bare_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="bundle directory (default: build one with the demo)")
    parser.add_argument("--repeats", type=int, default=300, help="timed predictions per round")
    parser.add_argument("--cold-runs", type=int, default=3, help="fresh processes per cold-start measurement")
    parser.add_argument("--json-out", dest="json", type=Path, metavar="FILE", help="write the figures as JSON")
    arguments = parser.parse_args()
    import numpy as np

    from edgeadapt.device import Bundle

    bundle_path = arguments.bundle
    if bundle_path is None:
        out = Path(tempfile.mkdtemp(prefix="edgeadapt-bench-"))
        subprocess.run([sys.executable, "-m", "edgeadapt.cli", "demo", "--out", str(out)], check=True,
                       stdout=subprocess.DEVNULL)
        bundle_path = out / "model.eab"
    bundle = Bundle.open(bundle_path)
    spec = bundle.manifest.input_spec
    image = np.random.default_rng(0).integers(0, 256, spec.shape, dtype=np.uint8)
    image_file = Path(tempfile.mkdtemp()) / "image.npy"
    np.save(image_file, image)

    report = {"bundle": str(bundle_path), "input": list(spec.shape)}
    report["cold_start_edgeadapt"] = cold_start(EDGEADAPT_CHILD, bundle_path, image_file, arguments.cold_runs)
    try:
        import importlib.util

        if importlib.util.find_spec("tensorflow"):
            report["cold_start_tensorflow"] = cold_start(TENSORFLOW_CHILD, bundle_path, image_file, arguments.cold_runs)
    except subprocess.CalledProcessError as error:
        report["cold_start_tensorflow"] = {"error": error.stderr[-500:]}
    report["predict_overhead"] = predict_overhead(bundle_path, image, arguments.repeats)

    ours = report["cold_start_edgeadapt"]
    print(f"bundle {bundle_path} (input {spec.height}x{spec.width}x{spec.channels})")
    print(f"{'path':<26}{'cold start s':>13}{'import s':>10}{'open s':>8}{'1st pred s':>11}{'peak RSS MB':>13}")
    rows = [("edgeadapt.device (" + ours["backend"] + ")", ours)]
    if "cold_start_tensorflow" in report and "total" in report["cold_start_tensorflow"]:
        rows.append(("tf.lite.Interpreter", report["cold_start_tensorflow"]))
    for name, figures in rows:
        print(f"{name:<26}{figures['total']:>13.3f}{figures['import']:>10.3f}{figures['open']:>8.3f}"
              f"{figures['first_prediction']:>11.3f}{figures['rss_mb']:>13.1f}")
    if len(rows) == 2:
        print(f"RSS ratio edgeadapt/tensorflow: {ours['rss_mb'] / rows[1][1]['rss_mb']:.2f} (goal <= 0.25); "
              f"cold start goal <= 0.5 s: {'met' if ours['total'] <= 0.5 else 'NOT met'}")
    overhead = report["predict_overhead"]
    print(f"Runtime.predict {overhead['predict_ms']:.3f} ms vs bare invoke {overhead['bare_invoke_ms']:.3f} ms "
          f"at batch 1 ({overhead['backend']}): overhead {overhead['overhead_percent']:.1f}% (goal <= 5%)")
    if arguments.json:
        arguments.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
