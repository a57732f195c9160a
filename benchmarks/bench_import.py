"""Import a real third-party classifier, fuse it for apps, and add two flower classes to it.

    python benchmarks/bench_import.py --data ../shared/data [--out DIR] [--json-out FILE]

Uses ``DATA/imagenet_mobilenet/mobilenet_v1_0.25_128_quant.tflite`` (uint8, 1001 ImageNet
classes) with its labels and the Coral test images, and ``DATA/flowers``. Prints:

1. import: time, backbone sizes (TFLite cut, ONNX by tf2onnx), head size, probe agreement;
2. acceptance: top-1 of the original file (ai_edge_litert) and of the bundle (LiteRT and
   ONNX Runtime) on cat.bmp / bird.bmp / parrot.jpg, with the reference (pycoral: PIL LANCZOS)
   resize and with the device's own bilinear resize;
3. fused files (TFLite + ONNX): size, agreement with the split bundle, latency per image of
   the fused file vs the split bundle (backbone + numpy head);
4. two new flower classes (default rose, sunflower; not ImageNet classes) added on the host
   with ``edgeadapt.device.incremental.add_classes`` and on the device with ``HeadUpdater``:
   1003 classes, whether the three test images keep their labels, new-class accuracy on a
   held-out flowers test split, and how often an old-class test image (the three Coral images
   and the daisy photos, "daisy" being ImageNet class 986) is taken for a new class. The host
   step runs twice: on the bundle imported without class statistics (the statistics-free
   fallback) and on one imported with ``--data`` images of an existing class (daisy train
   photos), to show what the fallback costs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

TEST_IMAGES = {"cat.bmp": "tiger cat", "bird.bmp": "chickadee", "parrot.jpg": "macaw"}
MODEL = "mobilenet_v1_0.25_128_quant.tflite"
#: The statistics-free method for heads that are not centred/L2-normalised (imported heads).
FALLBACK_METHOD = "imprint_calibrated"


def _median_ms(function, argument, repeats: int) -> float:
    function(argument)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(argument)
        timings.append(time.perf_counter() - start)
    return float(np.median(timings) * 1000)


def _lanczos(paths: list[Path], size: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.LANCZOS)) for path in paths])


def section(title: str) -> None:
    print(f"\n== {title}")


def run(data: Path, output: Path, new_classes: list[str], device_shots: int, repeats: int) -> dict:
    from edgeadapt.device.bundle import Bundle
    from edgeadapt.device.runtime import Runtime

    results: dict = {}
    mobilenet = data / "imagenet_mobilenet"
    model_path, labels_path = mobilenet / MODEL, mobilenet / "imagenet_labels.txt"
    test_paths = [mobilenet / name for name in TEST_IMAGES]
    bundle_path = output / "mobilenet.eab"
    results["import"] = _import(model_path, labels_path, bundle_path, test_paths)
    bundle = Bundle.open(bundle_path)
    spec = bundle.manifest.input_spec
    names = bundle.manifest.class_names
    runtimes = {backend: Runtime.open(bundle_path, backend=backend) for backend in ("litert", "onnxruntime")}
    results["acceptance"] = _acceptance(model_path, test_paths, spec, names, runtimes)
    reference_images = _lanczos(test_paths, spec.height)
    results["fused"] = _fused(output, bundle_path, reference_images, names, runtimes, repeats)

    # ------------------------------------------------------------------ 4. add two flower classes
    section(f"add {', '.join(new_classes)} from {data / 'flowers'}")
    test = _NewClassTest.embed(data / "flowers", spec, new_classes, names, runtimes["litert"], reference_images)
    base_head = bundle.load_head()
    additions = {"before": test.evaluate(base_head, "before (imported, 1001 classes)", 0.0)}
    try:
        from edgeadapt.device import incremental  # noqa: F401 (only checks it is there)
    except ImportError:
        print("edgeadapt.device.incremental is not available: adding classes skipped")
        results["add_classes"] = additions
        return results
    with_stats_path = output / "mobilenet_with_stats.eab"
    additions.update(_host_additions(test, base_head, model_path, labels_path, with_stats_path))
    additions.update(_device_additions(test, output, bundle_path, with_stats_path, device_shots, len(additions)))
    results["add_classes"] = additions
    return results


def _import(model_path: Path, labels_path: Path, bundle_path: Path, test_paths: list[Path]) -> dict:
    """1. import the model, verified on the test images and 64 probes."""
    from edgeadapt.bundles.importing import ImportSettings, import_classifier

    section("import")
    report = import_classifier(model_path, labels_path, bundle_path,
                               ImportSettings(probe_images=tuple(test_paths), probes=64, overwrite=True))
    print(report.table())
    return report.to_dict()


def _acceptance(model_path: Path, test_paths: list[Path], spec, names: list[str], runtimes: dict) -> dict:
    """2. acceptance: the three test images keep the original file's labels, with both resizes."""
    from edgeadapt.converters.tflite_import import tflite_scores
    from edgeadapt.device.preprocessing import prepare_batch
    from edgeadapt.bundles.import_verification import top1_agreement

    section("acceptance: the three test images, original file vs imported bundle")
    acceptance = {}
    for preprocessing, images in (("reference resize (PIL LANCZOS, as pycoral)", _lanczos(test_paths, spec.height)),
                                  ("device resize (bilinear stretch)", prepare_batch([str(p) for p in test_paths], spec))):
        original = tflite_scores(model_path.read_bytes(), images, spec)
        row = {"original": [names[i] for i in original.argmax(1)]}
        for backend, runtime in runtimes.items():
            top1 = runtime.probabilities(images).argmax(1)
            row[backend] = [names[i] for i in top1]
            row[f"{backend}_agreement"] = top1_agreement(original, top1)[0]
        acceptance[preprocessing] = row
        print(f"{preprocessing}:")
        for key in ("original", "litert", "onnxruntime"):
            print(f"  {key:<12} {row[key]}")
        print(f"  agreement    litert {row['litert_agreement']:.3f}, onnxruntime {row['onnxruntime_agreement']:.3f}"
              f"; expected {list(TEST_IMAGES.values())}")
    return acceptance


def _fused(output: Path, bundle_path: Path, reference_images: np.ndarray, names: list[str], runtimes: dict,
           repeats: int) -> dict:
    """3. fused single-file models: size, agreement with the split bundle, latency against it."""
    from edgeadapt.converters.fused_export import FusedRunner, export_fused

    section("fused single-file models vs split bundle")
    fused = {}
    probe = reference_images[0]
    for model_format, backend in (("tflite", "litert"), ("onnx", "onnxruntime")):
        path = output / f"mobilenet_fused.{model_format}"
        result = export_fused(bundle_path, path, model_format, probe_images=reference_images, probes=64)
        runner = FusedRunner(path.read_bytes(), model_format)
        runtime = runtimes[backend]
        fused_ms = _median_ms(runner, probe[None], repeats)
        split_ms = _median_ms(runtime.probabilities, probe, repeats)
        backbone_ms = _median_ms(runtime.embed, probe, repeats)
        labels = [names[i] for i in runner(reference_images).argmax(1)]
        fused[model_format] = {**result.to_dict(), "fused_ms": fused_ms, "split_ms": split_ms,
                               "split_backbone_ms": backbone_ms, "test_image_labels": labels}
        print(f"{model_format:<7} {result.size / 1024:7.0f} KiB  top-1 agreement {result.top1_agreement:.3f} on "
              f"{result.probes} probes, max score diff {result.max_score_difference:.2g}; latency per image: fused "
              f"{fused_ms:.2f} ms, split {split_ms:.2f} ms (backbone {backbone_ms:.2f} ms + head); test images {labels}")
    return fused


@dataclass
class _NewClassTest:
    """The flower photos (new classes + daisy) embedded by the bundle, and how an updated head is scored on them."""

    flowers: Any  # edgeadapt.data.image_folders.Dataset: the new classes, then daisy
    new_classes: list[str]
    names: list[str]
    test_embeddings: np.ndarray
    new_train: list[np.ndarray]
    daisy_test: np.ndarray
    reference_embeddings: np.ndarray

    @classmethod
    def embed(cls, folder: Path, spec, new_classes: list[str], names: list[str], runtime,
              reference_images: np.ndarray) -> "_NewClassTest":
        from edgeadapt.data.image_folders import SplitOptions, load_image_folder

        classes = [*new_classes, "daisy"]
        flowers = load_image_folder(folder, spec, SplitOptions(validation_fraction=0.0, test_fraction=0.3, seed=0),
                                    classes=classes, progress=False)
        start = time.perf_counter()
        train_embeddings = runtime.embed(flowers.train.images)
        test_embeddings = runtime.embed(flowers.test.images)
        embed_seconds = time.perf_counter() - start
        reference_embeddings = runtime.embed(reference_images)
        print(f"flowers: {len(flowers.train)} train / {len(flowers.test)} test images of {classes} (deduplicated); "
              f"embedded in {embed_seconds:.1f} s")
        new_train = [train_embeddings[flowers.train.labels == k] for k in range(len(new_classes))]
        daisy_test = test_embeddings[flowers.test.labels == len(new_classes)]
        return cls(flowers, new_classes, names, test_embeddings, new_train, daisy_test, reference_embeddings)

    def evaluate(self, head, label: str, seconds: float) -> dict:
        from edgeadapt.device.head import softmax

        new_classes, flowers, names = self.new_classes, self.flowers, self.names
        count = head.num_classes
        new_indices = list(range(count - len(new_classes), count))
        test_new = flowers.test.labels < len(new_classes)
        logits = head.logits(self.test_embeddings)
        top1 = logits.argmax(1)
        new_accuracy = float(np.mean(top1[test_new] == np.asarray(new_indices)[flowers.test.labels[test_new]]))
        among_new = float(np.mean(logits[test_new][:, new_indices].argmax(1) == flowers.test.labels[test_new]))
        daisy_top1 = head.logits(self.daisy_test).argmax(1)
        reference_top1 = softmax(head.logits(self.reference_embeddings)).argmax(1)
        reference_labels = [([*names, *new_classes])[i] for i in reference_top1]
        row = {
            "method": label, "classes": count, "seconds": seconds,
            "new_class_accuracy": new_accuracy, "new_class_accuracy_among_new": among_new,
            "new_test_images": int(test_new.sum()),
            "test_images_keep_labels": reference_labels == list(TEST_IMAGES.values()),
            "test_image_labels": reference_labels,
            "daisy_taken_for_new_class": float(np.mean(np.isin(daisy_top1, new_indices))),
            "daisy_still_daisy": float(np.mean(daisy_top1 == names.index("daisy"))),
            "daisy_test_images": int(len(self.daisy_test)),
            "old_test_images_taken_for_new": int(np.sum(np.isin(daisy_top1, new_indices))
                                                 + np.sum(np.isin(reference_top1, new_indices))),
            "old_test_images": int(len(self.daisy_test) + len(reference_top1)),
        }
        print(f"{label:<46} classes {count}, new-class accuracy {new_accuracy:.3f} (among the new only "
              f"{among_new:.3f}) on {row['new_test_images']} test images; test images {reference_labels} "
              f"(keep labels: {row['test_images_keep_labels']}); old-class test images taken for a new class: "
              f"{row['old_test_images_taken_for_new']}/{row['old_test_images']} (daisy photos "
              f"{row['daisy_taken_for_new_class']:.3f}; daisy still 'daisy' {row['daisy_still_daisy']:.3f}); "
              f"{seconds * 1000:.0f} ms")
        return row


def _host_additions(test: _NewClassTest, base_head, model_path: Path, labels_path: Path,
                    with_stats_path: Path) -> dict:
    """Host additions: without statistics (fallback, weight aligning, imprinting), then with daisy statistics."""
    from edgeadapt.device import incremental
    from edgeadapt.device.bundle import Bundle
    from edgeadapt.bundles.importing import ImportSettings, import_classifier

    additions = {}
    # host, no class statistics: the statistics-free fallback (and weight aligning / plain imprinting for comparison)
    for method in (FALLBACK_METHOD, "weight_align", "imprint"):
        start = time.perf_counter()
        head, _ = incremental.add_classes(base_head, None, test.new_train, incremental.AddClassOptions(method=method))
        additions[f"host_{method}_no_statistics"] = test.evaluate(
            head, f"host {method}, no statistics", time.perf_counter() - start)
    # host, statistics of an existing class from --data images (the daisy train photos)
    with tempfile.TemporaryDirectory(prefix="edgeadapt-bench-data-") as directory:
        daisy_folder = Path(directory) / "daisy"
        daisy_folder.mkdir()
        for path, label in zip(test.flowers.train.paths, test.flowers.train.labels):
            if label == len(test.new_classes):
                os.symlink(path, daisy_folder / Path(path).name)
        stats_report = import_classifier(model_path, labels_path, with_stats_path,
                                         ImportSettings(data=Path(directory), onnx=False, probes=8, overwrite=True))
    stats_bundle = Bundle.open(with_stats_path)
    stats = stats_bundle.load_class_stats()
    print(f"import with --data (daisy train photos): statistics of {stats_report.statistics_examples} images, "
          f"{stats_report.import_seconds:.1f} s")
    default_method = incremental.AddClassOptions().method
    start = time.perf_counter()
    head, _ = incremental.add_classes(stats_bundle.load_head(), stats, test.new_train, incremental.AddClassOptions())
    additions[f"host_{default_method}_daisy_statistics"] = test.evaluate(
        head, f"host {default_method}, statistics of 'daisy' (--data)", time.perf_counter() - start)
    return additions


def _device_additions(test: _NewClassTest, output: Path, bundle_path: Path, with_stats_path: Path,
                      device_shots: int, rows_so_far: int) -> dict:
    """Device additions: HeadUpdater on copies of both bundles, a few photos per class."""
    from edgeadapt.device import incremental
    from edgeadapt.device.runtime import Runtime
    from edgeadapt.device.updater import HeadUpdater

    fallback = incremental.AddClassOptions(method=FALLBACK_METHOD)
    default_method = incremental.AddClassOptions().method
    flowers = test.flowers
    examples = {}
    for k, name in enumerate(test.new_classes):
        members = flowers.train.images[flowers.train.labels == k]
        examples[name] = list(members[np.random.default_rng(k).permutation(len(members))[:device_shots]])
    additions = {}
    for label, source, options in ((f"device {FALLBACK_METHOD}, no statistics", bundle_path, fallback),
                                   (f"device {default_method}, 'daisy' statistics", with_stats_path, None)):
        device_path = output / f"device_{rows_so_far + len(additions)}.eab"
        if device_path.exists():
            shutil.rmtree(device_path)
        shutil.copytree(source, device_path)
        updater = HeadUpdater(Runtime.open(device_path, backend="litert"), options=options)
        start = time.perf_counter()
        note = ""
        try:
            updater.add_classes(examples)
        except Exception as error:  # the update gate may refuse: report it, then force to measure
            note = f" (refused first: {type(error).__name__}: {str(error)[:160]}; then forced)"
            start = time.perf_counter()
            updater.add_classes(examples, force=True)
        seconds = time.perf_counter() - start
        row = test.evaluate(Runtime.open(device_path, backend="litert").head,
                            f"{label}, {device_shots} photos/class", seconds)
        row["note"] = note.strip()
        if note:
            print(f"  note:{note}")
        additions[f"device_{'no' if options else 'daisy'}_statistics_{device_shots}_shots"] = row
    return additions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("EDGEADAPT_DATA", "../shared/data")),
                        help="shared data folder with imagenet_mobilenet/ and flowers/ (default $EDGEADAPT_DATA or "
                        "../shared/data)")
    parser.add_argument("--out", type=Path, help="output folder (default: a temporary folder, removed)")
    parser.add_argument("--new-classes", default="rose,sunflower", help="flower classes to add (default rose,sunflower)")
    parser.add_argument("--device-shots", type=int, default=20, help="photos per new class on the device (default 20)")
    parser.add_argument("--repeats", type=int, default=200, help="latency repetitions (default 200)")
    parser.add_argument("--json-out", dest="json", type=Path, metavar="FILE", help="write the results as JSON")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not (arguments.data / "imagenet_mobilenet" / MODEL).is_file():
        print(f"{arguments.data} has no imagenet_mobilenet/{MODEL}; pass --data ../shared/data", file=sys.stderr)
        return 2
    new_classes = [name.strip() for name in arguments.new_classes.split(",") if name.strip()]
    temporary = None
    output = arguments.out
    if output is None:
        temporary = tempfile.TemporaryDirectory(prefix="edgeadapt-bench-import-")
        output = Path(temporary.name)
    output.mkdir(parents=True, exist_ok=True)
    try:
        results = run(arguments.data.resolve(), output, new_classes, arguments.device_shots, arguments.repeats)
    finally:
        if temporary is not None:
            temporary.cleanup()
    if arguments.json:
        arguments.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
