"""Import third-party classifiers (.tflite, .onnx, .keras) into bundles, verified against the original.

    from edgeadapt.bundles.importing import ImportSettings, import_classifier

    report = import_classifier("mobilenet.tflite", "labels.txt", "mobilenet.eab")
    print(report.table())

The model is cut into backbone (image -> embedding) and a float32 linear head (see
:mod:`edgeadapt.converters.tflite_import`, :mod:`edgeadapt.converters.onnx_import`, and for
Keras the trainer's :func:`edgeadapt.training.model_split.split_classifier`). A TFLite backbone is also
converted to ONNX, so the bundle runs with either device interpreter. Before anything is
written, the bundle's prediction (backbone run by the device interpreter + head) is compared
with the original model's on probe images (generated ones and any given); the import fails
with :class:`ConversionError` if the top-1 agreement of the primary format is below
``min_agreement``.

Class statistics: with ``data`` (a folder with one sub-folder of images per *existing*
class, folder names equal to labels, any number of images, even one), the per-class
embedding sums/counts and the Gram matrix of those images are stored with the head, so the
updaters can use them. Without it the bundle has no statistics, and the updaters choose a
method that needs none (:func:`edgeadapt.device.incremental.choose_method`; the import table
names it). ``background`` (any folder of ordinary, unlabelled photos) stores their embeddings
with the head (float16), so that new classes can be calibrated to claim only what is theirs.

Headless import: with ``labels=None`` the model (.tflite or .keras) must be an embedding extractor
(its output is the embedding, e.g. after a global average pooling); the bundle gets zero classes and empty
class statistics, and the device learns its first classes from a few photos each (see
docs/APPS.md, "Imported models and class statistics").
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeadapt.converters.fingerprint import file_fingerprint
from edgeadapt.converters.tflite_import import ImportedClassifier, ImportOptions
from edgeadapt.device.errors import ConversionError, InputError
from edgeadapt.device.head import ClassStats, Head
from edgeadapt.device.incremental import choose_method
from edgeadapt.device.merging import with_ridge_basis_if
from edgeadapt.device.manifest import ClassInfo, Manifest, new_manifest, utc_timestamp
from edgeadapt.bundles.import_inputs import load_class_images, read_labels, unique_labels
from edgeadapt.bundles.import_preparation import PreparedImport, model_kind, prepare_import
from edgeadapt.bundles.import_report import FormatCheck, ImportReport
from edgeadapt.bundles.import_verification import verify_backbones

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportSettings:
    """Options of :func:`import_classifier`.

    name: bundle name (default: the model file's stem).
    model: how to read the model's input (normalisation, colour order, resize, input size).
    data: folder of images of existing classes (sub-folders named like labels) for class
        statistics, and for Keras imports the int8 calibration images.
    probe_images: image files to check the import on, besides ``probes`` generated images.
    onnx: also write an ONNX backbone for TFLite imports (tf2onnx); Keras imports write both.
    min_agreement: smallest top-1 agreement with the original on the probes (primary
        format); None: 1.0 for TFLite/ONNX cuts and float Keras exports, 0.9 for int8 Keras
        exports (quantizing a float backbone changes some near-tie top-1s). Headless imports
        need the primary format's embeddings to equal the original's output.
    background: folder of ordinary, unlabelled photos (recursive) whose embeddings are stored
        with the head as the bundle's background (float16); at most ``background_limit`` of
        them, a deterministic subsample (``seed``).
    ridge_solver_state: also store the ridge method's cached solver state with the class
        statistics (files ``heads/v1/ridge_*.npy``, about 3 D^2 + 2 D x C float32 values:
        some 30 MB at 1000 classes x 1280-d). Only ``method="ridge"`` updates read it; without it
        the first ridge update on a device builds it (about 0.7-1.4 s at 1000 x 1280) and
        that update's commit stores it. Needs statistics (``data``): without them a
        warning is logged and none is written.
    """

    name: str | None = None
    model: ImportOptions = ImportOptions()
    data: Path | None = None
    probe_images: tuple[Path, ...] = ()
    probes: int = 32
    onnx: bool = True
    onnx_opset: int = 17
    min_agreement: float | None = None
    overwrite: bool = False
    calibration_samples: int = 200
    seed: int = 0
    background: Path | None = None
    background_limit: int = 1000
    ridge_solver_state: bool = False


def import_classifier(
    model_path: str | Path,
    labels: str | Path | Sequence[str] | None,
    output: str | Path,
    settings: ImportSettings = ImportSettings(),
) -> ImportReport:
    """Import a .tflite/.onnx/.keras classifier (or a headless .tflite/.keras extractor) into a bundle at ``output``.

    Args:
        model_path: the model file.
        labels: labels file or list of class names in output order; None for a headless
            extractor (a model whose output is the embedding): the bundle gets zero classes.
        output: the bundle directory to write.
        settings: see :class:`ImportSettings` (statistics ``data``, ``background`` photos, ...).

    Returns:
        The :class:`ImportReport` (what was found, written and measured).

    Raises:
        InputError: missing files, labels that do not fit the model, ``data`` with a headless model.
        DatasetError: unusable ``data`` or ``background`` folders.
        IncompatibleModelError: a model edgeadapt cannot cut (the message says what was found).
        ConversionError: the bundle does not reproduce the original model.
        Nothing is written when any error is raised.
    """
    from edgeadapt.device.bundle import write_bundle

    start = time.perf_counter()
    model_path = Path(model_path)
    output = Path(output)
    headless = labels is None
    names, kind = _check_request(model_path, output, labels, settings)
    prepared = prepare_import(model_path, kind, settings, [] if headless else unique_labels(names)[0], headless)
    imported = prepared.imported
    head, spec = imported.head, imported.input_spec
    if not headless and len(names) != head.num_classes:
        raise InputError(
            f"the labels file has {len(names)} names but the model has {head.num_classes} classes; "
            "give the labels file that belongs to this model (one name per line, in output order)"
        )
    class_names, renamed = unique_labels(names)
    if renamed:
        logger.warning("renamed %d duplicate label(s): %s", len(renamed), renamed)
    stats, references = _class_statistics(imported, class_names, settings, headless)
    # verification before writing: device interpreter + head vs the original model
    checks, report_warnings = verify_backbones(prepared, settings, headless)
    background = None
    if settings.background is not None:
        from edgeadapt.bundles.background import embed_background

        background = embed_background(settings.background, imported.backbone.content, imported.backbone.format, spec,
                                      limit=settings.background_limit, seed=settings.seed)
    fingerprint = file_fingerprint(model_path.read_bytes())
    stats = with_ridge_basis_if(settings.ridge_solver_state, head, stats)
    files, manifest = _bundle_contents(prepared, checks, class_names, stats, references, background, fingerprint,
                                       settings, model_path.stem, headless)
    manifest.data["import"] = _import_section(model_path, imported, fingerprint, renamed, stats, headless, background,
                                              settings)
    write_bundle(output, manifest, files, overwrite=settings.overwrite)
    head_size = _check_written(output, head)
    return _import_report(output, model_path, imported, spec, stats, renamed, start, checks, report_warnings,
                          background, references, headless, head_size)


def _check_request(model_path: Path, output: Path, labels: str | Path | Sequence[str] | None,
                   settings: ImportSettings) -> tuple[list[str], str]:
    """(the labels as given, the model's kind), after checking the request before any conversion work."""
    if not model_path.is_file():
        raise InputError(f"model file {str(model_path)!r} does not exist")
    if output.exists() and not settings.overwrite:
        raise InputError(f"{output} already exists; choose another --out or pass --overwrite")
    headless = labels is None
    names = [] if headless else read_labels(labels)
    kind = model_kind(model_path)
    if headless and settings.data is not None:
        raise InputError("--data gives statistics of existing classes, and a headless model (no --labels) has none; "
                         "leave --data out (the device learns the classes), or give --labels")
    if settings.background is not None:
        from edgeadapt.bundles.background import background_files

        background_files(settings.background)  # an unusable folder fails before any conversion work
    return names, kind


def _class_statistics(imported: ImportedClassifier, class_names: list[str], settings: ImportSettings,
                      headless: bool) -> tuple[ClassStats | None, Any]:
    """(class statistics, update-gate references) from images of existing classes; empty when headless."""
    from edgeadapt.converters.parity import run_exported

    head, spec = imported.head, imported.input_spec
    if settings.data is not None:
        images, labels_index = load_class_images(settings.data, class_names, spec)
        embeddings = run_exported(imported.backbone.content, imported.backbone.format, spec, images)
        stats = ClassStats.from_embeddings(embeddings, labels_index, head.num_classes, with_gram=True)
        logger.info("class statistics from %d images of %d classes", len(images), int(np.sum(stats.counts > 0)))
        return stats, _reference_embeddings(embeddings, labels_index)
    if headless:  # empty statistics: the device accumulates them for every class it learns
        return ClassStats(sums=np.zeros((0, head.embedding_size)), counts=np.zeros(0, np.int64)), None
    return None, None


def _bundle_contents(prepared: PreparedImport, checks: list[FormatCheck], class_names: list[str],
                     stats: ClassStats | None, references: Any, background: Any, fingerprint: str,
                     settings: ImportSettings, default_name: str, headless: bool) -> tuple[dict[str, Any], Manifest]:
    """The files of the imported bundle (backbones, head) and its manifest, without the ``import`` section."""
    from edgeadapt.converters.bundle_export import created_by
    from edgeadapt.device.head_section import head_payload

    imported = prepared.imported
    head = imported.head
    files: dict[str, Any] = {}
    models = []
    for check, exported in zip(checks, prepared.backbones.values()):
        files[check.file] = exported.content
        models.append({"file": check.file, **exported.describe()})
    head_section, head_files = head_payload(head, stats, version=1, backbone_fingerprint=fingerprint,
                                            reference_embeddings=references,
                                            background=None if background is None else background.embeddings)
    files.update(head_files)
    created = utc_timestamp()
    infos = [
        ClassInfo(name=name, index=index, origin="imported", added_at=created,
                  examples=int(stats.counts[index]) if stats is not None and stats.counts[index] else None)
        for index, name in enumerate(class_names)
    ]
    manifest = new_manifest(
        name=settings.name or default_name,
        input_spec=imported.input_spec,
        embedding_size=head.embedding_size,
        classes=infos,
        backbone_fingerprint=fingerprint,
        models=models,
        head=head_section,
        created_by=created_by(),
        parity=_parity_section(checks, imported.source_format, headless),
    )
    return files, manifest


def _parity_section(checks: list[FormatCheck], source_format: str, headless: bool) -> dict[str, dict]:
    """The manifest's ``parity`` entry: each format's agreement with the original model (and the primary format)."""
    return {check.format: {"reference": f"original {source_format} model", "samples": check.probes,
                           **({"embedding_cosine": round(check.embedding_cosine, 6)} if headless else {
                               "top1_agreement": check.top1_agreement,
                               "strict_top1_agreement": check.strict_top1_agreement,
                               "original_ties": check.original_ties}),
                           **({"vs_primary": check.parity_with_primary} if check.parity_with_primary else {})}
            for check in checks}


def _import_section(model_path: Path, imported: ImportedClassifier, fingerprint: str, renamed: dict[int, str],
                    stats: ClassStats | None, headless: bool, background: Any, settings: ImportSettings) -> dict:
    """The manifest's ``import`` section: where the model came from and how it was cut."""
    return {
        "source_file": model_path.name,
        "source_format": imported.source_format,
        "source_fingerprint": fingerprint,
        "head_operator": imported.head_operator,
        "tail": imported.tail,
        "output_kind": imported.output_kind,
        "normalization_source": imported.normalization_source,
        "renamed_labels": {str(key): value for key, value in renamed.items()},
        "statistics": ("empty: a headless model; the device accumulates them for the classes it learns" if headless
                       else "from images of existing classes" if stats is not None else None),
        "headless": headless,
        "background": None if background is None else {
            "folder": str(background.folder), "photos": background.count, "files_found": background.found,
            "unreadable_skipped": background.skipped, "limit": settings.background_limit, "seed": settings.seed},
        "details": json.loads(json.dumps(imported.details, default=str)),
    }


def _check_written(output: Path, head: Head) -> int:
    """Check the written bundle gives what was verified; return the bytes of its head files."""
    from edgeadapt.device.bundle import Bundle

    bundle = Bundle.open(output, trusted_keys=False)  # just written, not signed yet (edgeadapt sign)
    written_head = bundle.load_head()
    if not np.array_equal(written_head.weights, head.weights) or not np.array_equal(written_head.bias, head.bias):
        raise ConversionError("the written head differs from the imported one; the bundle is inconsistent")
    return sum(int(entry["size"]) for name, entry in bundle.manifest.files.items()
               if name.startswith("heads/") and not name.endswith("/background.npy"))  # stated on its own line


def _import_report(output: Path, model_path: Path, imported: Any, spec: Any, stats: ClassStats | None,
                   renamed: dict, start: float, checks: list[FormatCheck], report_warnings: list[str],
                   background: Any, references: Any, headless: bool, head_size: int) -> ImportReport:
    """The :class:`ImportReport` of a written bundle."""
    head = imported.head
    report = ImportReport(
        path=output, source=str(model_path), source_format=imported.source_format,
        source_size=model_path.stat().st_size, head_operator=imported.head_operator, tail=imported.tail,
        output_kind=imported.output_kind, num_classes=head.num_classes, embedding_size=head.embedding_size,
        input_spec=spec.to_dict(), normalization_source=imported.normalization_source, head_size=head_size,
        statistics_examples=int(stats.counts.sum()) if stats is not None else 0,
        statistics_classes=int(np.sum(stats.counts > 0)) if stats is not None else 0,
        renamed_labels=renamed, import_seconds=time.perf_counter() - start, formats=checks, warnings=report_warnings,
        background=None if background is None else background.describe(),
        background_count=0 if background is None else background.count,
        background_bytes=0 if background is None else background.nbytes,
        update_method=choose_method(stats, background is not None or references is not None, None),
        headless=headless,
    )
    if "onnx_conversion_error" in imported.details:
        report.warnings.append(f"no ONNX backbone: {imported.details['onnx_conversion_error']}")
    logger.info("imported %s into %s", model_path.name, output)
    return report


def _reference_embeddings(embeddings: np.ndarray, labels: np.ndarray, per_class: int = 5) -> Any:
    """A few embeddings per class for the device update gate, when this edgeadapt's bundle format has them."""
    try:
        from edgeadapt.device.reference_embeddings import ReferenceEmbeddings
    except ImportError:
        return None
    return ReferenceEmbeddings.select(embeddings, labels, per_class=per_class, seed=0)


