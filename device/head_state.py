"""Head state: everything one head version of a bundle holds, read from disk.

The updater reads it under the writer lock before an update; the delta exporter and the
host's merge read it to see what a device learned; :func:`refresh_runtime` points a running
:class:`~edgeadapt.device.runtime.Runtime` at the newest committed head. Part of the bundle
layer (it only reads).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeadapt.device.bundle import Bundle
from edgeadapt.device.reference_embeddings import ReferenceEmbeddings
from edgeadapt.device.errors import BundleError
from edgeadapt.device.head import ClassStats, Head
from edgeadapt.device.manifest import Manifest
from edgeadapt.device.unknown import UnknownRejection, load_unknown
from edgeadapt.device.versions import HEADS_DIR, VersionStore


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
    return HeadState(
        manifest=manifest,
        head=bundle.load_head(),
        stats=bundle.load_class_stats(),
        references=bundle.load_reference_embeddings(),
        device_examples=bundle.load_device_examples(),
        unknown=load_unknown(bundle),
        background=bundle.load_background(),
    )


# ----------------------------------------------------------------------------- a runtime's head
def refuse_temporary_unpack(path: Path) -> None:
    """A runtime opened from a packed bundle runs from a temporary unpacked copy: updates would be lost."""
    import tempfile

    parent = path.resolve().parent
    if parent.name.startswith("edgeadapt-bundle-") and parent.parent == Path(tempfile.gettempdir()).resolve():
        raise BundleError(
            f"this runtime was opened from a packed bundle, unpacked to the temporary folder {path}; updates there "
            "would be lost. Unpack it once to a permanent folder (edgeadapt.device.unpack_bundle) and open that"
        )


def apply_to_runtime(runtime: Any, path: Path, manifest: Manifest, head: Head) -> None:
    """Point ``runtime`` at version ``manifest`` of the bundle at ``path`` with ``head``."""
    names = manifest.class_names
    runtime.bundle = Bundle(path, manifest)
    runtime.manifest = manifest
    runtime.set_head(head, names)


def refresh_runtime(runtime: Any) -> bool:
    """Reload ``runtime``'s head if another process committed a newer version; True when it changed.

    Cheap when nothing changed (reads and compares ``manifest.json``). The backbone is not reopened.
    """
    store_path = Path(runtime.bundle.path)
    manifest = VersionStore(store_path).read_manifest()
    if manifest.version == runtime.manifest.version and manifest.data == runtime.manifest.data:
        return False
    if manifest.backbone_fingerprint != runtime.manifest.backbone_fingerprint:
        raise BundleError(f"{store_path} now holds another backbone; reopen it with Runtime.open")
    bundle = Bundle(store_path, manifest)
    bundle.verify(only=head_file_paths(manifest))
    apply_to_runtime(runtime, store_path, manifest, bundle.load_head())
    return True
