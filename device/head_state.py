"""Head state: everything one head version of a bundle holds, read from disk.

The updater reads it under the writer lock before an update; the delta exporter and the
host's merge read it to see what a device learned. Part of the bundle layer (it only reads).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeadapt.device.bundle import Bundle, ReferenceEmbeddings
from edgeadapt.device.head import ClassStats, Head
from edgeadapt.device.manifest import Manifest
from edgeadapt.device.unknown import UnknownRejection, load_unknown
from edgeadapt.device.versions import HEADS_DIR


# ----------------------------------------------------------------------------- state
@dataclass
class HeadState:
    """Everything one head version holds (read from disk under the writer lock)."""

    manifest: Manifest
    head: Head
    stats: ClassStats | None
    references: ReferenceEmbeddings | None
    device_examples: ReferenceEmbeddings | None
    unknown: UnknownRejection | None
    background: np.ndarray | None = None

    @property
    def class_names(self) -> list[str]:
        return self.manifest.class_names

    @property
    def classes(self) -> list[dict]:
        return [dict(entry) for entry in self.manifest.data["classes"]]


def head_file_paths(manifest: Manifest) -> list[str]:
    """Files of the manifest that belong to the head version (everything under ``heads/``)."""
    return [name for name in manifest.files if name.startswith(f"{HEADS_DIR}/")]


def load_state(bundle_path: Path, manifest: Manifest, verify: bool = True) -> HeadState:
    """Read (and checksum) the head, statistics, references, device examples and unknown rule of ``manifest``."""
    bundle = Bundle(Path(bundle_path), manifest)
    if verify:
        bundle.verify(only=head_file_paths(manifest))
    section = manifest.data["head"]
    device_examples = None
    if section.get("device_examples"):
        device_examples = ReferenceEmbeddings(
            embeddings=bundle._load_array(section["device_examples"]["embeddings"]),
            labels=bundle._load_array(section["device_examples"]["labels"]),
        )
    return HeadState(
        manifest=manifest,
        head=bundle.load_head(),
        stats=bundle.load_class_stats(),
        references=bundle.load_reference_embeddings(),
        device_examples=device_examples,
        unknown=load_unknown(bundle),
        background=bundle.load_background(),
    )
