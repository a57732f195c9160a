"""edgeadapt.device: the TensorFlow-free device runtime.

Needs only numpy (+ Pillow for image files) and one interpreter: ai-edge-litert,
tflite-runtime or onnxruntime. Never imports TensorFlow, Keras or tf2onnx.
Public names are imported lazily so that ``import edgeadapt.device`` stays cheap.
"""

from __future__ import annotations

from edgeadapt.device.lazy_exports import lazy_attributes

_EXPORTS = {
    "EdgeAdaptError": "edgeadapt.device.errors",
    "BundleError": "edgeadapt.device.errors",
    "InputError": "edgeadapt.device.errors",
    "IncompatibleModelError": "edgeadapt.device.errors",
    "DatasetError": "edgeadapt.device.errors",
    "ConversionError": "edgeadapt.device.errors",
    "BackendUnavailableError": "edgeadapt.device.errors",
    "UpdateError": "edgeadapt.device.errors",
    "ConcurrentUpdateError": "edgeadapt.device.errors",
    "StorageError": "edgeadapt.device.errors",
    "InputSpec": "edgeadapt.device.manifest",
    "Manifest": "edgeadapt.device.manifest",
    "ClassInfo": "edgeadapt.device.manifest",
    "Head": "edgeadapt.device.head",
    "ClassStats": "edgeadapt.device.head",
    "Bundle": "edgeadapt.device.bundle",
    "pack_bundle": "edgeadapt.device.bundle",
    "unpack_bundle": "edgeadapt.device.bundle",
    "Runtime": "edgeadapt.device.runtime",
    "HeadUpdater": "edgeadapt.device.updater",
    "UpdateGateError": "edgeadapt.device.update_gate",
    "ReferenceEmbeddings": "edgeadapt.device.reference_embeddings",
    "UnknownAwareClassifier": "edgeadapt.device.unknown",
    "Prediction": "edgeadapt.device.runtime",
    "Detector": "edgeadapt.device.detector",
    "DetectionResult": "edgeadapt.device.detector",
    "HeadFile": "edgeadapt.device.head_file",
    "head_to_bytes": "edgeadapt.device.head_file",
    "head_from_bytes": "edgeadapt.device.head_file",
    "read_head_file": "edgeadapt.device.head_file",
    "write_head_file": "edgeadapt.device.head_file",
    "carry_head_file": "edgeadapt.device.head_file",
    "load_carried_head_file": "edgeadapt.device.head_file",
    "prototype_column": "edgeadapt.device.prototype_column",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
