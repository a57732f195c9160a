"""Import a Keras classifier (``.keras``): the converter half.

The split into backbone + linear head is done by the trainer's
:func:`edgeadapt.training.model_split.split_classifier` (called by :mod:`edgeadapt.bundles.importing`, so this
module never imports the ``edgeadapt`` host package at import time). Here:

- :func:`keras_input_spec`: the InputSpec of a Keras classifier (its input size; a leading
  ``Rescaling`` layer means the model takes raw pixels 0..255);
- :func:`export_keras_backbone`: the backbone as TFLite and/or ONNX, int8 when calibration
  images are given, float32 otherwise (through the project's own exporters);
- :func:`keras_scores`: the original model's class scores on prepared uint8 images, the
  reference that the imported bundle is checked against.

TensorFlow/Keras are imported lazily.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from edgeadapt.converters.model_info import ExportedModel
from edgeadapt.converters.tflite_import import ImportOptions, input_spec_from_quantization
from edgeadapt.device.errors import ConversionError, IncompatibleModelError
from edgeadapt.device.manifest import InputSpec
from edgeadapt.device.preprocessing import pixel_table

if TYPE_CHECKING:  # pragma: no cover
    import keras

logger = logging.getLogger(__name__)


def _leading_rescaling(model: "keras.Model") -> tuple[float, float] | None:
    """(scale, offset) of a Rescaling layer that directly follows the input, if any."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.layers.Rescaling):
            scale = np.asarray(layer.scale, dtype=np.float64)
            offset = np.asarray(layer.offset, dtype=np.float64)
            if scale.size == 1 and offset.size == 1:
                return float(scale), float(offset)
        return None
    return None


def keras_input_spec(model: "keras.Model", options: ImportOptions = ImportOptions()) -> tuple[InputSpec, str]:
    """The InputSpec of a Keras image classifier, and where its normalisation came from."""
    shape = model.input_shape
    if isinstance(shape, list):
        if len(shape) != 1:
            raise IncompatibleModelError(f"the Keras model has {len(shape)} inputs; an image classifier takes one")
        shape = shape[0]
    shape = tuple(shape)
    if len(shape) != 4 or shape[3] not in (1, 3):
        raise IncompatibleModelError(
            f"the Keras model input has shape {shape}; edgeadapt imports classifiers of (batch, H, W, 1 or 3) images"
        )
    height, width = shape[1], shape[2]
    if height is None or width is None:
        if options.input_size is None:
            raise IncompatibleModelError(
                f"the Keras model input size is dynamic {shape}; give input_size=(H, W) (CLI --input-size HxW)"
            )
        height, width = options.input_size
    if options.normalization_given:
        return input_spec_from_quantization(int(height), int(width), int(shape[3]), "float32", 0.0, 0, options)
    rescaling = _leading_rescaling(model)
    if rescaling is not None:
        color = "GRAY" if shape[3] == 1 else options.color_order
        spec = InputSpec(height=int(height), width=int(width), channels=int(shape[3]), color_order=color,
                         resize=options.resize, resample=options.resample, scale=1.0, offset=0.0)
        return spec, f"raw pixels (the model starts with Rescaling(scale={rescaling[0]:g}, offset={rescaling[1]:g}))"
    return input_spec_from_quantization(int(height), int(width), int(shape[3]), "float32", 0.0, 0, options)


def export_keras_backbone(
    backbone: "keras.Model",
    spec: InputSpec,
    calibration_images: np.ndarray | None,
    formats: Sequence[str] = ("tflite", "onnx"),
    calibration_samples: int = 200,
) -> dict[str, ExportedModel]:
    """Export ``backbone`` in each format: int8 with calibration images, float32 without."""
    quantize = calibration_images is not None and len(calibration_images) > 0
    if not quantize:
        logger.warning("no calibration images (--data): exporting float32 backbones; give --data for int8")
    results: dict[str, ExportedModel] = {}
    for model_format in formats:
        if model_format == "tflite":
            from edgeadapt.converters.tflite_export import TFLiteExportOptions, export_tflite

            results[model_format] = export_tflite(
                backbone, spec, calibration_images if quantize else None,
                TFLiteExportOptions(quantize=quantize, input_type="int8" if quantize else "float32",
                                    calibration_samples=calibration_samples),
            )
        elif model_format == "onnx":
            from edgeadapt.converters.onnx_export import OnnxExportOptions, export_onnx

            results[model_format] = export_onnx(
                backbone, spec, calibration_images if quantize else None,
                OnnxExportOptions(quantize=quantize, calibration_samples=calibration_samples),
            )
        else:
            raise ConversionError(f"unknown backbone format {model_format!r}")
    return results


def keras_scores(model: "keras.Model", images: np.ndarray, spec: InputSpec, batch_size: int = 64) -> np.ndarray:
    """The original Keras model's outputs (N, C) on prepared uint8 images."""
    table = pixel_table(spec)
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = table[images[start : start + batch_size]]
        result: Any = model(batch, training=False)
        outputs.append(np.asarray(result, dtype=np.float32).reshape(len(batch), -1))
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)
