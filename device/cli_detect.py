"""``edgeadapt-device detect``: run an SSD detector on images (no TensorFlow)."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgeadapt.device.cli_common import add_json_options, emit_report
from edgeadapt.device.trust import add_trust_arguments, trusted_keys_from_arguments


def _detect(arguments: argparse.Namespace) -> int:
    from edgeadapt.device.detector import Detector

    trusted = trusted_keys_from_arguments(arguments)
    if trusted is not None:  # the model must carry MODEL.dsse.json by a trusted key (edgeadapt sign-file)
        from edgeadapt.device.signing import verify_file

        verify_file(arguments.model, trusted)
    detector = Detector(arguments.model, labels=arguments.labels, backend=arguments.backend,
                        num_threads=arguments.threads)
    results = []
    for image in arguments.images:
        result = detector.detect(image, score_threshold=arguments.threshold)
        results.append({"image": str(image), **result.to_dict()})
    lines = []
    for entry in results:
        lines.append(f"{entry['image']} ({entry['width']}x{entry['height']}): {len(entry['detections'])} detections")
        for detection in entry["detections"]:
            xmin, ymin, xmax, ymax = detection["box"]
            lines.append(f"  {detection['label']:<20} {detection['score']:.3f}  "
                         f"x {xmin:.0f}..{xmax:.0f}  y {ymin:.0f}..{ymax:.0f}")
    emit_report(arguments, "\n".join(lines), {"backend": detector.backend_name, "results": results})
    return 0


def register(subparsers) -> None:
    """Add ``detect``."""
    detect = subparsers.add_parser(
        "detect", help="detect objects with an SSD .tflite (boxes in image pixels)",
        description="Run a detector ending in TFLite_Detection_PostProcess (e.g. one written by `edgeadapt detector "
        "add-classes`) on images and print label, score and box (pixels of the original image).")
    detect.add_argument("model", type=Path, help="detector .tflite")
    detect.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="JPEG/PNG/BMP files")
    detect.add_argument("--labels", type=Path,
                        help="labelmap file (line 0 '???' -> class i is line i+1; default: labels embedded in the model)")
    detect.add_argument("--threshold", type=float, default=0.5, help="minimum score of a box (default 0.5)")
    detect.add_argument("--backend", choices=("auto", "litert", "tflite-runtime"), default="auto",
                        help="TFLite interpreter (default auto: LiteRT first)")
    detect.add_argument("--threads", type=int, help="interpreter threads (default: the backend's choice)")
    add_json_options(detect, "the detections")
    add_trust_arguments(detect, what="models", note="; the signature is MODEL.dsse.json beside the model "
                        "(`edgeadapt sign-file`)", device_versions=False)
    detect.set_defaults(handler=_detect)
