"""edgeadapt.converters: Keras -> int8 TFLite/ONNX export, bundle writing, import of third-party models.

Public names load on first use (``from edgeadapt.converters import export_tflite``), so
importing the package does not import TensorFlow, tf2onnx or onnxruntime.
"""

from __future__ import annotations

from edgeadapt.device.lazy_exports import lazy_attributes

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


__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
