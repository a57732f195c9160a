"""Verifying an import before it is written: the bundle's predictions against the original model's.

Owns the probe images, the tie-aware top-1 agreement, one :class:`FormatCheck` per backbone
format (the primary format must reach ``min_agreement`` or the import fails) and the parity
of a secondary format with the primary one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeadapt.device.errors import ConversionError
from edgeadapt.device.head import Head, softmax
from edgeadapt.device.manifest import InputSpec
from edgeadapt.device.preprocessing import prepare_batch
from edgeadapt.bundles.import_report import FormatCheck

if TYPE_CHECKING:  # pragma: no cover
    from edgeadapt.bundles.importing import ImportSettings

logger = logging.getLogger("edgeadapt.bundles.importing")

#: Relative tolerance under which two original scores count as a tie (quantized outputs tie often).
TIE_TOLERANCE = 1e-6


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


def probe_images(spec: InputSpec, settings: ImportSettings) -> np.ndarray:
    """The probe batch: the given probe image files (prepared for ``spec``), then ``settings.probes`` generated.

    Args:
        spec: the model's input spec.
        settings: the import settings (probe files, probe count, seed).

    Returns:
        A uint8 (N, H, W, C) batch.
    """
    from edgeadapt.converters.fused_export import probe_image_batch

    generated = probe_image_batch(spec, settings.probes, seed=settings.seed)
    if not settings.probe_images:
        return generated
    given = prepare_batch([str(path) for path in settings.probe_images], spec)
    return np.concatenate([given, generated])


def verify_backbones(prepared: Any, settings: ImportSettings, headless: bool) -> tuple[list[FormatCheck], list[str]]:
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
    probes = probe_images(spec, settings)
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
            from edgeadapt.bundles.import_headless import check_headless

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
