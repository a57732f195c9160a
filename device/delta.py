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

import hashlib
import json
import logging
import re
import socket
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeadapt.device.bundle import npy_bytes, sha256_bytes
from edgeadapt.device.dsse import MAX_SIGNATURE_BYTES, SIGNATURE_NAME
from edgeadapt.device.errors import BundleError, IncompatibleModelError, InputError, UpdateError
from edgeadapt.device.head import ClassStats, Head
from edgeadapt.device.manifest import MAX_CLASSES, MAX_EMBEDDING_SIZE, MAX_NAME_LENGTH, MAX_VERSION, utc_timestamp
from edgeadapt.device.npyio import read_npy
from edgeadapt.device.packing import check_member, read_member, zip_errors
from edgeadapt.device.safefs import durable_write, storage_error
from edgeadapt.device.schema import Fields, parse_document
from edgeadapt.device.signing import verify_delta_signature

logger = logging.getLogger(__name__)

DELTA_FORMAT = "edgeadapt-delta"
DELTA_FORMAT_VERSION = 1
DELTA_SUFFIX = ".eadelta"
METADATA_NAME = "delta.json"
_ARRAY_MEMBERS = ("weights.npy", "bias.npy", "feature_mean.npy", "example_embeddings.npy", "example_labels.npy")
_MAX_METADATA_BYTES = 16 << 20
#: Largest delta member (and total) accepted: 1 GiB of example embeddings is ~200000 1280-d examples.
MAX_DELTA_BYTES = 1 << 30
MAX_DELTA_HISTORY = 10_000


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
    #: key id of the trusted device key that signed the delta (None when not checked)
    signer: str | None = None

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
def export_delta(bundle_path: str | Path, output: str | Path, source: str | None = None,
                 device_key: Any = None) -> Path:
    """Write the classes added or strengthened on the device of ``bundle_path`` to ``output``.

    ``source`` names the device in the host's provenance (default: the host name). Reads the
    current version without the writer lock (readers never see a partial version).
    ``device_key``: private key file that signs the delta (member ``signature.dsse.json``).
    """
    from edgeadapt.device.head_state import load_state
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
    members = {METADATA_NAME: (json.dumps(info, indent=2) + "\n").encode(), **members}
    if device_key is not None:  # signed before anything is written: an unusable key leaves nothing behind
        from edgeadapt.device.keys import load_private_key
        from edgeadapt.device.signing import SIGNATURE_NAME, sign_members

        key = device_key if hasattr(device_key, "sign") else load_private_key(device_key)
        members[SIGNATURE_NAME] = sign_members(members, key, info)

    def write_zip(handle) -> None:
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, data in members.items():
                archive.writestr(name, data)

    try:
        durable_write(output, write_zip)
    except OSError as error:
        raise storage_error(error, output.parent, f"write the delta {output.name}") from error
    logger.info("exported %d class(es), %d example(s) to %s", len(classes), len(examples), output)
    return output


# ----------------------------------------------------------------------------- read
class _HashingReader:
    """A read-only stream over a zip member that hashes and counts what is read, never past ``limit``."""

    def __init__(self, stream: Any, limit: int, source: str):
        self.stream = stream
        self.limit = limit
        self.source = source
        self.digest = hashlib.sha256()
        self.position = 0

    def _account(self, data: bytes | memoryview) -> None:
        self.position += len(data)
        if self.position > self.limit:
            raise BundleError(f"{self.source} inflates beyond its listed {self.limit} bytes; refusing it")
        self.digest.update(data)

    def read(self, size: int = -1) -> bytes:
        size = self.limit - self.position + 1 if size is None or size < 0 else min(size, self.limit - self.position + 1)
        data = self.stream.read(size)
        self._account(data)
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count = self.stream.readinto(view[: self.limit - self.position + 1])
        self._account(view[:count])
        return count

    def tell(self) -> int:
        return self.position


def _delta_info(raw: bytes, source: str) -> dict:
    """Parse and check ``delta.json`` (types, ranges, lengths, depth, UTF-8)."""
    info = parse_document(raw, source, _MAX_METADATA_BYTES)
    top = Fields(info, "", source)
    if info.get("format") != DELTA_FORMAT or info.get("format_version") != DELTA_FORMAT_VERSION:
        raise BundleError(
            f"{source} is format {info.get('format')!r} version {info.get('format_version')!r}; this edgeadapt "
            f"reads {DELTA_FORMAT!r} version {DELTA_FORMAT_VERSION}"
        )
    for key in ("created_at", "source", "bundle_id", "bundle_name"):
        top.string(key, MAX_NAME_LENGTH, default=None, nullable=True)
    top.integer("device_version", 0, MAX_VERSION, default=None, nullable=True)
    top.string("backbone_fingerprint", MAX_NAME_LENGTH)
    top.integer("embedding_size", 1, MAX_EMBEDDING_SIZE)
    head = top.mapping("head")
    head.boolean("l2_normalize", default=False)
    head.number("temperature", 0.0, 1e6, default=1.0, exclusive_minimum=True)
    head.string("feature_mean", 64, choices=("feature_mean.npy",), default=None, nullable=True)
    classes = top.sequence("classes", MAX_CLASSES)
    for position, entry in enumerate(classes):
        fields = Fields(entry, f"classes[{position}]", source)
        fields.string("name", MAX_NAME_LENGTH, min_length=1)
        fields.string("kind", choices=("added", "strengthened"))
        fields.integer("examples", 0, 2**53)
        fields.integer("device_index", 0, MAX_CLASSES)
        fields.string("added_at", 64, default=None, nullable=True)
        fields.integer("added_in_version", 0, MAX_VERSION, default=None, nullable=True)
    top.sequence("history", MAX_DELTA_HISTORY, default=None, nullable=True)
    files = top.mapping("files")
    for name in files.data:
        if name not in _ARRAY_MEMBERS:
            raise BundleError(f"{source}: field files lists {name[:80]!r}, which a delta may not hold")
        entry = files.mapping(name)
        sha = entry.string("sha256", 64, min_length=64)
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise entry.fail("sha256", "64 lowercase hexadecimal digits", sha)
        entry.integer("size", 0, MAX_DELTA_BYTES)
    return info


def _indexed_members(archive: zipfile.ZipFile, path: Path) -> dict[str, zipfile.ZipInfo]:
    """The delta's members by name, each checked (no duplicates, only known names, metadata present)."""
    members = archive.infolist()
    if len(members) > len(_ARRAY_MEMBERS) + 2:
        raise BundleError(f"{path} holds {len(members)} members; a delta holds at most {len(_ARRAY_MEMBERS) + 2}")
    by_name = {}
    for member in members:
        check_member(member, path, "delta")
        if member.filename in by_name:
            raise BundleError(f"{path} holds the member {member.filename!r} twice; refusing it")
        by_name[member.filename] = member
    if METADATA_NAME not in by_name:
        raise BundleError(f"{path} has no {METADATA_NAME}; it is not an edgeadapt delta")
    unexpected = set(by_name) - {METADATA_NAME, SIGNATURE_NAME, *_ARRAY_MEMBERS}
    if unexpected:
        raise BundleError(f"{path} holds unexpected members {sorted(unexpected)[:5]}; refusing it")
    return by_name


def _read_arrays(archive: zipfile.ZipFile, by_name: dict[str, zipfile.ZipInfo], info: dict,
                 path: Path) -> dict[str, np.ndarray]:
    """The listed arrays: sizes checked before inflating, streamed with a byte budget, checksummed,
    ``.npy`` headers checked against the shapes ``delta.json`` implies before allocation."""
    size, count = info["embedding_size"], len(info["classes"])
    shapes = {"weights.npy": ((size, count), "f"), "bias.npy": ((count,), "f"), "feature_mean.npy": ((size,), "f"),
              "example_embeddings.npy": ((None, size), "f"), "example_labels.npy": ((None,), "iu")}
    listed = info["files"]
    arrays_present = set(by_name) - {METADATA_NAME, SIGNATURE_NAME}
    if set(listed) != arrays_present:
        raise BundleError(f"{path}: the members {sorted(arrays_present)} do not match the files "
                          f"{METADATA_NAME} lists {sorted(listed)}; the delta is inconsistent")
    if sum(entry["size"] for entry in listed.values()) > MAX_DELTA_BYTES:
        raise BundleError(f"{path} lists more than {MAX_DELTA_BYTES} bytes of arrays; refusing it")
    arrays: dict[str, np.ndarray] = {}
    for name, entry in listed.items():
        member = by_name[name]
        if member.file_size != entry["size"]:
            raise BundleError(f"{path}: member {name!r} declares {member.file_size} bytes, {METADATA_NAME} lists "
                              f"{entry['size']}; refusing it before inflating it")
        with archive.open(member) as stream:
            reader = _HashingReader(stream, entry["size"], f"{path}: member {name!r}")
            shape, kinds = shapes[name]
            arrays[name] = read_npy(reader, entry["size"], f"{path}: member {name!r}", shape=shape, kinds=kinds)
            if reader.position != entry["size"] or stream.read(1) or reader.digest.hexdigest() != entry["sha256"]:
                raise BundleError(f"{path}: member {name!r} fails its checksum; the delta is corrupted")
    return arrays


def read_delta(path: str | Path, trusted_keys: Any = None) -> Delta:
    """Read and verify a delta file; :class:`BundleError` names the first problem.

    ``delta.json`` is read first (size-capped) and checked against the schema; every member
    must be listed with its size (checked against the zip header before inflating), is
    streamed with a byte budget, checksummed, and its ``.npy`` header checked against the
    shapes ``delta.json`` implies before any array is allocated. The one unlisted member a
    delta may hold is its device signature ``signature.dsse.json`` (at most
    ``MAX_SIGNATURE_BYTES``); with ``trusted_keys`` it is checked before any array is read.

    Args:
        path: The ``.eadelta`` file.
        trusted_keys: Enrolled device public keys (key files, a folder of ``*.pub`` files, or a
            ``edgeadapt.device.trust.TrustedKeys``): the delta must be signed by one of them.
            None: the signature is not checked (``$EDGEADAPT_TRUST_DIR`` is not used for deltas).

    Returns:
        The delta; ``signer`` names the device key that signed it (None when not checked).

    Raises:
        InputError: the file does not exist.
        BundleError: naming the first problem (a ``SignatureError`` subclass for a failed
            signature check).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"delta file {str(path)!r} does not exist")
    with zip_errors(path, "delta file"):
        archive = zipfile.ZipFile(path)
    with archive, zip_errors(path, "delta file"):
        by_name = _indexed_members(archive, path)
        metadata = read_member(archive, by_name[METADATA_NAME], _MAX_METADATA_BYTES, path)
        info = _delta_info(metadata, f"{path}:{METADATA_NAME}")
        envelope = None
        if SIGNATURE_NAME in by_name:  # size-capped even when no key checks it
            envelope = read_member(archive, by_name[SIGNATURE_NAME], MAX_SIGNATURE_BYTES, path)
        signer = verify_delta_signature(envelope, metadata, info, trusted_keys, str(path))
        arrays = _read_arrays(archive, by_name, info, path)
    for required in ("weights.npy", "bias.npy", "example_embeddings.npy", "example_labels.npy"):
        if required not in arrays:
            raise BundleError(f"{path} lacks {required}")
    if (info["head"].get("feature_mean") is None) != ("feature_mean.npy" not in arrays):
        raise BundleError(f"{path}: {METADATA_NAME} head.feature_mean does not match the members")
    known = DeltaClass.__dataclass_fields__
    classes = [DeltaClass(**{key: value for key, value in entry.items() if key in known}) for entry in info["classes"]]
    head_info = info["head"]
    try:
        head = Head(
            weights=arrays["weights.npy"], bias=arrays["bias.npy"], feature_mean=arrays.get("feature_mean.npy"),
            l2_normalize=head_info.get("l2_normalize", False), temperature=float(head_info.get("temperature", 1.0)),
        )
    except (IncompatibleModelError, InputError) as error:
        raise BundleError(f"{path}: the head columns are inconsistent ({error})") from error
    embeddings = np.asarray(arrays["example_embeddings.npy"], dtype=np.float32)
    labels = np.asarray(arrays["example_labels.npy"], dtype=np.int64)
    if labels.shape != (embeddings.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() >= len(classes))):
        raise BundleError(f"{path}: the arrays do not match the class list; the delta is inconsistent")
    names = [entry.name for entry in classes]
    if len(set(names)) != len(names):
        raise BundleError(f"{path}: {METADATA_NAME} lists a class name twice")
    present = np.bincount(labels, minlength=len(classes)) > 0 if labels.size else np.zeros(len(classes), bool)
    for position, entry in enumerate(classes):
        if not present[position]:
            raise BundleError(f"{path}: class {entry.name!r} has no example embeddings")
    return Delta(info=info, classes=classes, head=head, example_embeddings=embeddings, example_labels=labels, path=path,
                 signer=signer)
