"""Figures of on-device head updates (HeadUpdater).

    python benchmarks/bench_device_update.py --data ../shared/data/flowers [--work DIR] [--json-out OUT]

1. Head update time excluding embeddings, 1000 classes x 1280-d (synthetic class statistics
   with a Gram matrix): the head math (edgeadapt.device.incremental.add_classes), the update
   gate, and the atomic commit of a new version, per added class.
2. End-to-end ``HeadUpdater.add_class`` with 5 images against 5 backbone inferences, on the
   flowers bundle and on a 1000-class bundle with a 1280-d int8 backbone.
3. Flowers (--data): a 3-class base bundle built with the host pipeline (train the built-in
   classifier, refine the head on cached embeddings, export int8 with class statistics),
   then the 4th class added on the device from k = 1, 5, 20 examples (several random draws),
   scored with the fair measure (edgeadapt.benchmarks.fewshot_measure) on the device int8 runtime:
   old-class accuracy (mean per class), new-class recall, their harmonic mean and its ratio to
   the host's joint retrain of the head on all data of the 4 classes (upper bound), and the
   old-class drop against the base bundle; against plain imprinting.
4. Peak RSS of an update in a TensorFlow-free child process.

Building the bundles needs TensorFlow (host); every device measurement runs the device code.
The work folder keeps the built bundles, so a second run skips the training.
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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Single-threaded BLAS unless the caller says otherwise: device-like, and it keeps numpy's
# thread pool from spinning against other processes on a busy machine (which made small
# solves 100x slower in our measurements). Must be set before numpy is imported.
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402

BASE_CLASSES = ("daisy", "dandelion", "rose")
NEW_CLASS = "sunflower"
SHOTS = (1, 5, 20)


def median_ms(values: list[float]) -> float:
    return float(statistics.median(values) * 1000.0)


# ----------------------------------------------------------------------------- synthetic 1000 x 1280
def synthetic_statistics(classes: int, dimension: int, per_class: int, seed: int = 0):
    """Class statistics (with Gram matrix), a base head and reference embeddings that look like
    pooled ReLU features of ``classes`` well separated classes."""
    from edgeadapt.device import incremental
    from edgeadapt.device.reference_embeddings import ReferenceEmbeddings
    from edgeadapt.device.head import ClassStats, Head

    rng = np.random.default_rng(seed)
    centers = np.abs(rng.normal(0.0, 1.0, size=(classes, dimension))).astype(np.float32)
    embeddings = np.empty((classes * per_class, dimension), np.float32)
    for index in range(classes):
        noise = rng.normal(0.0, 0.6, size=(per_class, dimension)).astype(np.float32)
        embeddings[index * per_class:(index + 1) * per_class] = np.maximum(centers[index] + noise, 0.0)
    labels = np.repeat(np.arange(classes), per_class)
    stats = ClassStats.from_embeddings(embeddings, labels, classes)
    means = stats.means()
    start = Head(weights=(means / np.linalg.norm(means, axis=1, keepdims=True)).T.astype(np.float32) * 5.0,
                 bias=np.zeros(classes, np.float32))
    head = incremental.resolve_all(start, stats)  # a calibrated closed-form base head
    references = ReferenceEmbeddings.select(embeddings, labels, per_class=5)
    return head, stats, references, centers


def new_class_examples(centers: np.ndarray, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + seed)
    center = np.abs(rng.normal(0.0, 1.0, size=centers.shape[1])).astype(np.float32)
    return np.maximum(center + rng.normal(0.0, 0.6, size=(count, centers.shape[1])).astype(np.float32), 0.0)


def bench_head_math(classes: int, dimension: int, repeats: int) -> dict:
    from edgeadapt.device import incremental
    from edgeadapt.device.head_state import HeadState
    from edgeadapt.device.update_gate import evaluate_gate, gate_references

    from edgeadapt.device.fewshot import clear_cache

    head, stats, references, centers = synthetic_statistics(classes, dimension, per_class=10)
    options = incremental.AddClassOptions()
    # without a cached solver state every update solves from scratch
    scratch_times = []
    for repeat in range(max(1, repeats // 4)):
        examples = new_class_examples(centers, 5, repeat)
        clear_cache()
        start = time.perf_counter()
        incremental.add_classes(head, stats, [examples], options)
        scratch_times.append(time.perf_counter() - start)
    # ridge: the exporter stores its solver state in the bundle once (host); claim: the first update in a
    # process builds it; updates then reuse it until a share of classes was added
    clear_cache()
    start = time.perf_counter()
    if options.method == "ridge":
        stats = incremental.with_ridge_basis(head, stats, options)
    else:
        incremental.add_classes(head, stats, [new_class_examples(centers, 5, 0)], options)
    basis_seconds = time.perf_counter() - start
    refresh_limit = max(options.basis_refresh_minimum, int(options.basis_refresh_fraction * classes))
    math_times, gate_times = [], []
    state = HeadState(manifest=None, head=head, stats=stats, references=references, device_examples=None, unknown=None)
    for repeat in range(repeats):
        examples = new_class_examples(centers, 5, repeat)
        start = time.perf_counter()
        new_head, _ = incremental.add_classes(head, stats, [examples], options)
        middle = time.perf_counter()
        embeddings, labels, source = gate_references(state)
        report = evaluate_gate(head, new_head, embeddings, labels, np.arange(classes), [str(i) for i in range(classes)],
                               [str(i) for i in range(classes + 1)], 0.1, source=source)
        end = time.perf_counter()
        math_times.append(middle - start)
        gate_times.append(end - middle)
    other_methods = {}
    for method in incremental.METHODS:
        if method == options.method:
            continue
        try:
            times = []
            for repeat in range(max(1, repeats // 3)):
                examples = new_class_examples(centers, 5, repeat)
                start = time.perf_counter()
                incremental.add_classes(head, stats, [examples], incremental.AddClassOptions(method=method))
                times.append(time.perf_counter() - start)
            other_methods[method] = median_ms(times)
        except Exception as error:  # noqa: BLE001 - a method that does not fit this head
            other_methods[method] = f"n/a ({type(error).__name__})"
    math_ms = median_ms(math_times)
    return {"classes": classes, "dimension": dimension, "method": options.method,
            "math_ms": math_ms, "gate_ms": median_ms(gate_times),
            "from_scratch_ms": median_ms(scratch_times), "basis_build_ms": basis_seconds * 1000.0,
            "basis_refresh_every": refresh_limit,
            "amortized_math_ms": math_ms + basis_seconds * 1000.0 / max(refresh_limit, 1),
            "gate_references": report.checked, "repeats": repeats, "other_methods_ms": other_methods,
            "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS")}


# ----------------------------------------------------------------------------- bundles
def build_large_bundle(path: Path, classes: int, dimension: int, image_size: int) -> Path:
    """An int8 bundle whose backbone (built-in architecture, random weights) gives 1280-d
    embeddings, with a synthetic 1000-class head, statistics and references."""
    if (path / "manifest.json").is_file():
        return path
    import keras

    from edgeadapt.training.backbones import BackboneOptions, build_backbone
    from edgeadapt.converters.bundle_export import BundleExportOptions, export_bundle
    from edgeadapt.device.bundle import Bundle, write_bundle
    from edgeadapt.device.head_section import head_payload
    from edgeadapt.device.manifest import InputSpec

    keras.utils.set_random_seed(0)
    options = BackboneOptions()
    options = BackboneOptions(blocks=options.blocks + (("separable", dimension, 1),))
    backbone = build_backbone((image_size, image_size, 3), options)
    head, stats, references, _ = synthetic_statistics(classes, dimension, per_class=10)
    spec = InputSpec(height=image_size, width=image_size)
    calibration = np.random.default_rng(0).integers(0, 256, size=(64, image_size, image_size, 3), dtype=np.uint8)
    staging = path.with_name(path.name + ".staging")
    export_bundle(staging, backbone=backbone, head=head, input_spec=spec,
                  class_names=[f"class{index:04d}" for index in range(classes)],
                  calibration_images=calibration, class_stats=stats,
                  options=BundleExportOptions(formats=("tflite",), name="large", overwrite=True,
                                              calibration_samples=64, measure_parity=False))
    bundle = Bundle.open(staging)
    manifest = bundle.manifest.copy()
    from edgeadapt.device.incremental import with_ridge_basis

    stats = with_ridge_basis(head, stats)  # as an export with ridge_solver_state=True stores it
    section, files = head_payload(head, stats, 1, manifest.backbone_fingerprint, references)
    manifest.data["head"] = section
    all_files = {name: bundle.path / name for name in manifest.files if not name.startswith("heads/")}
    all_files.update(files)
    write_bundle(path, manifest, all_files, overwrite=True)
    shutil.rmtree(staging, ignore_errors=True)
    return path


def build_flowers_bundle(work: Path, data: Path, image_size: int, epochs: int, seed: int = 0) -> dict:
    """Train the 3-class base with the host pipeline and export it; cache embeddings of all 4 classes."""
    from edgeadapt.data.image_folders import SplitOptions, load_image_folder
    from edgeadapt.device.manifest import InputSpec

    info_path = work / "flowers.json"
    if info_path.is_file() and (work / "flowers.eab" / "manifest.json").is_file():
        return json.loads(info_path.read_text())
    from edgeadapt.converters.bundle_export import BundleExportOptions, export_bundle
    from edgeadapt.device.head import ClassStats
    from edgeadapt.data.embeddings import compute_embeddings
    from edgeadapt.training.head_training import HeadTrainingOptions, train_head
    from edgeadapt.training.model_split import backbone_fingerprint, split_classifier
    from edgeadapt.training.classifier import ClassifierTrainingOptions, train_classifier

    everything = load_image_folder(data, InputSpec(height=image_size, width=image_size), SplitOptions(seed=seed),
                                   classes=(*BASE_CLASSES, NEW_CLASS))
    base = everything.select_classes(list(BASE_CLASSES))
    start = time.perf_counter()
    model = train_classifier(base, ClassifierTrainingOptions(epochs=epochs, seed=seed, verbose=2))
    train_seconds = time.perf_counter() - start
    split = split_classifier(model)
    spec = base.spec
    train_embeddings = compute_embeddings(split.backbone, base.train.images, spec, progress=False)
    validation_embeddings = compute_embeddings(split.backbone, base.validation.images, spec, progress=False)
    head = train_head(train_embeddings, base.train.labels, len(BASE_CLASSES), HeadTrainingOptions(seed=seed),
                      validation=(validation_embeddings, base.validation.labels), initial=split.head)
    stats = ClassStats.from_embeddings(train_embeddings, base.train.labels, len(BASE_CLASSES))
    export_bundle(work / "flowers.eab", backbone=split.backbone, head=head, input_spec=spec,
                  class_names=list(BASE_CLASSES), calibration_images=base.train.images,
                  calibration_labels=base.train.labels, evaluation_images=base.test.images,
                  evaluation_labels=base.test.labels, class_stats=stats,
                  backbone_fingerprint=backbone_fingerprint(split.backbone),
                  options=BundleExportOptions(formats=("tflite",), name="flowers3", overwrite=True))
    for name, part in (("train", everything.train), ("validation", everything.validation), ("test", everything.test)):
        np.save(work / f"{name}_images.npy", part.images)
        np.save(work / f"{name}_labels.npy", part.labels)
    info = {"classes": everything.class_names, "image_size": image_size, "epochs": epochs,
            "train_seconds": train_seconds, "train": len(everything.train), "test": len(everything.test)}
    info_path.write_text(json.dumps(info, indent=2))
    return info


# ----------------------------------------------------------------------------- end to end
def bench_end_to_end(bundle: Path, images: np.ndarray, repeats: int) -> dict:
    from edgeadapt.device.runtime import Runtime
    from edgeadapt.device.updater import HeadUpdater

    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / bundle.name
        shutil.copytree(bundle, copy)
        runtime = Runtime.open(copy)
        examples = [images[index % len(images)] for index in range(5)]
        runtime.embed(np.stack(examples))  # warm up the interpreter at batch size 5
        batch_times, single_times, add_times, parts = [], [], [], []
        for _ in range(repeats):
            start = time.perf_counter()
            runtime.embed(np.stack(examples))
            batch_times.append(time.perf_counter() - start)
        for _ in range(repeats):
            start = time.perf_counter()
            for example in examples:
                runtime.embed(example)
            single_times.append(time.perf_counter() - start)
        updater = HeadUpdater(runtime, reader_grace_seconds=0.0)
        updater.add_class("warm-up", examples, force=True)
        for repeat in range(repeats):
            start = time.perf_counter()
            result = updater.add_class(f"added{repeat}", examples, force=True)
            add_times.append(time.perf_counter() - start)
            parts.append(result.timings)
        head = runtime.head
    breakdown = {key: median_ms([part.get(key, 0.0) for part in parts])
                 for key in ("embed", "lock", "load", "math", "gate", "assemble", "commit")}
    inference = median_ms(batch_times)
    return {"bundle": bundle.name, "classes": head.num_classes, "dimension": head.embedding_size,
            "backend": runtime.backend_name, "five_inferences_batch_ms": inference,
            "five_inferences_single_ms": median_ms(single_times), "add_class_ms": median_ms(add_times),
            "add_class_min_ms": min(add_times) * 1000.0,
            "overhead_ms": median_ms(add_times) - inference, "breakdown_ms": breakdown, "repeats": repeats}


def fsync_probe(folder: Path, repeats: int = 30) -> float:
    """Median milliseconds of writing 4 KiB and fsyncing it on the disk that holds ``folder``."""
    path = folder / ".fsync-probe"
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(descriptor, b"x" * 4096)
        os.fsync(descriptor)
        os.close(descriptor)
        times.append(time.perf_counter() - start)
    path.unlink()
    return median_ms(times)


# ----------------------------------------------------------------------------- flowers accuracy
def bench_flowers(work: Path, seeds: int) -> dict:
    from edgeadapt.device import incremental
    from edgeadapt.device.runtime import Runtime
    from edgeadapt.device.updater import HeadUpdater
    from edgeadapt.benchmarks.fewshot_measure import against_joint, fair_scores, per_class_accuracy
    from edgeadapt.training.head_training import HeadTrainingOptions, train_head

    classes = json.loads((work / "flowers.json").read_text())["classes"]
    new_label = classes.index(NEW_CLASS)
    images = {name: np.load(work / f"{name}_images.npy") for name in ("train", "validation", "test")}
    labels = {name: np.load(work / f"{name}_labels.npy") for name in ("train", "validation", "test")}
    runtime = Runtime.open(work / "flowers.eab")
    embeddings = {name: runtime.embed(images[name]) for name in images}  # device int8 embeddings
    test_labels = labels["test"]
    old = test_labels != new_label
    old_classes = [index for index in range(len(classes)) if index != new_label]

    def scores(predicted: np.ndarray) -> dict:
        return fair_scores(predicted, test_labels, old_classes, [new_label])

    base_predictions = runtime.head.logits(embeddings["test"][old]).argmax(axis=1)
    base_accuracy = per_class_accuracy(base_predictions, test_labels[old], old_classes)
    joint = train_head(embeddings["train"], labels["train"], len(classes), HeadTrainingOptions(seed=0),
                       validation=(embeddings["validation"], labels["validation"]))
    joint_scores = scores(joint.logits(embeddings["test"]).argmax(axis=1))
    upper = against_joint(joint_scores, joint_scores, base_accuracy)  # ratio 1 by definition
    new_pool = np.flatnonzero(labels["train"] == new_label)
    rows = []
    for shots in SHOTS:
        for method in (incremental.DEFAULT_METHOD, "imprint"):
            results = []
            for seed in range(seeds):
                chosen = np.random.default_rng([seed, shots]).choice(new_pool, shots, replace=False)
                with tempfile.TemporaryDirectory() as folder:
                    copy = Path(folder) / "flowers.eab"
                    shutil.copytree(work / "flowers.eab", copy)
                    device = Runtime.open(copy)
                    updater = HeadUpdater(device, options=incremental.AddClassOptions(method=method))
                    result = updater.add_class(NEW_CLASS, list(images["train"][chosen]), force=True)
                    predicted = device.head.logits(embeddings["test"]).argmax(axis=1)
                    results.append({**against_joint(scores(predicted), upper, base_accuracy),
                                    "gate_passed": result.gate.passed})
            keys = ("old_accuracy", "new_recall", "harmonic_mean", "ratio_to_joint", "old_drop")
            summary = {key: float(np.median([entry[key] for entry in results])) for key in keys}
            spread = {f"{key}_std": float(np.std([entry[key] for entry in results])) for key in keys}
            rows.append({"shots": shots, "method": method, **summary, **spread,
                         "gate_passed": float(np.mean([entry["gate_passed"] for entry in results])),
                         "draws": seeds})
    return {"classes": classes, "base_old_accuracy": base_accuracy, "upper_bound": upper, "rows": rows,
            "backend": runtime.backend_name}


# ----------------------------------------------------------------------------- peak RSS
RSS_CHILD = """
import sys


def peak_mb():
    # VmHWM of this process's own address space (ru_maxrss would include the parent's size at fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


for name in ("tensorflow", "keras", "tf2onnx"):
    sys.modules[name] = None          # prove the update runs without TensorFlow
import json, shutil, tempfile, time
from pathlib import Path
import numpy as np
from edgeadapt.device.runtime import Runtime
from edgeadapt.device.updater import HeadUpdater
folder = Path(tempfile.mkdtemp())
copy = folder / "bundle.eab"
shutil.copytree(sys.argv[1], copy)
images = np.load(sys.argv[2])[:5]
runtime = Runtime.open(copy)
runtime.predict(images[0])
before = peak_mb()
start = time.perf_counter()
result = HeadUpdater(runtime).add_class("rss-probe", list(images), force=True)
seconds = time.perf_counter() - start
after = peak_mb()
shutil.rmtree(folder)
print(json.dumps({"peak_rss_before_mb": before, "peak_rss_after_mb": after, "update_s": seconds,
                  "version": result.version}))
"""


def bench_peak_rss(bundle: Path, images_path: Path) -> dict:
    child = subprocess.run([sys.executable, "-c", RSS_CHILD, str(bundle), str(images_path)],
                           capture_output=True, text=True, timeout=600)
    if child.returncode != 0:
        raise RuntimeError(child.stderr)
    figures = json.loads(child.stdout.strip().splitlines()[-1])
    return {"bundle": bundle.name, **figures}


# ----------------------------------------------------------------------------- report
def report_text(results: dict) -> str:
    lines = []
    math = results["head_math"]
    lines.append(f"1. head update excluding embeddings, {math['classes']} classes x {math['dimension']}-d, "
                 f"method {math['method']} (median of {math['repeats']}):")
    lines.append(f"   head math {math['math_ms']:.1f} ms + update gate {math['gate_ms']:.1f} ms "
                 f"({math['gate_references']} references) = {math['math_ms'] + math['gate_ms']:.1f} ms per added class "
                 "(goal <= 20 ms), with the cached solver state")
    if "basis_build_ms" in math:
        where = ("at export with ridge_solver_state=True, else by the first ridge update" if math["method"] == "ridge"
                 else "by the first update in a process")
        lines.append(f"   solver state built once: {math['basis_build_ms']:.0f} ms ({where}; rebuilt every "
                     f"{math['basis_refresh_every']} added classes) -> amortised head math "
                     f"{math['amortized_math_ms']:.1f} ms per class; from scratch every time: "
                     f"{math['from_scratch_ms']:.0f} ms")
    others = ", ".join(f"{name} {value:.1f} ms" if isinstance(value, float) else f"{name} {value}"
                       for name, value in math.get("other_methods_ms", {}).items())
    lines.append(f"   other methods' head math: {others}; BLAS threads {math.get('blas_threads')}")
    lines.append("")
    lines.append("2. end-to-end add_class with 5 images (median):")
    lines.append(f"   {'bundle':<20}{'classes':>8}{'dim':>6}{'5 inferences':>14}{'add_class':>11}{'(min)':>9}"
                 f"{'overhead':>10}   breakdown (ms)")
    for row in results["end_to_end"]:
        parts = ", ".join(f"{key} {value:.1f}" for key, value in row["breakdown_ms"].items())
        lines.append(f"   {row['bundle']:<20}{row['classes']:>8}{row['dimension']:>6}{row['five_inferences_batch_ms']:>12.1f}ms"
                     f"{row['add_class_ms']:>9.1f}ms{row['add_class_min_ms']:>7.1f}ms{row['overhead_ms']:>8.1f}ms   {parts}")
    lines.append(f"   (goal: add_class <= 5 inferences + 20 ms; this disk: write 4 KiB + fsync "
                 f"{results.get('fsync_ms', float('nan')):.2f} ms median; a commit waits for 3 rounds of concurrent fsyncs)")
    if "flowers" in results:
        flowers = results["flowers"]
        upper = flowers["upper_bound"]
        lines.append("")
        lines.append(f"3. flowers: base {', '.join(BASE_CLASSES)} (old-class accuracy {flowers['base_old_accuracy']:.3f}), "
                     f"+ {NEW_CLASS} on the device; int8 {flowers['backend']}; median of {flowers['rows'][0]['draws']} draws")
        lines.append(f"   {'k':>3} {'method':<10}{'old acc':>8}{'new rec':>8}{'h-mean':>8}{'/joint':>8}{'old drop':>9}"
                     f"{'gate ok':>9}")
        lines.append(f"   {'all':>3} {'joint':<10}{upper['old_accuracy']:>8.3f}{upper['new_recall']:>8.3f}"
                     f"{upper['harmonic_mean']:>8.3f}{1.0:>8.3f}{upper['old_drop']:>+9.3f}{'':>9}"
                     "   (host joint retrain of the head on all data = upper bound)")
        for row in flowers["rows"]:
            lines.append(f"   {row['shots']:>3} {row['method']:<10}{row['old_accuracy']:>8.3f}{row['new_recall']:>8.3f}"
                         f"{row['harmonic_mean']:>8.3f}{row['ratio_to_joint']:>8.3f}{row['old_drop']:>+9.3f}"
                         f"{row['gate_passed']:>9.0%}")
        lines.append("   old acc: mean per-class accuracy of the old classes, new rec: recall of the new class "
                     "(argmax over all classes), h-mean: their harmonic mean, /joint: over the joint's, old drop: "
                     "old-class accuracy lost against the base bundle (positive = lost)")
    lines.append("")
    lines.append("4. peak RSS of one add_class (5 images) in a TensorFlow-free process:")
    for row in results["peak_rss"]:
        lines.append(f"   {row['bundle']:<14} before {row['peak_rss_before_mb']:.0f} MB, after {row['peak_rss_after_mb']:.0f} MB "
                     f"(+{row['peak_rss_after_mb'] - row['peak_rss_before_mb']:.0f} MB), update {row['update_s'] * 1000:.0f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="flowers folder (daisy, dandelion, rose, sunflower)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edgeadapt-bench-device-update",
                        help="folder for the built bundles (reused by later runs)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--dimension", type=int, default=1280)
    parser.add_argument("--image-size", type=int, default=96, help="flowers input size (default 96)")
    parser.add_argument("--large-image-size", type=int, default=128, help="input size of the 1000-class bundle")
    parser.add_argument("--epochs", type=int, default=25, help="base training epochs (default 25)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--draws", type=int, default=10, help="random draws of the k examples (default 10)")
    parser.add_argument("--json-out", dest="json", type=Path, metavar="FILE", help="also write the figures as JSON")
    arguments = parser.parse_args(argv)
    work = arguments.work
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    print("1. head math on synthetic statistics ...", flush=True)
    results["head_math"] = bench_head_math(arguments.classes, arguments.dimension, arguments.repeats)
    print("   building the large bundle ...", flush=True)
    large = build_large_bundle(work / f"large{arguments.classes}x{arguments.dimension}.eab", arguments.classes,
                               arguments.dimension, arguments.large_image_size)
    random_images = np.random.default_rng(0).integers(
        0, 256, size=(5, arguments.large_image_size, arguments.large_image_size, 3), dtype=np.uint8)
    np.save(work / "large_images.npy", random_images)
    results["end_to_end"] = []
    results["peak_rss"] = []
    results["fsync_ms"] = fsync_probe(work)
    if arguments.data is not None:
        print("3. flowers base bundle (host pipeline) ...", flush=True)
        results["flowers_build"] = build_flowers_bundle(work, arguments.data, arguments.image_size, arguments.epochs)
        flower_images = np.load(work / "test_images.npy")
        np.save(work / "flower_examples.npy", flower_images[:5])
        print("2. end-to-end (flowers) ...", flush=True)
        results["end_to_end"].append(bench_end_to_end(work / "flowers.eab", flower_images[:5], arguments.repeats))
    print("2. end-to-end (large) ...", flush=True)
    results["end_to_end"].append(bench_end_to_end(large, random_images, arguments.repeats))
    if arguments.data is not None:
        print("3. flowers accuracy ...", flush=True)
        results["flowers"] = bench_flowers(work, arguments.draws)
    print("4. peak RSS ...", flush=True)
    if arguments.data is not None:
        results["peak_rss"].append(bench_peak_rss(work / "flowers.eab", work / "flower_examples.npy"))
    results["peak_rss"].append(bench_peak_rss(large, work / "large_images.npy"))
    print()
    print(report_text(results))
    if arguments.json:
        arguments.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
