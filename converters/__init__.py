"""edgeadapt.converters: Keras -> int8 TFLite/ONNX export, bundle writing, import of third-party models.

Public names load on first use (``from edgeadapt.converters import export_tflite``), so
importing the package does not import TensorFlow, tf2onnx or onnxruntime.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> module that defines it (imported on first access)
_EXPORTS: dict[str, str] = {
    "export_bundle": "edgeadapt.converters.bundle_export",
    "BundleExportOptions": "edgeadapt.converters.bundle_export",
    "BundleExport": "edgeadapt.converters.bundle_export",
    "export_tflite": "edgeadapt.converters.tflite_export",
    "TFLiteExportOptions": "edgeadapt.converters.tflite_export",
    "export_onnx": "edgeadapt.converters.onnx_export",
    "OnnxExportOptions": "edgeadapt.converters.onnx_export",
    "export_fused": "edgeadapt.converters.fused_export",
    "FusedExport": "edgeadapt.converters.fused_export",
    "import_tflite_classifier": "edgeadapt.converters.tflite_import",
    "import_onnx_classifier": "edgeadapt.converters.onnx_import",
    "ImportOptions": "edgeadapt.converters.tflite_import",
    "ImportedClassifier": "edgeadapt.converters.tflite_import",
    "measure_parity": "edgeadapt.converters.parity",
    "ParityReport": "edgeadapt.converters.parity",
    "inspect_model": "edgeadapt.converters.model_info",
    "ExportedModel": "edgeadapt.converters.model_info",
    "backbone_fingerprint": "edgeadapt.converters.fingerprint",
    "ConversionError": "edgeadapt.device.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'edgeadapt.converters' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
