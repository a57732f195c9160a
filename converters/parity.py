"""Measure float-vs-quantized parity of exported backbones with the real device interpreters."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgeadapt.device.backends import OnnxBackend, TFLiteBackend, available_backends
from edgeadapt.device.head import Head
from edgeadapt.device.manifest import InputSpec
from edgeadapt.device.preprocessing import InputQuantizer

logger = logging.getLogger(__name__)


@dataclass
class ParityReport:
    """Float vs quantized agreement of one model format on a labelled held-out set."""

    format: str
    samples: int
    float_accuracy: float
    quantized_accuracy: float
    top1_agreement: float
    embedding_cosine: float
    float_size: int
    quantized_size: int

    def to_dict(self) -> dict:
        return {key: (round(value, 6) if isinstance(value, float) else value) for key, value in asdict(self).items()}


def run_exported(content: bytes, model_format: str, spec: InputSpec, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Embeddings of uint8 ``images`` computed by the device interpreter on a model file."""
    suffix = ".tflite" if model_format == "tflite" else ".onnx"
    with tempfile.TemporaryDirectory(prefix="edgeadapt-parity-") as directory:
        path = Path(directory) / f"model{suffix}"
        path.write_bytes(content)
        if model_format == "tflite":
            name = next((b for b in available_backends() if b in ("litert", "tflite-runtime")), "litert")
            backend = TFLiteBackend(path, name)
        else:
            backend = OnnxBackend(path)
        quantizer = InputQuantizer(spec, backend.input.dtype, backend.input.scale, backend.input.zero_point)
        parts = [backend.run(quantizer(images[start : start + batch_size])) for start in range(0, len(images), batch_size)]
    return np.concatenate(parts)


def measure_parity(
    model_format: str,
    float_content: bytes,
    quantized_content: bytes,
    spec: InputSpec,
    head: Head,
    images: np.ndarray,
    labels: np.ndarray,
) -> ParityReport:
    """Top-1 accuracy of float and quantized backbones (same head) and their agreement.

    Args:
        model_format: "tflite" or "onnx".
        float_content: The float model's bytes.
        quantized_content: The quantized model's bytes.
        spec: The input spec.
        head: The head applied to both models' embeddings.
        images: uint8 evaluation images.
        labels: Their labels.

    Returns:
        Both accuracies, top-1 agreement, embedding cosine and file sizes.

    Raises:
        ConversionError: When a model cannot be run.
    """
    float_embeddings = run_exported(float_content, model_format, spec, images)
    quantized_embeddings = run_exported(quantized_content, model_format, spec, images)
    float_top1 = head.logits(float_embeddings).argmax(axis=1)
    quantized_top1 = head.logits(quantized_embeddings).argmax(axis=1)
    numerator = np.einsum("ij,ij->i", float_embeddings, quantized_embeddings)
    denominator = np.linalg.norm(float_embeddings, axis=1) * np.linalg.norm(quantized_embeddings, axis=1)
    cosine = float(np.mean(numerator / np.maximum(denominator, 1e-12)))
    report = ParityReport(
        format=model_format,
        samples=int(len(labels)),
        float_accuracy=float(np.mean(float_top1 == labels)),
        quantized_accuracy=float(np.mean(quantized_top1 == labels)),
        top1_agreement=float(np.mean(float_top1 == quantized_top1)),
        embedding_cosine=cosine,
        float_size=len(float_content),
        quantized_size=len(quantized_content),
    )
    logger.info("parity %s: %s", model_format, report.to_dict())
    return report
