"""Coral's imprinting flow on a headless extractor: teach classes from 1-2 photos each, then recognise them.

    python benchmarks/bench_headless.py --data ../shared/data [--model mobilenet_v1_0.75_192_quant.tflite]
        [--classes shoes,dress,pants] [--shots 1,2] [--draws 5] [--method NAME] [--json-out FILE]

Steps (every one through the public tools, on real files):

1. ``edgeadapt import DATA/imagenet_mobilenet/MODEL --labels ...`` (a real ImageNet classifier), then a
   *headless* import of the written bundle's ``backbone.int8.tflite`` (an embedding extractor) with
   ``--background DATA/detection/coco_old`` (ordinary photos): a bundle with zero classes.
2. For each draw (seeded) and shot count k: a fresh copy of the zero-class bundle learns the classes
   of ``DATA/clothing`` one after the other on the device (``HeadUpdater.add_class_embeddings`` with
   embeddings from the bundle's own runtime, the update gate on, the method chosen automatically
   unless ``--method``) from k photos each.
3. Measures, per k: the share of classes whose *near-duplicate* photo (one of its training photos,
   cropped to 90%, 5% brighter, JPEG re-encoded) is recognised, the share of classes learned without
   a gate refusal, and the recall on every other photo of the class (held out; the harder question).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

MODEL = "mobilenet_v1_0.75_192_quant.tflite"
HELD_OUT = 60  # held-out photos per class scored (a fixed subsample)


def near_duplicate(path: Path) -> np.ndarray:
    """The photo cropped to its central 90%, 5% brighter and JPEG re-encoded (quality 85), as RGB uint8."""
    from PIL import Image, ImageEnhance

    image = Image.open(path).convert("RGB")
    width, height = image.size
    left, top = int(width * 0.05), int(height * 0.05)
    image = image.crop((left, top, width - left, height - top))
    image = ImageEnhance.Brightness(image).enhance(1.05)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


def build_extractor(data: Path, model: str, work: Path) -> tuple[Path, str]:
    """Import the classifier, then its backbone headless with a background; returns the bundle and the table."""
    from edgeadapt.bundles.importing import ImportSettings, import_classifier

    source = data / "imagenet_mobilenet"
    classifier = work / "classifier.eab"
    import_classifier(source / model, source / "imagenet_labels.txt", classifier, ImportSettings(onnx=False))
    extractor = work / "extractor.eab"
    report = import_classifier(classifier / "backbone.int8.tflite", None, extractor,
                               ImportSettings(onnx=False, background=data / "detection" / "coco_old"))
    return extractor, report.table()


def run(arguments: argparse.Namespace) -> dict:
    from edgeadapt.device.incremental import AddClassOptions
    from edgeadapt.device.preprocessing import IMAGE_SUFFIXES
    from edgeadapt.device.runtime import Runtime
    from edgeadapt.device import HeadUpdater, UpdateGateError

    data = Path(arguments.data)
    classes = [name.strip() for name in arguments.classes.split(",")]
    shots = [int(value) for value in arguments.shots.split(",")]
    work = Path(tempfile.mkdtemp(prefix="edgeadapt-headless-"))
    try:
        start = time.perf_counter()
        extractor, table = build_extractor(data, arguments.model, work)
        print(table)
        print(f"(both imports: {time.perf_counter() - start:.1f} s)")
        runtime = Runtime.open(extractor)
        photos = {name: sorted(path for path in (data / "clothing" / name).iterdir()
                               if path.suffix.lower() in IMAGE_SUFFIXES) for name in classes}
        rng = np.random.default_rng(arguments.seed)
        draws = []
        for _ in range(arguments.draws):
            picked = {name: [int(i) for i in rng.permutation(len(files))] for name, files in photos.items()}
            draws.append(picked)
        # embed once: every photo any draw uses (training, near-duplicates, held out)
        needed = sorted({(name, index) for picked in draws for name, order in picked.items()
                         for index in order[: max(shots) + HELD_OUT]})
        embeddings = dict(zip(needed, runtime.embed([photos[name][index] for name, index in needed])))
        duplicates = {}
        for picked in draws:
            for name, order in picked.items():
                key = (name, order[0])
                if key not in duplicates:
                    duplicates[key] = runtime.embed(near_duplicate(photos[name][order[0]]))[0]
        options = None if arguments.method is None else AddClassOptions(method=arguments.method)
        results: dict[str, dict] = {}
        for k in shots:
            recognised, learned, recalls, methods, refusals = [], [], [], set(), 0
            for number, picked in enumerate(draws):
                copy = work / f"draw{number}-k{k}.eab"
                shutil.copytree(extractor, copy)
                updater = HeadUpdater(Runtime.open(copy), options=options)
                taught = []
                for name in classes:
                    train = np.stack([embeddings[(name, index)] for index in picked[name][:k]])
                    try:
                        result = updater.add_class_embeddings(name, train)
                        methods.add(result.change["method"])
                        taught.append(name)
                    except UpdateGateError:
                        refusals += 1
                learned.append(len(taught) / len(classes))
                head = updater.runtime.head
                names = updater.runtime.class_names
                for name in classes:
                    if name not in taught:
                        recognised.append(0.0)
                        recalls.append(0.0)
                        continue
                    duplicate = duplicates[(name, picked[name][0])]
                    recognised.append(float(names[int(head.logits(duplicate[None]).argmax())] == name))
                    held = np.stack([embeddings[(name, index)] for index in picked[name][max(shots):][:HELD_OUT]])
                    recalls.append(float(np.mean([names[i] == name for i in head.logits(held).argmax(axis=1)])))
                shutil.rmtree(copy)
            results[str(k)] = {
                "near_duplicate_recognised": round(float(np.mean(recognised)), 3),
                "classes_learned": round(float(np.mean(learned)), 3),
                "gate_refusals": refusals,
                "held_out_recall": round(float(np.mean(recalls)), 3),
                "methods": sorted(methods),
            }
        return {"model": arguments.model, "classes": classes, "draws": arguments.draws,
                "held_out_per_class": HELD_OUT, "shots": results}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the shared data folder (../shared/data)")
    parser.add_argument("--model", default=MODEL, help=f"classifier in DATA/imagenet_mobilenet (default {MODEL})")
    parser.add_argument("--classes", default="shoes,dress,pants",
                        help="clothing classes taught one after the other (default shoes,dress,pants)")
    parser.add_argument("--shots", default="1,2", help="photos per class, comma-separated (default 1,2)")
    parser.add_argument("--draws", type=int, default=5, help="seeded draws of the photos (default 5)")
    parser.add_argument("--method", help="force a method (default: the automatic choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    parser.add_argument("--json-out", type=Path, metavar="FILE", help="also write the figures as JSON to this file")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    figures = run(arguments)
    print(f"\nCoral flow on a headless {figures['model']} extractor, classes {', '.join(figures['classes'])} "
          f"taught one after the other, {figures['draws']} draws")
    print(f"{'shots':>5}  {'near-duplicate recognised':>25}  {'classes learned':>15}  {'held-out recall':>15}  method")
    for k, row in figures["shots"].items():
        print(f"{k:>5}  {row['near_duplicate_recognised']:>25.3f}  {row['classes_learned']:>15.3f}  "
              f"{row['held_out_recall']:>15.3f}  {', '.join(row['methods'])} ({row['gate_refusals']} gate refusals)")
    if arguments.json_out:
        arguments.json_out.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
