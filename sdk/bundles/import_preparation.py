"""Cutting a model file for import: which kind it is, its backbone files and the original's scores.

Owns recognising .tflite/.onnx/.keras files, cutting each kind into backbone + linear head
(through :mod:`edgeadapt.converters`), the ONNX conversion of TFLite backbones, and
:class:`PreparedImport`, what :func:`edgeadapt.bundles.importing.import_classifier` verifies and writes.
Headless extractors are prepared by :mod:`edgeadapt.bundles.import_headless`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from edgeadapt.converters.model_info import ExportedModel
from edgeadapt.converters.tflite_import import ImportedClassifier
from edgeadapt.device.errors import ConversionError, IncompatibleModelError

if TYPE_CHECKING:  # pragma: no cover
    from edgeadapt.bundles.importing import ImportSettings

logger = logging.getLogger("edgeadapt.bundles.importing")

MODEL_SUFFIXES = (".tflite", ".onnx", ".keras", ".h5")


def prepare_import(model_path: Path, kind: str, settings: ImportSettings, class_names: Sequence[str],
                   headless: bool) -> PreparedImport:
    """Cut the model at ``model_path`` (of ``kind``, see :func:`model_kind`) for import.

    Args:
        model_path: The model file.
        kind: "tflite", "onnx" or "keras".
        settings: The import settings.
        class_names: The class names (unique), for Keras calibration images; empty when headless.
        headless: Whether the model is an embedding extractor (no labels).

    Returns:
        The backbone files per format, the head and the original model's scores.

    Raises:
        IncompatibleModelError: A model edgeadapt cannot cut.
    """
    if headless:
        from edgeadapt.bundles.import_headless import prepare_headless

        return prepare_headless(model_path, kind, settings)
    if kind == "keras":
        return _prepare_keras(model_path, settings, class_names)
    if kind == "tflite":
        return _prepare_tflite(model_path, settings)
    return _prepare_onnx(model_path, settings)


def model_kind(path: Path) -> str:
    """The kind of model file at ``path``: "tflite", "onnx" or "keras" (by suffix, else by TFLite magic).

    Args:
        path: the model file.

    Returns:
        "tflite", "onnx" or "keras".

    Raises:
        IncompatibleModelError: an unknown model type.
    """
    suffix = path.suffix.lower()
    if suffix == ".tflite":
        return "tflite"
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".keras", ".h5"):
        return "keras"
    head = path.read_bytes()[:8]
    if head[4:8] == b"TFL3":
        return "tflite"
    raise IncompatibleModelError(
        f"{path.name}: unknown model type; edgeadapt imports {', '.join(MODEL_SUFFIXES)} classifiers"
    )


@dataclass
class PreparedImport:
    """A model cut for import: the classifier parts, its backbone files per format, the original's scores.

    ``exact``: the backbone is a cut of the original file (its outputs must match exactly).
    """

    imported: ImportedClassifier
    backbones: dict[str, ExportedModel]
    reference_scores: Any  # callable images -> (N, C)
    exact: bool


def tflite_backbones(imported: Any, settings: ImportSettings) -> dict[str, Any]:
    """The TFLite backbone of an import and, with ``settings.onnx``, its ONNX conversion (skipped with a
    warning, recorded in ``imported.details``, when tf2onnx cannot convert it)."""
    backbones = {"tflite": imported.backbone}
    if settings.onnx:
        from edgeadapt.converters.tflite_to_onnx import tflite_to_onnx

        try:
            backbones["onnx"] = tflite_to_onnx(imported.backbone.content, opset=settings.onnx_opset)
        except ConversionError as error:
            logger.warning("no ONNX backbone: %s", error)
            imported.details["onnx_conversion_error"] = str(error)
    return backbones


def _prepare_tflite(path: Path, settings: ImportSettings) -> PreparedImport:
    from edgeadapt.converters.tflite_import import import_tflite_classifier, tflite_scores

    content = path.read_bytes()
    imported = import_tflite_classifier(content, settings.model)
    backbones = tflite_backbones(imported, settings)
    return PreparedImport(imported, backbones, lambda images: tflite_scores(content, images, imported.input_spec), True)


def _prepare_onnx(path: Path, settings: ImportSettings) -> PreparedImport:
    from edgeadapt.converters.onnx_import import import_onnx_classifier, onnx_scores

    content = path.read_bytes()
    imported = import_onnx_classifier(content, settings.model)
    return PreparedImport(imported, {"onnx": imported.backbone},
                     lambda images: onnx_scores(content, images, imported.input_spec, settings.model), True)


def _prepare_keras(path: Path, settings: ImportSettings, class_names: Sequence[str]) -> PreparedImport:
    from edgeadapt.converters.keras_import import export_keras_backbone, keras_input_spec, keras_scores
    from edgeadapt.bundles.import_inputs import load_class_images
    from edgeadapt.training.model_split import load_keras_model, split_classifier

    model = load_keras_model(path)
    split = split_classifier(model)
    if split.head is None:
        raise IncompatibleModelError(f"{path.name} has no linear classifier head to import")
    spec, source = keras_input_spec(model, settings.model)
    calibration = None
    if settings.data is not None:
        calibration, _ = load_class_images(settings.data, class_names, spec)
    formats = ("tflite", "onnx") if settings.onnx else ("tflite",)
    backbones = export_keras_backbone(split.backbone, spec, calibration, formats, settings.calibration_samples)
    primary = backbones["tflite"]
    dense_activation = _output_activation(model)
    imported = ImportedClassifier(
        source_format="keras", backbone=primary, head=split.head, input_spec=spec,
        head_operator=f"Dense before {split.embedding_layer!r} ({split.head.embedding_size} -> {split.head.num_classes})",
        tail=["Softmax"] if dense_activation == "softmax" else [], output_kind="probabilities" if dense_activation == "softmax" else "logits",
        normalization_source=source,
        details={"embedding_layer": split.embedding_layer, "quantization": primary.quantization},
    )
    return PreparedImport(imported, backbones, lambda images: keras_scores(model, images, spec),
                     primary.quantization != "int8")


def _output_activation(model: Any) -> str:
    """"softmax" when the Keras classifier ends in a softmax (Dense activation or layer), else "linear"."""
    import keras

    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.Softmax):
            return "softmax"
        if isinstance(layer, (keras.layers.Dense, keras.layers.Activation)):
            name = getattr(layer.activation, "__name__", str(layer.activation))
            if name == "softmax":
                return "softmax"
            if isinstance(layer, keras.layers.Dense):
                return "linear"
    return "linear"
