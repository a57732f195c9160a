"""Import third-party classifiers (.tflite, .onnx, .keras) into bundles, verified against the original.

    from edgeadapt.importing import ImportSettings, import_classifier

    report = import_classifier("mobilenet.tflite", "labels.txt", "mobilenet.eab")
    print(report.table())

The model is cut into backbone (image -> embedding) and a float32 linear head (see
:mod:`edgeadapt.converters.tflite_import`, :mod:`edgeadapt.converters.onnx_import`, and for
Keras the trainer's :func:`edgeadapt.model_split.split_classifier`). A TFLite backbone is also
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
from edgeadapt.converters.model_info import ExportedModel
from edgeadapt.converters.tflite_import import ImportedClassifier, ImportOptions
from edgeadapt.device.errors import ConversionError, DatasetError, IncompatibleModelError, InputError
from edgeadapt.device.head import ClassStats, Head, softmax
from edgeadapt.device.incremental import choose_method, with_ridge_basis
from edgeadapt.device.manifest import ClassInfo, InputSpec, new_manifest, utc_timestamp
from edgeadapt.device.preprocessing import IMAGE_SUFFIXES, list_class_folders, list_image_files, prepare_batch, prepare_image
from edgeadapt.import_report import FormatCheck, ImportReport  # noqa: F401  (public names of this module)

logger = logging.getLogger(__name__)

MODEL_SUFFIXES = (".tflite", ".onnx", ".keras", ".h5")
#: Relative tolerance under which two original scores count as a tie (quantized outputs tie often).
TIE_TOLERANCE = 1e-6


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


# ----------------------------------------------------------------------------- labels and data
def read_labels(source: str | Path | Sequence[str]) -> list[str]:
    """Class names from a labels file (one per line; trailing blank lines ignored) or a list."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"labels file {str(path)!r} does not exist")
        names = path.read_text(encoding="utf-8").splitlines()
        while names and not names[-1].strip():
            names.pop()
    else:
        names = list(source)
    names = [name.strip() for name in names]
    if not names:
        raise InputError("the labels file is empty; give one class name per line")
    blank = [index for index, name in enumerate(names) if not name]
    if blank:
        raise InputError(f"the labels file has blank lines at {blank[:5]} (0-based); every class needs a name")
    return names


def unique_labels(names: Sequence[str]) -> tuple[list[str], dict[int, str]]:
    """Make duplicate names unique ("crane", "crane (2)"); returns the names and the renamed indices."""
    seen: dict[str, int] = {}
    result, renamed = [], {}
    taken = set(names)
    for index, name in enumerate(names):
        if name in seen:
            count = seen[name] + 1
            candidate = f"{name} ({count})"
            while candidate in taken:
                count += 1
                candidate = f"{name} ({count})"
            seen[name] = count
            taken.add(candidate)
            renamed[index] = candidate
            result.append(candidate)
        else:
            seen[name] = 1
            result.append(name)
    return result, renamed


def load_class_images(root: str | Path, class_names: Sequence[str], spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    """Images of ``root/<class name>/*`` prepared for ``spec`` and their label indices in ``class_names``.

    Every sub-folder must be named like one of the classes; any number of images (>= 1) per folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder {str(root)!r} does not exist or is not a folder")
    index = {name: position for position, name in enumerate(class_names)}
    folders = list_class_folders(root)
    if not folders:
        raise DatasetError(f"data folder {str(root)!r} has no class sub-folders (root/<label>/*.jpg)")
    unknown = [folder.name for folder in folders if folder.name not in index]
    if unknown:
        raise DatasetError(
            f"data sub-folders {unknown[:5]} are not class names of the model; folder names must equal labels "
            "exactly (e.g. 'tiger cat')"
        )
    images, labels = [], []
    for folder in folders:
        files = list_image_files(folder)
        if not files:
            raise DatasetError(f"class folder {str(folder)!r} has no images ({'/'.join(IMAGE_SUFFIXES)})")
        for path in files:
            images.append(prepare_image(path, spec))
            labels.append(index[folder.name])
    return np.stack(images), np.asarray(labels, np.int64)


# ----------------------------------------------------------------------------- checks
def top1_agreement(original: np.ndarray, candidate_top1: np.ndarray) -> tuple[float, float, int]:
    """(tie-aware agreement, strict agreement, number of probes whose original top score is tied).

    Tie-aware: the candidate's top-1 is one of the classes sharing the original's top score
    (quantized outputs often tie; the original's own pick among ties is its lowest index).
    """
    if len(original) == 0:
        return 1.0, 1.0, 0
    best = original.max(axis=1, keepdims=True)
    tied = original >= best - TIE_TOLERANCE * np.maximum(np.abs(best), 1.0)
    ties = int(np.sum(tied.sum(axis=1) > 1))
    aware = float(np.mean(tied[np.arange(len(original)), candidate_top1]))
    strict = float(np.mean(original.argmax(axis=1) == candidate_top1))
    return aware, strict, ties


def _probe_images(spec: InputSpec, settings: ImportSettings) -> np.ndarray:
    from edgeadapt.converters.fused_export import probe_image_batch

    generated = probe_image_batch(spec, settings.probes, seed=settings.seed)
    if not settings.probe_images:
        return generated
    given = prepare_batch([str(path) for path in settings.probe_images], spec)
    return np.concatenate([given, generated])


def _model_kind(path: Path) -> str:
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


# ----------------------------------------------------------------------------- import
@dataclass
class _Prepared:
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


def _prepare_tflite(path: Path, settings: ImportSettings) -> _Prepared:
    from edgeadapt.converters.tflite_import import import_tflite_classifier, tflite_scores

    content = path.read_bytes()
    imported = import_tflite_classifier(content, settings.model)
    backbones = tflite_backbones(imported, settings)
    return _Prepared(imported, backbones, lambda images: tflite_scores(content, images, imported.input_spec), True)


def _prepare_onnx(path: Path, settings: ImportSettings) -> _Prepared:
    from edgeadapt.converters.onnx_import import import_onnx_classifier, onnx_scores

    content = path.read_bytes()
    imported = import_onnx_classifier(content, settings.model)
    return _Prepared(imported, {"onnx": imported.backbone},
                     lambda images: onnx_scores(content, images, imported.input_spec, settings.model), True)


def _prepare_keras(path: Path, settings: ImportSettings, class_names: Sequence[str]) -> _Prepared:
    from edgeadapt.converters.keras_import import export_keras_backbone, keras_input_spec, keras_scores
    from edgeadapt.model_split import load_keras_model, split_classifier

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
    return _Prepared(imported, backbones, lambda images: keras_scores(model, images, spec),
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
    from edgeadapt.converters.bundle_export import created_by
    from edgeadapt.converters.parity import run_exported
    from edgeadapt.device.bundle import Bundle, write_bundle
    from edgeadapt.device.head_section import head_payload

    start = time.perf_counter()
    model_path = Path(model_path)
    output = Path(output)
    if not model_path.is_file():
        raise InputError(f"model file {str(model_path)!r} does not exist")
    if output.exists() and not settings.overwrite:
        raise InputError(f"{output} already exists; choose another --out or pass --overwrite")
    headless = labels is None
    names = [] if headless else read_labels(labels)
    kind = _model_kind(model_path)
    if headless and settings.data is not None:
        raise InputError("--data gives statistics of existing classes, and a headless model (no --labels) has none; "
                         "leave --data out (the device learns the classes), or give --labels")
    if settings.background is not None:
        from edgeadapt.background import background_files

        background_files(settings.background)  # an unusable folder fails before any conversion work
    if headless:
        from edgeadapt.import_headless import prepare_headless

        prepared = prepare_headless(model_path, kind, settings)
    elif kind == "keras":
        prepared = _prepare_keras(model_path, settings, unique_labels(names)[0])
    elif kind == "tflite":
        prepared = _prepare_tflite(model_path, settings)
    else:
        prepared = _prepare_onnx(model_path, settings)
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

    # statistics from images of existing classes
    stats = None
    references = None
    if settings.data is not None:
        images, labels_index = load_class_images(settings.data, class_names, spec)
        embeddings = run_exported(imported.backbone.content, imported.backbone.format, spec, images)
        stats = ClassStats.from_embeddings(embeddings, labels_index, head.num_classes, with_gram=True)
        references = _reference_embeddings(embeddings, labels_index)
        logger.info("class statistics from %d images of %d classes", len(images), int(np.sum(stats.counts > 0)))
    elif headless:  # empty statistics: the device accumulates them for every class it learns
        stats = ClassStats(sums=np.zeros((0, head.embedding_size)), counts=np.zeros(0, np.int64))

    # verification before writing: device interpreter + head vs the original model
    checks, report_warnings = _verify_backbones(prepared, settings, headless)

    background = None
    if settings.background is not None:
        from edgeadapt.background import embed_background

        background = embed_background(settings.background, imported.backbone.content, imported.backbone.format, spec,
                                      limit=settings.background_limit, seed=settings.seed)

    # write the bundle
    fingerprint = file_fingerprint(model_path.read_bytes())
    files: dict[str, Any] = {}
    models = []
    for check, exported in zip(checks, prepared.backbones.values()):
        files[check.file] = exported.content
        models.append({"file": check.file, **exported.describe()})
    stats = with_ridge_basis(head, stats)  # lets the device add classes to large heads fast
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
        name=settings.name or model_path.stem,
        input_spec=spec,
        embedding_size=head.embedding_size,
        classes=infos,
        backbone_fingerprint=fingerprint,
        models=models,
        head=head_section,
        created_by=created_by(),
        parity={check.format: {"reference": f"original {imported.source_format} model", "samples": check.probes,
                               **({"embedding_cosine": round(check.embedding_cosine, 6)} if headless else {
                                   "top1_agreement": check.top1_agreement,
                                   "strict_top1_agreement": check.strict_top1_agreement,
                                   "original_ties": check.original_ties}),
                               **({"vs_primary": check.parity_with_primary} if check.parity_with_primary else {})}
                for check in checks},
    )
    manifest.data["import"] = {
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
    write_bundle(output, manifest, files, overwrite=settings.overwrite)

    # the written bundle must give what was verified
    bundle = Bundle.open(output, trusted_keys=False)  # just written, not signed yet (edgeadapt sign)
    written_head = bundle.load_head()
    if not np.array_equal(written_head.weights, head.weights) or not np.array_equal(written_head.bias, head.bias):
        raise ConversionError("the written head differs from the imported one; the bundle is inconsistent")
    head_size = sum(int(entry["size"]) for name, entry in bundle.manifest.files.items()
                    if name.startswith("heads/") and not name.endswith("/background.npy"))  # stated on its own line
    report = _import_report(output, model_path, imported, spec, stats, renamed, start, checks, report_warnings,
                            background, references, headless, head_size)
    return report


def _verify_backbones(prepared: Any, settings: ImportSettings, headless: bool) -> tuple[list[FormatCheck], list[str]]:
    """Run every exported backbone on probe images and compare with the original model.

    Returns:
        One :class:`FormatCheck` per backbone format, and warnings for the report.

    Raises:
        ConversionError: The original model's scores have the wrong shape, or the primary
            backbone agrees with it on fewer probes than required.
    """
    from edgeadapt.converters.parity import run_exported

    imported = prepared.imported
    head, spec = imported.head, imported.input_spec
    probes = _probe_images(spec, settings)
    original = prepared.reference_scores(probes)
    expected_width = head.embedding_size if headless else head.num_classes
    if original.shape != (len(probes), expected_width):
        raise ConversionError(f"the original model returns {original.shape} scores for {len(probes)} probes")
    minimum = settings.min_agreement if settings.min_agreement is not None else (1.0 if prepared.exact else 0.9)
    checks: list[FormatCheck] = []
    report_warnings: list[str] = []
    embeddings_by_format: dict[str, np.ndarray] = {}
    primary_format = imported.backbone.format
    for model_format, exported in prepared.backbones.items():
        embeddings = run_exported(exported.content, model_format, spec, probes)
        embeddings_by_format[model_format] = embeddings
        if headless:
            from edgeadapt.import_headless import check_headless

            checks.append(check_headless(model_format, exported, original, embeddings, embeddings_by_format,
                                         primary_format, len(probes), report_warnings, exact=prepared.exact))
            continue
        top1 = head.logits(embeddings).argmax(axis=1)
        aware, strict, ties = top1_agreement(original, top1)
        file_name = f"backbone.{exported.quantization}.{model_format}"
        check = FormatCheck(model_format, file_name, exported.size, exported.quantization, aware, strict, ties, len(probes))
        if model_format != primary_format and primary_format in embeddings_by_format:
            check.parity_with_primary = _parity(embeddings_by_format[primary_format], embeddings, head, primary_format)
        checks.append(check)
        if model_format == primary_format and aware < minimum:
            raise ConversionError(
                f"the imported {model_format} bundle agrees with the original model on only {aware:.1%} of "
                f"{len(probes)} probes (needed {minimum:.0%}); the cut or the normalisation is wrong: report this model"
            )
        if aware < minimum:
            message = f"{model_format} backbone agrees with the original on {aware:.1%} of probes only"
            logger.warning(message)
            report_warnings.append(message)
    return checks, report_warnings


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


def _parity(reference: np.ndarray, candidate: np.ndarray, head: Head, reference_format: str) -> dict[str, Any]:
    numerator = np.einsum("ij,ij->i", reference, candidate)
    denominator = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    reference_scores = softmax(head.logits(reference))
    candidate_scores = softmax(head.logits(candidate))
    return {
        "reference": f"{reference_format} backbone",
        "top1_agreement": round(float(np.mean(reference_scores.argmax(1) == candidate_scores.argmax(1))), 6),
        "embedding_cosine": round(float(np.mean(numerator / np.maximum(denominator, 1e-12))), 6),
        "embedding_max_abs_difference": round(float(np.max(np.abs(reference - candidate))), 6),
        "max_score_difference": round(float(np.max(np.abs(reference_scores - candidate_scores))), 6),
    }
