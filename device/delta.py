"""Fleet round trip: export what a device learned as a small delta file the host can merge.

A delta (``NAME.eadelta``) is a zip archive that holds only standard files::

    delta.json                 provenance, classes, sha256 of every other member
    weights.npy                D x k float32: the device's head columns of the k delta classes
    bias.npy                   k float32
    feature_mean.npy           D float32 (only when the head centers features)
    example_embeddings.npy     n x D float32: every embedding the device learned these classes from
    example_labels.npy         n int64: position of each embedding's class in ``delta.json["classes"]``

Delta classes are the classes added on the device (``kind: "added"``) and existing classes
that got more examples on the device (``kind: "strengthened"``). The example embeddings give
the host exact class statistics (sums, counts and the Gram contribution ``E^T E``), so
``edgeadapt merge-deltas`` can recompute the rows with the same head math as the device,
whatever the other devices did. A delta is small: 4 * D bytes per example plus one column
per class (a 1280-d class from 5 photos: about 31 KB).

numpy + stdlib only; the host reads deltas with :func:`read_delta` from this module.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeadapt.device.bundle import npy_bytes, sha256_bytes
from edgeadapt.device.errors import BundleError, InputError, UpdateError
from edgeadapt.device.head import ClassStats, Head
from edgeadapt.device.manifest import utc_timestamp

logger = logging.getLogger(__name__)

DELTA_FORMAT = "edgeadapt-delta"
DELTA_FORMAT_VERSION = 1
DELTA_SUFFIX = ".eadelta"
METADATA_NAME = "delta.json"
_ARRAY_MEMBERS = ("weights.npy", "bias.npy", "feature_mean.npy", "example_embeddings.npy", "example_labels.npy")
_MAX_METADATA_BYTES = 16 << 20


@dataclass(frozen=True)
class DeltaClass:
    """One class of a delta: its name on the device and what the device did with it."""

    name: str
    kind: str  # "added" | "strengthened"
    examples: int
    device_index: int
    added_at: str | None = None
    added_in_version: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if value is not None}


@dataclass
class Delta:
    """A read delta: provenance, classes, their device head columns and their example embeddings."""

    info: dict
    classes: list[DeltaClass]
    head: Head
    example_embeddings: np.ndarray
    example_labels: np.ndarray
    path: Path | None = None

    @property
    def source(self) -> str:
        return str(self.info.get("source") or self.info.get("bundle_id"))

    @property
    def backbone_fingerprint(self) -> str:
        return str(self.info["backbone_fingerprint"])

    @property
    def embedding_size(self) -> int:
        return int(self.info["embedding_size"])

    def embeddings_of(self, position: int) -> np.ndarray:
        """The example embeddings (n, D) of the delta class at ``position``."""
        return self.example_embeddings[self.example_labels == position]

    def stats(self) -> ClassStats:
        """Exact class statistics of the delta's examples (sums, counts, Gram matrix)."""
        return ClassStats.from_embeddings(self.example_embeddings, self.example_labels, len(self.classes))


# ----------------------------------------------------------------------------- export
def export_delta(bundle_path: str | Path, output: str | Path, source: str | None = None) -> Path:
    """Write the classes added or strengthened on the device of ``bundle_path`` to ``output``.

    ``source`` names the device in the host's provenance (default: the host name). Reads the
    current version without the writer lock (readers never see a partial version).
    """
    from edgeadapt.device.updater import load_state
    from edgeadapt.device.versions import VersionStore

    store = VersionStore(bundle_path)
    manifest = store.read_manifest()
    state = load_state(store.path, manifest)
    examples = state.device_examples
    if examples is None or not len(examples):
        raise UpdateError(
            f"nothing to export: no class was added or strengthened on this device in {store.path} "
            "(the current version holds no device examples)"
        )
    positions = {int(index): position for position, index in enumerate(np.unique(examples.labels))}
    classes = []
    for index in positions:
        entry = manifest.data["classes"][index]
        kind = "added" if entry.get("origin") == "device-added" and not entry.get("source") else "strengthened"
        classes.append(DeltaClass(
            name=entry["name"], kind=kind, examples=int(np.sum(examples.labels == index)), device_index=index,
            added_at=entry.get("added_at") if kind == "added" else None,
            added_in_version=entry.get("added_in_version") if kind == "added" else None,
        ))
    columns = np.array(list(positions), dtype=np.int64)
    arrays: dict[str, np.ndarray] = {
        "weights.npy": state.head.weights[:, columns],
        "bias.npy": state.head.bias[columns],
        "example_embeddings.npy": examples.embeddings.astype(np.float32),
        "example_labels.npy": np.array([positions[int(label)] for label in examples.labels], dtype=np.int64),
    }
    if state.head.feature_mean is not None:
        arrays["feature_mean.npy"] = state.head.feature_mean
    members = {name: npy_bytes(array) for name, array in arrays.items()}
    info = {
        "format": DELTA_FORMAT,
        "format_version": DELTA_FORMAT_VERSION,
        "created_at": utc_timestamp(),
        "source": source or socket.gethostname(),
        "bundle_id": manifest.data.get("bundle_id"),
        "bundle_name": manifest.data.get("name"),
        "device_version": manifest.version,
        "backbone_fingerprint": manifest.backbone_fingerprint,
        "embedding_size": manifest.embedding_size,
        "head": {"l2_normalize": state.head.l2_normalize, "temperature": state.head.temperature,
                 "feature_mean": "feature_mean.npy" if state.head.feature_mean is not None else None},
        "classes": [entry.to_dict() for entry in classes],
        "history": [info.to_dict() for info in store.history()],
        "files": {name: {"sha256": sha256_bytes(data), "size": len(data)} for name, data in members.items()},
    }
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(METADATA_NAME, json.dumps(info, indent=2) + "\n")
            for name, data in members.items():
                archive.writestr(name, data)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, output)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        from edgeadapt.device.versions import describe_os_error

        raise describe_os_error(error, output.parent, f"write the delta {output.name}") from error
    logger.info("exported %d class(es), %d example(s) to %s", len(classes), len(examples), output)
    return output


# ----------------------------------------------------------------------------- read
def read_delta(path: str | Path) -> Delta:
    """Read and verify a delta file; :class:`BundleError` names the first problem."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"delta file {str(path)!r} does not exist")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise BundleError(f"{path} is not a delta file (not a zip archive): {error}") from error
    with archive:
        names = set(archive.namelist())
        if METADATA_NAME not in names:
            raise BundleError(f"{path} has no {METADATA_NAME}; it is not an edgeadapt delta")
        unexpected = names - {METADATA_NAME, *_ARRAY_MEMBERS}
        if unexpected:
            raise BundleError(f"{path} holds unexpected members {sorted(unexpected)}; refusing it")
        if archive.getinfo(METADATA_NAME).file_size > _MAX_METADATA_BYTES:
            raise BundleError(f"{path}: {METADATA_NAME} is implausibly large")
        try:
            info = json.loads(archive.read(METADATA_NAME))
        except json.JSONDecodeError as error:
            raise BundleError(f"{path}: {METADATA_NAME} is not valid JSON ({error})") from error
        if info.get("format") != DELTA_FORMAT or info.get("format_version") != DELTA_FORMAT_VERSION:
            raise BundleError(
                f"{path} is format {info.get('format')!r} version {info.get('format_version')!r}; this edgeadapt "
                f"reads {DELTA_FORMAT!r} version {DELTA_FORMAT_VERSION}"
            )
        arrays: dict[str, np.ndarray] = {}
        for name, entry in info.get("files", {}).items():
            if name not in _ARRAY_MEMBERS or name not in names:
                raise BundleError(f"{path}: listed member {name!r} is missing or not allowed")
            data = archive.read(name)
            if len(data) != entry.get("size") or sha256_bytes(data) != entry.get("sha256"):
                raise BundleError(f"{path}: member {name!r} fails its checksum; the delta is corrupted")
            try:
                arrays[name] = np.load(io.BytesIO(data), allow_pickle=False)
            except ValueError as error:
                raise BundleError(f"{path}: member {name!r} is not a valid .npy array: {error}") from error
    for required in ("weights.npy", "bias.npy", "example_embeddings.npy", "example_labels.npy"):
        if required not in arrays:
            raise BundleError(f"{path} lacks {required}")
    try:
        classes = [DeltaClass(**entry) for entry in info["classes"]]
        head_info = info["head"]
        head = Head(
            weights=arrays["weights.npy"], bias=arrays["bias.npy"], feature_mean=arrays.get("feature_mean.npy"),
            l2_normalize=bool(head_info.get("l2_normalize", False)), temperature=float(head_info.get("temperature", 1.0)),
        )
    except (KeyError, TypeError) as error:
        raise BundleError(f"{path}: {METADATA_NAME} is incomplete ({error})") from error
    embeddings = np.asarray(arrays["example_embeddings.npy"], dtype=np.float32)
    labels = np.asarray(arrays["example_labels.npy"], dtype=np.int64)
    if head.num_classes != len(classes) or embeddings.ndim != 2 or embeddings.shape[1] != head.embedding_size \
            or labels.shape != (embeddings.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() >= len(classes))):
        raise BundleError(f"{path}: the arrays do not match the class list; the delta is inconsistent")
    if int(info.get("embedding_size", head.embedding_size)) != head.embedding_size:
        raise BundleError(f"{path}: embedding_size does not match the head columns")
    for position, entry in enumerate(classes):
        if entry.kind not in ("added", "strengthened"):
            raise BundleError(f"{path}: class {entry.name!r} has unknown kind {entry.kind!r}")
        if not np.any(labels == position):
            raise BundleError(f"{path}: class {entry.name!r} has no example embeddings")
    if not np.all(np.isfinite(embeddings)):
        raise BundleError(f"{path}: example embeddings contain NaN or infinite values")
    return Delta(info=info, classes=classes, head=head, example_embeddings=embeddings, example_labels=labels, path=path)
