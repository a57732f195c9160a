"""The flat head file (``.eah``) that firmware links against: writer and reader (numpy only).

One format, two readers: this module and the C library in ``device/c/`` (``ea_head_open``).
Everything is little-endian; the full byte layout is in docs/C_LIBRARY.md::

    offset  size        field
    0       8           magic  89 'E' 'A' 'H' 0D 0A 1A 0A
    8       2  u16      format version (1)
    10      2  u16      header size (64)
    12      4  u32      flags: 1 feature mean, 2 L2-normalise, 4 int8 weights (others 0)
    16      4  u32      D, embedding size (1 .. 2^20)
    20      4  u32      C, classes (0 .. 2^20)
    24      4  f32      temperature (finite, > 0)
    28      4  u32      N, bytes of the class-name blob
    32      8  u64      total file size, checksum included
    40      24          reserved, zero
    64                  feature mean: D f32                  (only with flag 1)
    ...                 weights, class-major (column c of Head.weights, then c+1):
                          float32: C x D f32 (|w| <= 2^64);  int8: C x D i8, zero-padded to a multiple of 4
    ...                 int8 only: C f32 per-class scales (weight = q * scale)
    ...                 bias: C f32
    ...                 name offsets: (C + 1) u32, 0 = o_0 < o_1 < ... < o_C = N, each name 1..255 bytes
    ...                 names: N bytes of UTF-8, no control characters, not NUL-terminated
    total - 32          sha256 of bytes [0, total - 32)

Every declared size is checked against the real length with integer arithmetic before any
array is created, and every stored float must be finite.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from edgeadapt.device.errors import BundleError, InputError
from edgeadapt.device.head import Head
from edgeadapt.device.manifest import Manifest
from edgeadapt.device.safefs import durable_write, read_regular, storage_error

logger = logging.getLogger(__name__)

MAGIC = b"\x89EAH\r\n\x1a\n"
FORMAT_VERSION = 1
HEADER_SIZE = 64
CHECKSUM_SIZE = 32
MAX_DIM = 1 << 20
MAX_CLASSES = 1 << 20
MAX_NAME_BYTES = 255
#: float32 weights satisfy |w| <= 2^64, so the C library can sum logits in float without overflow
MAX_ABS_WEIGHT = float(2**64)
FLAG_FEATURE_MEAN = 1
FLAG_L2_NORMALIZE = 2
FLAG_INT8 = 4
KNOWN_FLAGS = FLAG_FEATURE_MEAN | FLAG_L2_NORMALIZE | FLAG_INT8
HEAD_FILE_SUFFIX = ".eah"
#: name of the head file a bundle carries (``heads/v{N}/head.eah``)
HEAD_FILE_NAME = "head.eah"
#: the readers refuse larger files before reading them (a 200k-class x 1280 float32 head is ~1 GB)
MAX_FILE_BYTES = 1 << 31

_HEADER = struct.Struct("<8sHHIIIfIQ24s")


@dataclass
class HeadFile:
    """A head file's content: the head, its class names and how the weights are stored.

    ``head`` holds float32 weights; for an int8 file they are the dequantised ``q * scale``
    (exactly what the C library computes with). ``int8_weights`` (C, D int8) and
    ``int8_scales`` (C float32) are set for int8 files.
    """

    head: Head
    class_names: list[str]
    int8_weights: np.ndarray | None = None
    int8_scales: np.ndarray | None = None

    @property
    def is_int8(self) -> bool:
        return self.int8_weights is not None


def section_offsets(dim: int, classes: int, flags: int, names_bytes: int) -> dict[str, int]:
    """Byte offsets of every section of a head file, and its total size (Python ints: no overflow).

    Args:
        dim: Embedding size D.
        classes: Number of classes C.
        flags: The header flags (FLAG_FEATURE_MEAN, FLAG_L2_NORMALIZE, FLAG_INT8).
        names_bytes: Length of the UTF-8 class-name blob.

    Returns:
        Offsets keyed by section name ("mean", "weights", "scales", "bias", "name_offsets",
        "names"), the "checksum" offset and the "total" file size.
    """
    offsets = {"mean": HEADER_SIZE}
    at = HEADER_SIZE + (4 * dim if flags & FLAG_FEATURE_MEAN else 0)
    offsets["weights"] = at
    at += (dim * classes + 3) // 4 * 4 if flags & FLAG_INT8 else 4 * dim * classes
    offsets["scales"] = at
    at += 4 * classes if flags & FLAG_INT8 else 0
    offsets["bias"] = at
    at += 4 * classes
    offsets["name_offsets"] = at
    at += 4 * (classes + 1)
    offsets["names"] = at
    at += names_bytes
    offsets["checksum"] = at
    offsets["total"] = at + CHECKSUM_SIZE
    return offsets


def _check_name(name: object) -> bytes:
    if not isinstance(name, str):
        raise InputError(f"class names must be strings, got {type(name).__name__}")
    encoded = name.encode("utf-8")
    if not 1 <= len(encoded) <= MAX_NAME_BYTES:
        raise InputError(f"class name {name!r} is {len(encoded)} UTF-8 bytes; a head file allows 1..{MAX_NAME_BYTES}")
    if any(byte < 32 or byte == 127 for byte in encoded):
        raise InputError(f"class name {name!r} contains control characters")
    return encoded


def quantize_columns(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-class int8: (C, D) int8 and (C,) float32 scales, ``weight ~ q * scale``.

    ``scale = max|w| / 127`` in float32 (1 for an all-zero column, the smallest normal float
    when the quotient underflows to 0), ``q = round_half_even(w / scale)`` clipped to
    [-127, 127]; the same arithmetic as ``ea_add_class`` in the C library.
    """
    columns = np.ascontiguousarray(np.asarray(weights, dtype=np.float32).T)
    top = np.abs(columns).max(axis=1) if columns.shape[1] else np.zeros(columns.shape[0], np.float32)
    with np.errstate(under="ignore"):
        scales = np.where(top > 0, top / np.float32(127), np.float32(1)).astype(np.float32)
    scales[scales == 0] = np.finfo(np.float32).tiny
    with np.errstate(under="ignore"):
        q = np.rint(columns / scales[:, None])
    return np.clip(q, -127, 127).astype(np.int8), scales


def head_to_bytes(head: Head, class_names: list[str], int8: bool = False) -> bytes:
    """Serialise ``head`` and its class names as a ``.eah`` file.

    Args:
        head: the float32 head (any normalisation; zero classes allowed).
        class_names: one name per class, in column order.
        int8: store int8 weights with one float32 scale per class (about 4x smaller).

    Returns:
        The complete file, checksum included.

    Raises:
        InputError: names do not match the classes, are duplicated or unusable, or the head
            is beyond the format's limits.
    """
    dim, classes = head.embedding_size, head.num_classes
    if len(class_names) != classes:
        raise InputError(f"{len(class_names)} class names for a head with {classes} classes")
    if len(set(class_names)) != len(class_names):
        raise InputError("class names must be unique")
    if not 1 <= dim <= MAX_DIM or classes > MAX_CLASSES:
        raise InputError(f"a head file holds 1..{MAX_DIM} dimensions and at most {MAX_CLASSES} classes, got "
                         f"{dim} x {classes}")
    if head.weights.size and float(np.abs(head.weights).max()) > MAX_ABS_WEIGHT:
        raise InputError("a head file holds weights up to 2^64 in magnitude; this head's are larger")
    temperature = np.float32(head.temperature)
    if not (np.isfinite(temperature) and temperature > 0):
        raise InputError(f"temperature {head.temperature} does not fit a positive finite float32")
    encoded = [_check_name(name) for name in class_names]
    flags = (FLAG_FEATURE_MEAN if head.feature_mean is not None else 0) | (FLAG_L2_NORMALIZE if head.l2_normalize else 0)
    flags |= FLAG_INT8 if int8 else 0
    names = b"".join(encoded)
    layout = section_offsets(dim, classes, flags, len(names))
    parts = [_HEADER.pack(MAGIC, FORMAT_VERSION, HEADER_SIZE, flags, dim, classes, float(temperature), len(names),
                          layout["total"], bytes(24))]
    if head.feature_mean is not None:
        parts.append(head.feature_mean.astype("<f4").tobytes())
    if int8:
        q, scales = quantize_columns(head.weights)
        raw = q.tobytes()
        parts += [raw, bytes(layout["scales"] - layout["weights"] - len(raw)), scales.astype("<f4").tobytes()]
    else:
        parts.append(np.ascontiguousarray(head.weights.T).astype("<f4").tobytes())
    parts.append(head.bias.astype("<f4").tobytes())
    parts.append(np.cumsum([0] + [len(name) for name in encoded], dtype=np.int64).astype("<u4").tobytes())
    parts.append(names)
    body = b"".join(parts)
    if len(body) != layout["checksum"]:  # pragma: no cover - the layout and the writer disagree
        raise RuntimeError("head file writer produced an inconsistent layout")
    return body + hashlib.sha256(body).digest()


def _floats(data: bytes, offset: int, count: int, what: str) -> np.ndarray:
    values = np.frombuffer(data, dtype="<f4", count=count, offset=offset).astype(np.float32)
    if not np.all(np.isfinite(values)):
        raise BundleError(f"the head file's {what} contain NaN or infinite values; re-export the head")
    return values


def head_from_bytes(data: bytes, source: str = "head file") -> HeadFile:
    """Parse and validate a ``.eah`` file (the checks of the C library's ``ea_head_open``).

    Args:
        data: the whole file.
        source: name used in error messages.

    Returns:
        The head (float32; int8 weights dequantised) with its class names.

    Raises:
        BundleError: the file is truncated, lies about its sizes, exceeds the limits, fails
            its checksum, holds non-finite values or an invalid name table.
    """
    data = bytes(data)
    if len(data) < HEADER_SIZE:
        raise BundleError(f"{source} has {len(data)} bytes, fewer than the {HEADER_SIZE}-byte header: truncated")
    magic, version, header_size, flags, dim, classes, temperature, names_bytes, total, reserved = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise BundleError(f"{source} is not an edgeadapt head file (bad magic); export one with `edgeadapt export-head`")
    if version != FORMAT_VERSION:
        raise BundleError(f"{source} has format version {version}; this reader knows {FORMAT_VERSION}: "
                          "re-export the head or update edgeadapt")
    if header_size != HEADER_SIZE or flags & ~KNOWN_FLAGS or any(reserved):
        raise BundleError(f"{source} has an invalid header (size {header_size}, flags {flags:#x}, reserved bytes)")
    if not 1 <= dim <= MAX_DIM or classes > MAX_CLASSES or names_bytes > classes * MAX_NAME_BYTES:
        raise BundleError(f"{source} declares {dim} dimensions, {classes} classes and {names_bytes} name bytes, "
                          f"beyond the limits (1..{MAX_DIM}, 0..{MAX_CLASSES}, {MAX_NAME_BYTES} bytes a name)")
    layout = section_offsets(dim, classes, flags, names_bytes)
    if total != layout["total"]:
        raise BundleError(f"{source} declares {total} bytes but its sections add up to {layout['total']}")
    if len(data) != total:
        raise BundleError(f"{source} has {len(data)} bytes but declares {total}: truncated or padded; re-copy it")
    if hashlib.sha256(data[: layout["checksum"]]).digest() != data[layout["checksum"]:]:
        raise BundleError(f"{source} fails its sha256 check: it is corrupted or was edited; re-export it")
    if not (np.isfinite(temperature) and temperature > 0):
        raise BundleError(f"{source} has temperature {temperature}; it must be finite and positive")
    mean = _floats(data, layout["mean"], dim, "feature mean") if flags & FLAG_FEATURE_MEAN else None
    q = scales = None
    if flags & FLAG_INT8:
        scales = _floats(data, layout["scales"], classes, "int8 scales")
        if np.any(scales <= 0) or np.any(scales.astype(np.float64) * 128.0 > np.finfo(np.float32).max):
            raise BundleError(f"{source} has an int8 scale that is not positive or so large that 128 * scale "
                              "overflows float32; re-export the head")
        if any(data[layout["weights"] + dim * classes: layout["scales"]]):
            raise BundleError(f"{source} has non-zero padding after its int8 weights")
        q = np.frombuffer(data, dtype=np.int8, count=dim * classes, offset=layout["weights"]).reshape(classes, dim)
        weights = (q.astype(np.float32) * scales[:, None]).T
    else:
        weights = _floats(data, layout["weights"], dim * classes, "weights").reshape(classes, dim).T
        if weights.size and float(np.abs(weights).max()) > MAX_ABS_WEIGHT:
            raise BundleError(f"{source} holds a weight beyond 2^64 in magnitude; re-export the head")
    bias = _floats(data, layout["bias"], classes, "bias")
    offsets = np.frombuffer(data, dtype="<u4", count=classes + 1, offset=layout["name_offsets"]).astype(np.int64)
    lengths = np.diff(offsets)
    if offsets[0] != 0 or offsets[-1] != names_bytes or np.any(lengths < 1) or np.any(lengths > MAX_NAME_BYTES):
        raise BundleError(f"{source} has an invalid class-name table")
    blob = data[layout["names"]: layout["checksum"]]
    if any(byte < 32 or byte == 127 for byte in blob):
        raise BundleError(f"{source} has control characters in its class names")
    try:
        names = [blob[start:end].decode("utf-8") for start, end in itertools.pairwise(offsets)]
    except UnicodeDecodeError as error:
        raise BundleError(f"{source} has a class name that is not UTF-8: {error}") from error
    if len(set(names)) != len(names):
        raise BundleError(f"{source} lists duplicate class names")
    head = Head(weights=np.ascontiguousarray(weights), bias=bias, feature_mean=mean,
                l2_normalize=bool(flags & FLAG_L2_NORMALIZE), temperature=float(temperature))
    return HeadFile(head=head, class_names=names, int8_weights=None if q is None else q.copy(), int8_scales=scales)


def read_head_file(path: str | Path) -> HeadFile:
    """Read and validate a ``.eah`` file (see :func:`head_from_bytes`).

    The file is opened without following a symbolic link and must be a regular file.

    Args:
        path: the head file.

    Returns:
        The head with its class names.

    Raises:
        BundleError: the file is missing, a link, unreadable or invalid.
    """
    path = Path(path)
    if not os.path.lexists(path):
        raise BundleError(f"cannot read head file {path}: it does not exist; check the path or write one with "
                          "`edgeadapt export-head`")
    return head_from_bytes(read_regular(path, MAX_FILE_BYTES, "head file"), str(path))


def write_head_file(path: str | Path, head: Head, class_names: list[str], int8: bool = False,
                    overwrite: bool = True) -> Path:
    """Write ``head`` as a ``.eah`` file atomically.

    The bytes go to a new temporary file next to ``path`` (created with ``O_EXCL | O_NOFOLLOW``),
    are fsynced and renamed over ``path``; a symbolic link at ``path`` is replaced, never
    written through.

    Args:
        path: the file to write.
        head: the float32 head.
        class_names: one name per class, in column order.
        int8: store int8 weights with per-class scales.
        overwrite: replace an existing file (else :class:`InputError`).

    Returns:
        The path written.

    Raises:
        InputError: see :func:`head_to_bytes`, or ``path`` exists and ``overwrite`` is false.
        StorageError: the file system refused the write. Nothing is written on error.
    """
    path = Path(path)
    data = head_to_bytes(head, class_names, int8=int8)
    if not overwrite and os.path.lexists(path):
        raise InputError(f"{path} already exists; pass overwrite=True (--overwrite) or choose another path")
    try:
        durable_write(path, data)
    except OSError as error:
        raise storage_error(error, path, "write the head file") from error
    return path


# ----------------------------------------------------------------------------- carried by a bundle
def carried_head_file(head: Head, class_names: list[str], version: int,
                      previous: Mapping[str, Any] | None) -> tuple[dict | None, dict[str, bytes]]:
    """The ``head_file`` entry of a new head version and its file, when the previous version carried one.

    Writers of a new head version (the device updater, merge-deltas, incremental training)
    call this so that a carried ``.eah`` always holds the head of its own version, with the
    same weight storage (float32 or int8) as before.

    Args:
        head: the new version's head.
        class_names: its class names.
        version: the new version number (the file goes to ``heads/v{version}/head.eah``).
        previous: the previous manifest's ``head.head_file`` entry (None: nothing is carried).

    Returns:
        ``(entry, files)``: the manifest entry and ``{path: bytes}``; ``(None, {})`` when
        nothing was carried or the new head does not fit the format (a warning is logged then).
    """
    if not previous:
        return None, {}
    int8 = previous.get("weights") == "int8"
    try:
        data = head_to_bytes(head, class_names, int8=int8)
    except InputError as error:
        logger.warning("the new version no longer carries a head file (%s); export one with `edgeadapt "
                       "export-head` once the names fit", error)
        return None, {}
    path = f"heads/v{int(version)}/{HEAD_FILE_NAME}"
    return {"file": path, "weights": "int8" if int8 else "float32"}, {path: data}


def carry_head_file(bundle_path: str | Path, int8: bool = False) -> Manifest:
    """Store the bundle's current head as ``heads/v{N}/head.eah`` in a new bundle version N.

    The head, statistics and every other file are shared with the current version; the new
    manifest lists the ``.eah`` file (sha256, size) and names it in ``head.head_file``. Later
    device updates rewrite it with each new head, so the carried file always matches its
    version's head. Runs under the bundle's update lock.

    Args:
        bundle_path: the bundle directory (not a packed bundle).
        int8: store int8 weights with per-class scales.

    Returns:
        The committed manifest.

    Raises:
        BundleError: the bundle is invalid, packed or fails its checks.
        InputError: the head does not fit the format (class names, sizes).
        ConcurrentUpdateError: another process holds the update lock.
        UpdateError: the new version could not be committed (nothing changes then).
    """
    from edgeadapt.device.bundle import Bundle
    from edgeadapt.device.manifest import utc_timestamp
    from edgeadapt.device.versions import VersionStore

    store = VersionStore(bundle_path)
    with store.lock():
        current = store.recover()
        bundle = Bundle(store.path, current)
        section = current.head_files
        bundle.verify(only=[path for path in (section.weights, section.bias, section.feature_mean) if path])
        data = head_to_bytes(bundle.load_head(), current.class_names, int8=int8)
        version = store.next_version(current)
        path = f"heads/v{version}/{HEAD_FILE_NAME}"
        manifest = current.copy()
        manifest.data.update(version=version, parent_version=current.version, committed_at=utc_timestamp())
        manifest.data["head"] = {**current.data["head"], "version": version,
                                 "head_file": {"file": path, "weights": "int8" if int8 else "float32"}}
        files = manifest.data["files"]
        old = current.data["head"].get("head_file")
        if old and old.get("file") in files:
            del files[old["file"]]  # the previous copy stays with its own version record
        from edgeadapt.device.change_actions import ChangeAction

        manifest.data["change"] = {"action": ChangeAction.EXPORT_HEAD.value, "classes": [],
                                   "weights": "int8" if int8 else "float32"}
        return store.commit(manifest, {path: data})


def load_carried_head_file(bundle: Any) -> HeadFile | None:
    """The ``.eah`` file an opened bundle carries (None when it carries none), checked against its head.

    Args:
        bundle: an opened :class:`~edgeadapt.device.bundle.Bundle`.

    Returns:
        The parsed head file, or None.

    Raises:
        BundleError: the file is missing, fails its listed size or sha256, is invalid, or does
            not hold the bundle's head (other class names, sizes or normalisation).
    """
    path = bundle.manifest.head_files.head_file
    if path is None:
        return None
    bundle.verify(only=[path])
    carried = head_from_bytes(read_regular(bundle.file_path(path), MAX_FILE_BYTES, "head file"), f"{bundle.path}/{path}")
    head = bundle.load_head()
    as_stored = replace(head, temperature=float(np.float32(head.temperature)))  # the file holds a float32
    if (carried.class_names != bundle.manifest.class_names or carried.head.weights.shape != head.weights.shape
            or not carried.head.same_normalisation(as_stored)):
        raise BundleError(f"the head file {path} in {bundle.path} does not hold the bundle's head; re-export it "
                          "with `edgeadapt export-head BUNDLE --into-bundle`")
    return carried
