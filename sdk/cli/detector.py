"""``edgeadapt detector add-classes`` and ``edgeadapt bench detection``."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgeadapt.cli.incremental import _bench_subparsers
from edgeadapt.device.cli_common import add_json_options, emit_report


def _split_classes(text: str) -> list[str]:
    from edgeadapt.device.errors import InputError

    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise InputError(f"--classes {text!r} has an empty name; give comma-separated class folder names")
    return names


def _add_classes(arguments: argparse.Namespace) -> int:
    from edgeadapt.detection.add_classes import DetectorOptions, add_detector_classes
    from edgeadapt.detection.training import TrainingOptions
    from edgeadapt.device.errors import InputError

    if arguments.steps < 1:
        raise InputError(f"--steps must be at least 1, got {arguments.steps}")
    options = DetectorOptions(nms=arguments.nms, cache_dir=arguments.cache, use_cache=not arguments.no_cache,
                              progress=not getattr(arguments, "quiet", False), num_threads=arguments.threads,
                              training=TrainingOptions(steps=arguments.steps))
    result = add_detector_classes(arguments.model, arguments.labels, arguments.data, _split_classes(arguments.classes),
                                  arguments.out, negatives=arguments.negatives, options=options,
                                  overwrite=arguments.overwrite)
    emit_report(arguments, result.summary(), result.to_dict())
    return 0


def _bench_detection(arguments: argparse.Namespace) -> int:
    from edgeadapt.benchmarks.detection import DetectionBenchOptions, format_table, run_detection_bench

    result = run_detection_bench(DetectionBenchOptions(
        data=arguments.data, classes=tuple(_split_classes(arguments.classes)), timing_images=arguments.timing_images,
        progress=not arguments.json))
    emit_report(arguments, format_table(result), result.to_dict())
    return 0


def register(subparsers) -> None:
    """Add ``detector add-classes`` and ``bench detection``."""
    from edgeadapt.detection.rewrite import NMS_MODES

    detector = subparsers.add_parser(
        "detector", help="object detectors: add classes to an SSD .tflite (edgeadapt detector add-classes ...)",
        description="Work on SSD-style TFLite detectors that end in TFLite_Detection_PostProcess.")
    commands = detector.add_subparsers(dest="detector_command", required=True, metavar="COMMAND")
    add = commands.add_parser(
        "add-classes", help="add classes to an SSD detector; the old classes' scores stay bit-identical",
        description="Embed the boxed photos of the new classes with the detector (the class predictors' input feature "
        "maps, cached), match anchors to the boxes, train one new row per anchor and class in numpy, and write a "
        "standalone NEW.tflite (rows interleaved per anchor, num_classes raised, labels embedded as TFLite metadata) "
        "plus NEW.labels.txt in the input labelmap's format. Old rows and biases are copied bit for bit. Nothing is "
        "written on error. See docs/DETECTION.md.")
    add.add_argument("model", type=Path, help="SSD .tflite ending in TFLite_Detection_PostProcess")
    add.add_argument("--labels", type=Path, required=True,
                     help="its labelmap (line 0 '???' then one class per line, class index i = line i+1)")
    add.add_argument("--data", type=Path, required=True,
                     help="folder with one sub-folder per new class: images with Pascal VOC .xml (or COCO .json)")
    add.add_argument("--classes", required=True, help="comma-separated new class names (sub-folders of --data)")
    add.add_argument("--negatives", type=Path,
                     help="optional folder of photos without the new classes (e.g. COCO photos): hard negatives")
    add.add_argument("--nms", choices=NMS_MODES, default="regular",
                     help="regular = per-class NMS (new boxes cannot take old classes' slots) or fast = top class per "
                     "anchor (about 2x faster post-process; costs old-class mAP) (default regular)")
    add.add_argument("--out", type=Path, required=True, help="the new .tflite (NEW.labels.txt is written beside it)")
    add.add_argument("--cache", type=Path, help="embedding cache folder (default ~/.cache/edgeadapt/detection)")
    add.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    add.add_argument("--steps", type=int, default=100,
                     help="optimiser steps per training round (default 100; raise it for a few dozen boxes)")
    add.add_argument("--threads", type=int, help="LiteRT threads (default: LiteRT's choice)")
    add.add_argument("--overwrite", action="store_true", help="replace --out and its labels file if they exist")
    add_json_options(add, "the result")
    add.set_defaults(handler=_add_classes)

    benchmarks = _bench_subparsers(subparsers)
    bench = benchmarks.add_parser(
        "detection", help="add raccoon/kangaroo to the COCO SSD and measure old mAP, new AP50, bit-identity, speed",
        description="Add classes to ssd_mobilenet_v1_coco_quant.tflite (every 4th photo of each class held out, half "
        "of coco_old used as negatives) and print: pycocotools mAP@[.5:.95]/AP50 of the old classes before and after "
        "(fast and regular NMS), bit-identity of the old scores, new-class AP50 on the held-out photos, new-class "
        "detections >= 0.5 on COCO photos, ms/image at 1 and 2 threads, and the add-classes time.")
    bench.add_argument("--data", type=Path, required=True,
                       help="the detection data folder (model, labelmap.txt, class folders, coco_old/)")
    bench.add_argument("--classes", default="raccoon,kangaroo", help="new classes (default raccoon,kangaroo)")
    bench.add_argument("--timing-images", type=int, default=20, help="photos timed per model (default 20)")
    add_json_options(bench, "every figure")
    bench.set_defaults(handler=_bench_detection)
