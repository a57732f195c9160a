"""Writing a host-made bundle version, and the parent's data that version carries on.

Owns :func:`write_version` (a parent bundle + a new head as a new version directory, built by
:func:`edgeadapt.device.version_builder.build_version`), the update-gate reference embeddings
a new version keeps (relabelled by class name, extended for new classes) and the parent's
calibration embeddings (background + references) that some head methods use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeadapt.device.bundle import Bundle, write_bundle
from edgeadapt.device.head import ClassStats, Head
from edgeadapt.device.merging import with_ridge_basis_like


#: ``write_version(references=KEEP_REFERENCES)`` keeps the parent's update-gate references unchanged.
KEEP_REFERENCES = object()


def parent_references(parent: Bundle):
    """The parent's update-gate reference embeddings, or None (also for bundle objects without them).

    Args:
        parent: the parent bundle.

    Returns:
        Its ``ReferenceEmbeddings``, or None.
    """
    loader = getattr(parent, "load_reference_embeddings", None)
    return None if loader is None else loader()


def _references_for_classes(references, old_names: list[str], new_names: list[str]):
    """Keep the references of classes that survive (matched by name), relabelled to the new indices."""
    if references is None:
        return None
    position = {name: index for index, name in enumerate(new_names)}
    mapping = np.array([position.get(name, -1) for name in old_names], dtype=np.int64)
    labels = mapping[references.labels]
    keep = labels >= 0
    if not keep.any():
        return None
    return type(references)(embeddings=references.embeddings[keep], labels=labels[keep])


def write_version(
    parent: Bundle,
    head: Head,
    stats: ClassStats | None,
    classes: list[dict],
    output: str | Path,
    change: dict,
    *,
    references: Any = KEEP_REFERENCES,
    overwrite: bool = False,
) -> Path:
    """Write ``parent`` + a new head as a new bundle version in a new directory.

    The backbone files (every file outside ``heads/``) are copied unchanged through
    :func:`write_bundle`, which checksums them into the new manifest. Head-section entries
    this module does not manage (e.g. another tool's files) are kept with their files.
    ``references``: the update-gate reference embeddings of the new head (default: the
    parent's, unchanged; None: none). The ridge solver state is stored only when the parent
    version stores it (:func:`edgeadapt.device.merging.with_ridge_basis_like`).
    """
    manifest = parent.manifest
    new_names = [entry["name"] for entry in classes]
    if references is KEEP_REFERENCES:
        references = _references_for_classes(parent_references(parent), manifest.class_names, new_names)
    from edgeadapt.converters.bundle_export import created_by
    from edgeadapt.device.unknown import load_unknown
    from edgeadapt.device.version_builder import VersionPlan, build_version  # noqa: I001

    plan = VersionPlan(head=head, stats=with_ridge_basis_like(manifest, head, stats),
                       classes=classes, change=change, references=references,
                       device_examples=_references_for_classes(parent.load_device_examples(), manifest.class_names,
                                                               new_names),
                       unknown=load_unknown(parent), background=parent.load_background())
    built = build_version(manifest, plan, manifest.version + 1, tool=f"edgeadapt {_version()}",
                          created_by=created_by())
    files: dict[str, Any] = {name: parent.path / name for name in built.manifest.files}
    files.update(built.new_files)
    return write_bundle(output, built.manifest, files, overwrite=overwrite)


def _version() -> str:
    from edgeadapt import __version__

    return __version__


def new_references(parent: Bundle, arrays: list[np.ndarray], first_index: int):
    """The parent's references plus the first few examples of each new class (as many per class as it keeps).

    Args:
        parent: the parent bundle.
        arrays: each new class's embeddings.
        first_index: the head column of the first new class.

    Returns:
        The new ``ReferenceEmbeddings``, or None when the parent has none.
    """
    references = parent_references(parent)
    if references is None:
        return None
    from edgeadapt.device.reference_embeddings import ReferenceEmbeddings

    per_class = max(1, references.per_class_count())
    embeddings, labels = [references.embeddings], [references.labels]
    for offset, array in enumerate(arrays):
        chosen = array[:per_class].astype(references.embeddings.dtype)
        embeddings.append(chosen)
        labels.append(np.full(chosen.shape[0], first_index + offset, dtype=np.int64))
    return ReferenceEmbeddings(np.concatenate(embeddings), np.concatenate(labels))


def calibration_embeddings(parent: Bundle) -> np.ndarray | None:
    """The parent's background and reference embeddings, float32 (N, D), for methods that calibrate with them."""
    parts = []
    loader = getattr(parent, "load_background", None)
    background = None if loader is None else loader()
    if background is not None and len(background):
        parts.append(np.asarray(background, dtype=np.float32))
    references = parent_references(parent)
    if references is not None and len(references):
        parts.append(references.as_float32())
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
