"""Export a backbone + head as a bundle: int8 TFLite and/or int8 ONNX, manifest, parity."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from edgeadapt.converters.fingerprint import backbone_fingerprint as fingerprint_backbone
from edgeadapt.converters.calibration import select_calibration_images
from edgeadapt.converters.model_info import ExportedModel
from edgeadapt.converters.parity import ParityReport, measure_parity
from edgeadapt.device.bundle import write_bundle
from edgeadapt.device.head_section import head_payload
from edgeadapt.device.reference_embeddings import ReferenceEmbeddings
from edgeadapt.device.errors import InputError
from edgeadapt.device.head import ClassStats, Head
from edgeadapt.device.merging import with_ridge_basis_if
from edgeadapt.device.manifest import ClassInfo, InputSpec, new_manifest, utc_timestamp

if TYPE_CHECKING:  # pragma: no cover
    import keras

logger = logging.getLogger(__name__)
FORMATS = ("tflite", "onnx")


@dataclass(frozen=True)
class BundleExportOptions:
    """What :func:`export_bundle` writes.

    ``quantize`` writes full-integer int8 backbones (float32 otherwise); ``tflite_input_type``
    is the int8 TFLite input tensor type ("int8" or "uint8").

    ``ridge_solver_state`` also stores the ridge method's cached solver state with the class
    statistics (files ``heads/v1/ridge_*.npy``: two D x D inverses, the D x D second moment,
    the D x C old solution and projection, about 3 D^2 + 2 D x C float32 values: some 30 MB of
    a 72 MB bundle at 1000 classes x 1280-d). Only ``method="ridge"`` updates read it; without
    it the first ridge update on a device builds it (about 0.7-1.4 s at 1000 x 1280) and that
    update's commit stores it. Needs ``class_stats`` with a Gram matrix (else a warning is
    logged and none is written).
    """

    formats: tuple[str, ...] = FORMATS
    quantize: bool = True
    tflite_input_type: str = "int8"
    calibration_samples: int = 200
    name: str = "model"
    overwrite: bool = False
    measure_parity: bool = True
    ridge_solver_state: bool = False


@dataclass
class BundleExport:
    """Result of an export: where the bundle is and what was measured."""

    path: Path
    parity: dict[str, ParityReport] = field(default_factory=dict)
    float_sizes: dict[str, int] = field(default_factory=dict)
    quantized_sizes: dict[str, int] = field(default_factory=dict)


def created_by() -> dict[str, str]:
    """Versions of the tools that produced a bundle."""
    from importlib import metadata

    versions = {}
    for package in ("edgeadapt", "tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _export_format(model_format: str, backbone, spec: InputSpec, calibration: np.ndarray, options: BundleExportOptions, quantize: bool) -> ExportedModel:
    if model_format == "tflite":
        from edgeadapt.converters.tflite_export import TFLiteExportOptions, export_tflite

        return export_tflite(
            backbone, spec, calibration,
            TFLiteExportOptions(quantize=quantize, input_type=options.tflite_input_type if quantize else "float32",
                                calibration_samples=options.calibration_samples),
        )
    if model_format == "onnx":
        from edgeadapt.converters.onnx_export import OnnxExportOptions, export_onnx

        return export_onnx(backbone, spec, calibration,
                           OnnxExportOptions(quantize=quantize, calibration_samples=options.calibration_samples))
    raise InputError(f"unknown export format {model_format!r}; choose from {FORMATS}")


def export_bundle(
    output: str | Path,
    *,
    backbone: "keras.Model",
    head: Head,
    input_spec: InputSpec,
    class_names: Sequence[str],
    calibration_images: np.ndarray,
    calibration_labels: np.ndarray | None = None,
    evaluation_images: np.ndarray | None = None,
    evaluation_labels: np.ndarray | None = None,
    class_stats: ClassStats | None = None,
    backbone_fingerprint: str | None = None,
    class_infos: Sequence[ClassInfo] | None = None,
    reference_embeddings: ReferenceEmbeddings | None = None,
    options: BundleExportOptions = BundleExportOptions(),
) -> BundleExport:
    """Convert ``backbone`` to each format, measure parity on the evaluation split, write the bundle.

    Calibration uses real training images (``calibration_images``, uint8). Parity compares
    the float and the quantized file of each format, both run by the device interpreters,
    on ``evaluation_images`` with the same head. ``reference_embeddings`` (a few per class,
    see :meth:`ReferenceEmbeddings.select`) let the device's update gate check old classes.

    Args:
        output: The bundle directory to write (``NAME.eab``).
        backbone: The Keras backbone (image -> embedding).
        head: The linear head over the backbone's embeddings.
        input_spec: Input size, channels, colour order and pixel normalisation.
        class_names: One name per head column.
        calibration_images: Real uint8 training images for int8 calibration.
        calibration_labels: Their labels (balances the calibration sample per class).
        evaluation_images: uint8 images for the float-vs-int8 parity check.
        evaluation_labels: Their labels.
        class_stats: Per-class embedding sums/counts (needed for later class additions).
        backbone_fingerprint: The backbone's fingerprint (computed when None).
        class_infos: Provenance of each class (default: trained on the host).
        reference_embeddings: A few embeddings per class for the device's update gate.
        options: Formats, quantization, bundle name, ``overwrite``, ``ridge_solver_state``.

    Returns:
        The bundle path, the exported models and the parity measured for each format.

    Raises:
        InputError: When the arguments disagree (names vs head columns, image shapes).
        ConversionError: When a format cannot be converted or quantized.
        BundleError: When ``output`` exists and ``options.overwrite`` is not set.
    """
    _check_arguments(backbone, head, class_names, options)
    fingerprint = backbone_fingerprint or fingerprint_backbone(backbone)
    calibration = select_calibration_images(
        calibration_images, calibration_labels, count=options.calibration_samples, seed=0
    )
    result = BundleExport(path=Path(output))
    files, models = _export_backbones(result, backbone, head, input_spec, calibration, evaluation_images,
                                      evaluation_labels, options)
    class_stats = with_ridge_basis_if(options.ridge_solver_state, head, class_stats)
    head_section, head_files = head_payload(head, class_stats, version=1, backbone_fingerprint=fingerprint,
                                            reference_embeddings=reference_embeddings)
    files.update(head_files)
    infos = list(class_infos) if class_infos is not None else [
        ClassInfo(name=name, index=index, origin="base", added_at=utc_timestamp(),
                  examples=int(class_stats.counts[index]) if class_stats is not None else None)
        for index, name in enumerate(class_names)
    ]
    manifest = new_manifest(
        name=options.name,
        input_spec=input_spec,
        embedding_size=head.embedding_size,
        classes=infos,
        backbone_fingerprint=fingerprint,
        models=models,
        head=head_section,
        created_by=created_by(),
        parity={name: report.to_dict() for name, report in result.parity.items()},
    )
    write_bundle(output, manifest, files, overwrite=options.overwrite)
    return result


def _check_arguments(backbone: "keras.Model", head: Head, class_names: Sequence[str],
                     options: BundleExportOptions) -> None:
    """Refuse names that do not match the head, a head that does not fit the backbone, unknown formats."""
    if len(set(class_names)) != len(class_names):
        raise InputError(f"duplicate class names in {list(class_names)}")
    if len(class_names) != head.num_classes:
        raise InputError(f"{len(class_names)} class names for a head with {head.num_classes} classes")
    if head.embedding_size != int(backbone.output.shape[-1]):
        raise InputError(
            f"head expects {head.embedding_size}-d embeddings, backbone gives {int(backbone.output.shape[-1])}"
        )
    for model_format in options.formats:
        if model_format not in FORMATS:
            raise InputError(f"unknown export format {model_format!r}; choose from {FORMATS}")


def _export_backbones(result: BundleExport, backbone: "keras.Model", head: Head, spec: InputSpec,
                      calibration: np.ndarray, evaluation_images: np.ndarray | None,
                      evaluation_labels: np.ndarray | None,
                      options: BundleExportOptions) -> tuple[dict[str, bytes | np.ndarray], list[dict]]:
    """Convert the backbone to each format: (bundle files, manifest model entries).

    Records sizes and, for int8 exports with evaluation images, the float-vs-int8 parity in ``result``.
    """
    files: dict[str, bytes | np.ndarray] = {}
    models = []
    mode = "int8" if options.quantize else "float32"
    for model_format in options.formats:
        logger.info("exporting %s backbone (%s)", model_format, mode)
        exported = _export_format(model_format, backbone, spec, calibration, options, options.quantize)
        file_name = f"backbone.{mode}.{model_format}"
        files[file_name] = exported.content
        models.append({"file": file_name, **exported.describe()})
        result.quantized_sizes[model_format] = len(exported.content)
        if options.quantize and options.measure_parity and evaluation_images is not None:
            float_model = _export_format(model_format, backbone, spec, calibration, options, quantize=False)
            result.float_sizes[model_format] = len(float_model.content)
            result.parity[model_format] = measure_parity(
                model_format, float_model.content, exported.content, spec, head,
                evaluation_images, np.asarray(evaluation_labels),
            )
    return files, models
