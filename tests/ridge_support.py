"""A version-1 bundle rewritten with or without the ridge solver state, as an export writes it.

Host exports and imports store the ridge method's cached solver state (``heads/vN/ridge_*.npy``)
only with ``ridge_solver_state=True``; the test fixture is a default export (without it). Tests of
the stored-state path rewrite the fixture's head here through the same helper the exporter uses
(:func:`edgeadapt.device.merging.with_ridge_basis_if`), without re-running the export.
"""

from __future__ import annotations

from pathlib import Path

from edgeadapt.device.bundle import Bundle, write_bundle
from edgeadapt.device.head_section import head_payload
from edgeadapt.device.merging import with_ridge_basis_if


def rewrite_ridge_state(source: Path, output: Path, keep: bool = True) -> Path:
    """``source`` (a bundle of one version, no head parts) written to ``output`` with the solver state iff ``keep``."""
    bundle = Bundle.open(source)
    manifest = bundle.manifest.copy()
    head, stats = bundle.load_head(), bundle.load_class_stats()
    section, head_files = head_payload(head, with_ridge_basis_if(keep, head, stats), manifest.version,
                                       manifest.backbone_fingerprint, bundle.load_reference_embeddings(),
                                       bundle.load_background())
    manifest.data["head"] = section
    files = {name: bundle.path / name for name in bundle.manifest.files if not name.startswith("heads/")}
    files.update(head_files)
    return write_bundle(output, manifest, files)


def ridge_files(path: Path) -> list[str]:
    """The ``ridge_*.npy`` files in the bundle's ``files`` table."""
    return sorted(name for name in Bundle.open(path).manifest.files if Path(name).name.startswith("ridge_"))
