"""What a fused model file embeds: tensor names, embedded file names, the description, ONNX metadata.

A fused file (written by :mod:`edgeadapt.converters.fused_export`) takes ``"image"``
(uint8) and gives ``"probabilities"``; it carries the labels and :func:`fused_info` as
``labels.txt`` / ``edgeadapt.json`` (TFLite, see :mod:`edgeadapt.converters.tflite_metadata`)
or as the ``metadata_props`` of :data:`ONNX_METADATA_KEYS` (ONNX, written by
:func:`onnx_metadata_props`, read by :func:`read_onnx_fused_metadata`).
"""

from __future__ import annotations

import json
from typing import Any

from edgeadapt.device.bundle import Bundle

FORMATS = ("tflite", "onnx")
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
LABELS_FILE = "labels.txt"
INFO_FILE = "edgeadapt.json"
FUSED_FORMAT_VERSION = 1
#: ONNX ``metadata_props`` keys written into fused ONNX files (values are strings).
ONNX_METADATA_KEYS = {
    "edgeadapt.format_version": "fused-model format version (\"1\")",
    "edgeadapt.labels": "JSON list of class names, index i = output column i",
    "edgeadapt.input": "JSON: name, dtype (uint8), layout (NHWC), height, width, channels, color_order, resize, "
                       "scale, offset (the graph computes pixel*scale+offset itself)",
    "edgeadapt.output": "JSON: name (probabilities), dtype (float32), kind (softmax)",
    "edgeadapt.bundle": "JSON: bundle name, id, version, head version, backbone fingerprint, backbone quantization",
}


def fused_info(bundle: Bundle, model_format: str, quantization: str) -> dict[str, Any]:
    """The description embedded in a fused file (``edgeadapt.json`` / ONNX metadata_props)."""
    spec = bundle.manifest.input_spec
    data = bundle.manifest.data
    return {
        "format_version": FUSED_FORMAT_VERSION,
        "labels": bundle.manifest.class_names,
        "input": {
            "name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "height": spec.height, "width": spec.width,
            "channels": spec.channels, "color_order": spec.color_order, "resize": spec.resize,
            "scale": spec.scale, "offset": spec.offset,
            "normalization": "inside the graph: float input = pixel * scale + offset",
        },
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "kind": "softmax", "classes": len(bundle.manifest.class_names)},
        "bundle": {
            "name": data.get("name"), "bundle_id": data.get("bundle_id"), "version": data.get("version"),
            "head_version": data["head"].get("version"), "backbone_fingerprint": bundle.manifest.backbone_fingerprint,
            "backbone_quantization": quantization, "format": model_format,
        },
    }


def onnx_metadata_props(info: dict[str, Any]) -> list[tuple[str, str]]:
    """The ``(key, value)`` metadata_props of a fused ONNX file for :func:`fused_info`'s ``info``."""
    return [
        ("edgeadapt.format_version", str(FUSED_FORMAT_VERSION)),
        ("edgeadapt.labels", json.dumps(info["labels"])),
        ("edgeadapt.input", json.dumps(info["input"])),
        ("edgeadapt.output", json.dumps(info["output"])),
        ("edgeadapt.bundle", json.dumps(info["bundle"])),
    ]


def read_onnx_fused_metadata(content: bytes) -> dict[str, Any]:
    """The ``edgeadapt.*`` metadata_props of a fused ONNX file, JSON values decoded."""
    import onnx

    model = onnx.load_from_string(bytes(content))
    props = {entry.key: entry.value for entry in model.metadata_props}
    result: dict[str, Any] = {}
    for key in ONNX_METADATA_KEYS:
        if key in props:
            result[key] = props[key] if key == "edgeadapt.format_version" else json.loads(props[key])
    return result
