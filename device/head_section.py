"""The manifest's ``head`` section and the ``heads/vN/`` files that hold a head and its data.

:func:`head_payload` turns a head, its class statistics, the update-gate references and the
background embeddings into the section (paths, flags, sizes) and the arrays to write;
:func:`head_file_names` says where each array of version N lives. The version builder
(:mod:`edgeadapt.device.version_builder`) and the host writers use them; the readers live
in :mod:`edgeadapt.device.bundle`.
"""

from __future__ import annotations

import numpy as np

from edgeadapt.device.errors import IncompatibleModelError
from edgeadapt.device.head import ClassStats, Head
from edgeadapt.device.reference_embeddings import ReferenceEmbeddings
from edgeadapt.device.stats_extras import EXTRA_KEY, StatisticsExtra, extra_array_names


def head_file_names(version: int) -> dict[str, str]:
    """The path of every head array of version ``version`` (``heads/v{version}/<name>.npy``)."""
    base = f"heads/v{version}"
    return {
        "weights": f"{base}/weights.npy",
        "bias": f"{base}/bias.npy",
        "feature_mean": f"{base}/feature_mean.npy",
        "class_sums": f"{base}/class_sums.npy",
        "class_counts": f"{base}/class_counts.npy",
        "gram": f"{base}/gram.npy",
        "reference_embeddings": f"{base}/reference_embeddings.npy",
        "reference_labels": f"{base}/reference_labels.npy",
        "background": f"{base}/background.npy",
        **{name: f"{base}/{name}.npy" for name in extra_array_names()},
    }


def head_payload(
    head: Head,
    stats: ClassStats | None,
    version: int,
    backbone_fingerprint: str,
    reference_embeddings: ReferenceEmbeddings | None = None,
    background: np.ndarray | None = None,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Manifest ``head`` section and the files that hold ``head``, ``stats``, the references and the background.

    Args:
        head: the classifier head.
        stats: its class statistics (sums, counts, optional Gram matrix and ridge solver state), or None.
        version: the version number (the files go to ``heads/v{version}/``).
        backbone_fingerprint: the backbone the head is bound to.
        reference_embeddings: the update gate's references, or None.
        background: optional (N, D) raw embeddings of ordinary, unlabelled photos (float16 or
            float32). Few-shot methods calibrate a new class against them so that it claims only
            what is its own (see :mod:`edgeadapt.device.fewshot`).

    Returns:
        (the head section, path -> array of every file it names).

    Raises:
        IncompatibleModelError: the statistics, references or background do not fit the head.
    """
    names = head_file_names(version)
    files: dict[str, np.ndarray] = {names["weights"]: head.weights, names["bias"]: head.bias}
    section: dict = {
        "version": version,
        "format": "npy",
        "weights": names["weights"],
        "bias": names["bias"],
        "feature_mean": None,
        "l2_normalize": bool(head.l2_normalize),
        "temperature": float(head.temperature),
        "backbone_fingerprint": backbone_fingerprint,
        "statistics": None,
    }
    if head.feature_mean is not None:
        files[names["feature_mean"]] = head.feature_mean
        section["feature_mean"] = names["feature_mean"]
    if stats is not None:
        section["statistics"] = _statistics_section(head, stats, names, files)
    if reference_embeddings is not None and len(reference_embeddings):
        section["references"] = _references_section(head, reference_embeddings, names, files)
    if background is not None and len(background):
        section["background"] = _background_section(head, background, names, files)
    return section, files


def _statistics_section(head: Head, stats: ClassStats, names: dict[str, str], files: dict[str, np.ndarray]) -> dict:
    """The ``statistics`` entry (class sums, counts, Gram matrix, ridge solver state); adds their files."""
    if stats.num_classes != head.num_classes or stats.embedding_size != head.embedding_size:
        raise IncompatibleModelError(
            f"class statistics ({stats.num_classes} classes x {stats.embedding_size}) do not match the head "
            f"({head.num_classes} classes x {head.embedding_size})"
        )
    files[names["class_sums"]] = stats.sums
    files[names["class_counts"]] = stats.counts
    statistics = {
        "class_sums": names["class_sums"],
        "class_counts": names["class_counts"],
        "gram": None,
        "bytes_per_class": stats.nbytes_per_class(),
        "bytes_shared": stats.nbytes_shared(),
        "examples": int(stats.counts.sum()),
    }
    if stats.gram is not None:
        files[names["gram"]] = stats.gram
        statistics["gram"] = names["gram"]
    basis = stats.ridge_basis
    if isinstance(basis, StatisticsExtra) and basis.embedding_size == head.embedding_size:
        paths = {}
        for name, array in basis.arrays().items():
            files[names[name]] = array
            paths[name] = names[name]
        statistics[EXTRA_KEY] = {**basis.metadata(), "files": paths,
                                 "bytes": sum(int(array.nbytes) for array in basis.arrays().values())}
    return statistics


def _references_section(head: Head, references: ReferenceEmbeddings, names: dict[str, str],
                        files: dict[str, np.ndarray]) -> dict:
    """The ``references`` entry of the update gate; adds its two files."""
    if references.embeddings.shape[1] != head.embedding_size:
        raise IncompatibleModelError(
            f"reference embeddings are {references.embeddings.shape[1]}-d but the head takes "
            f"{head.embedding_size}-d embeddings"
        )
    if references.labels.max() >= head.num_classes:
        raise IncompatibleModelError(
            f"reference labels go up to {int(references.labels.max())} but the head has {head.num_classes} classes"
        )
    files[names["reference_embeddings"]] = references.embeddings
    files[names["reference_labels"]] = references.labels
    return {
        "embeddings": names["reference_embeddings"],
        "labels": names["reference_labels"],
        "count": len(references),
        "per_class": references.per_class_count(),
        "dtype": references.embeddings.dtype.name,
    }


def _background_section(head: Head, background: np.ndarray, names: dict[str, str],
                        files: dict[str, np.ndarray]) -> dict:
    """The ``background`` entry (float16 or float32 embeddings); adds its file."""
    background = np.asarray(background)
    if background.ndim != 2 or background.shape[1] != head.embedding_size:
        raise IncompatibleModelError(
            f"background embeddings have shape {background.shape}, expected (N, {head.embedding_size})"
        )
    if background.dtype not in (np.float16, np.float32):
        background = background.astype(np.float32)
    files[names["background"]] = background
    return {"embeddings": names["background"], "count": int(background.shape[0]), "dtype": background.dtype.name}
