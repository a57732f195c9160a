"""Headless import: a .tflite embedding extractor becomes a bundle with zero classes (used by :mod:`edgeadapt.bundles.import_preparation`).

The model's output is the embedding (see :mod:`edgeadapt.converters.tflite_extractor`); the
import is verified by comparing the bundle's embeddings with the original model's output on
probe images instead of top-1 agreement.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgeadapt.converters.model_info import ExportedModel
from edgeadapt.device.errors import ConversionError, IncompatibleModelError
from edgeadapt.bundles.import_preparation import PreparedImport, tflite_backbones
from edgeadapt.bundles.import_report import FormatCheck

if TYPE_CHECKING:  # pragma: no cover
    from edgeadapt.bundles.importing import ImportSettings

logger = logging.getLogger(__name__)


#: Smallest mean cosine between the bundle's embeddings and the original output for re-exported
#: (not cut) extractors: float32 and int8 exports of a Keras model.
MIN_COSINE = {"float32": 0.9999, "int8": 0.98}


def prepare_headless(path: Path, kind: str, settings: ImportSettings) -> PreparedImport:
    """A headless extractor: the model's output is the embedding; the head has zero classes.

    Args:
        path: the model file; kind: "tflite", "keras" or "onnx" (refused).
        settings: the import settings (model input options, ONNX backbone, background photos).

    Returns:
        The prepared import (backbone files, zero-class head, the original model's outputs).

    Raises:
        IncompatibleModelError: an ONNX extractor, or a model whose output is not an embedding.
    """
    if kind == "keras":
        return _prepare_keras_extractor(path, settings)
    if kind != "tflite":
        raise IncompatibleModelError(
            f"{path.name}: headless import (no --labels) supports .tflite and .keras feature extractors; convert "
            f"the {kind} extractor to TFLite first, or import a classifier with --labels"
        )
    from edgeadapt.converters.tflite_extractor import import_tflite_extractor
    from edgeadapt.converters.tflite_import import tflite_scores

    content = path.read_bytes()
    imported = import_tflite_extractor(content, settings.model)
    backbones = tflite_backbones(imported, settings)
    return PreparedImport(imported, backbones, lambda images: tflite_scores(content, images, imported.input_spec), True)


def _prepare_keras_extractor(path: Path, settings: ImportSettings) -> PreparedImport:
    """A Keras model whose output is the embedding, exported whole (int8 when background photos calibrate it)."""
    import keras

    from edgeadapt.converters.keras_import import export_keras_backbone, keras_input_spec, keras_scores
    from edgeadapt.converters.tflite_extractor import empty_head
    from edgeadapt.converters.tflite_import import ImportedClassifier
    from edgeadapt.training.model_split import load_keras_model

    model = load_keras_model(path)
    if len(model.outputs) != 1:
        raise IncompatibleModelError(f"{path.name} has {len(model.outputs)} outputs; a feature extractor has one")
    shape = tuple(model.outputs[0].shape)
    if len(shape) != 2 or not shape[1]:
        raise IncompatibleModelError(
            f"{path.name}'s output has shape {shape}, not (batch, D): end the extractor in a global average pooling "
            "(or flatten), or import a classifier with --labels"
        )
    last = model.layers[-1]
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    if isinstance(last, keras.layers.Softmax) or activation in ("softmax", "sigmoid"):
        raise IncompatibleModelError(
            f"{path.name} ends in {activation or 'Softmax'}: its output is class scores, not an embedding. Import it "
            "as a classifier with --labels LABELS.txt, or give the feature extractor without its classifier"
        )
    spec, source = keras_input_spec(model, settings.model)
    calibration = None
    if settings.background is not None:
        from edgeadapt.bundles.background import load_background_images

        calibration = load_background_images(settings.background, spec, settings.calibration_samples, settings.seed)
    formats = ("tflite", "onnx") if settings.onnx else ("tflite",)
    backbones = export_keras_backbone(model, spec, calibration, formats, settings.calibration_samples)
    primary = backbones["tflite"]
    size = int(shape[1])
    imported = ImportedClassifier(
        source_format="keras", backbone=primary, head=empty_head(size), input_spec=spec,
        head_operator=f"none: headless, the output of {last.name!r} is the {size}-d embedding", tail=[],
        output_kind="embedding", normalization_source=source,
        details={"headless": True, "quantization": primary.quantization,
                 "calibration": "background photos" if calibration is not None else None},
    )
    return PreparedImport(imported, backbones, lambda images: keras_scores(model, images, spec), False)


def _cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    numerator = np.einsum("ij,ij->i", reference.astype(np.float64), candidate.astype(np.float64))
    denominator = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    same = (denominator == 0) & np.all(reference == candidate, axis=1)  # two zero vectors agree
    return float(np.mean(np.where(same, 1.0, numerator / np.maximum(denominator, 1e-12))))


def check_headless(model_format: str, exported: ExportedModel, original: np.ndarray, embeddings: np.ndarray,
                   by_format: dict[str, np.ndarray], primary_format: str, probes: int,
                   report_warnings: list[str], exact: bool = True) -> FormatCheck:
    """A headless format's embeddings against the original model's output.

    The primary format must equal the original output when it is a cut of the original file
    (``exact``), else reach :data:`MIN_COSINE` for its quantization; :class:`ConversionError` otherwise.
    """
    cosine = _cosine(original, embeddings)
    file_name = f"backbone.{exported.quantization}.{model_format}"
    check = FormatCheck(model_format, file_name, exported.size, exported.quantization, float("nan"), float("nan"),
                        0, probes, embedding_cosine=cosine)
    if model_format == primary_format:
        scale = max(float(np.abs(original).max()), 1.0)
        agrees = (np.allclose(embeddings, original, rtol=1e-5, atol=1e-5 * scale) if exact
                  else cosine >= MIN_COSINE.get(exported.quantization, MIN_COSINE["int8"]))
        if not agrees:
            raise ConversionError(
                f"the imported {model_format} extractor's embeddings differ from the original model's output (cosine "
                f"{cosine:.6f}, max difference {float(np.max(np.abs(embeddings - original))):.3g}); report this model"
            )
    else:
        reference = by_format[primary_format]
        check.parity_with_primary = {
            "reference": f"{primary_format} backbone",
            "embedding_cosine": round(_cosine(reference, embeddings), 6),
            "embedding_max_abs_difference": round(float(np.max(np.abs(reference - embeddings))), 6),
        }
        if cosine < 0.99:
            message = f"{model_format} backbone's embeddings have cosine {cosine:.4f} with the original's only"
            logger.warning(message)
            report_warnings.append(message)
    return check
