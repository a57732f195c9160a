"""Packed bundles (one ``.zip``): writing, and unpacking that refuses hostile archives.

Unpacking reads the manifest member first (size-capped) and validates it. Then, before
anything is inflated, every member must be the manifest or a file the manifest lists, with
the listed size, stored or deflated, not encrypted, not a link, with a plain relative name;
every listed file must be present. Members are streamed to disk with a running byte budget
(the listed size) and their sha256 checked as they are written, into a staging folder that
is removed on any error. Every zip-level error becomes a
:class:`~edgeadapt.device.errors.BundleError`; disk errors a
:class:`~edgeadapt.device.errors.StorageError`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import struct
import tempfile
import weakref
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from edgeadapt.device.dsse import DEVICE_SIGNATURE_NAME, MAX_SIGNATURE_BYTES, SIGNATURE_NAME
from edgeadapt.device.errors import BundleError
from edgeadapt.device.manifest import MAX_FILES, MAX_MANIFEST_BYTES, Manifest, check_relative_path
from edgeadapt.device.safefs import create_exclusive, durable_write, storage_error

if TYPE_CHECKING:  # pragma: no cover
    from edgeadapt.device.bundle import Bundle

MANIFEST_NAME = "manifest.json"
#: Files a bundle may hold without listing them in its manifest (name -> largest size): they
#: travel in packed bundles too. They are the two signature files ``edgeadapt.device.signing``
#: writes (the publisher's and a device key's), self-authenticating, so no checksum is listed.
UNLISTED_FILES = {SIGNATURE_NAME: MAX_SIGNATURE_BYTES, DEVICE_SIGNATURE_NAME: MAX_SIGNATURE_BYTES}
_CHUNK = 1 << 20
_SUPPORTED_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
#: Errors the zipfile/zlib stack raises on damaged or hostile archives.
ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError,
              ValueError, struct.error, UnicodeDecodeError, IndexError, KeyError, OverflowError)


class UnpackedCopy:
    """A temporary folder holding an unpacked packed bundle; removed by :meth:`close`, when the
    last owner is garbage-collected, or at interpreter exit, whichever comes first."""

    def __init__(self, path: Path):
        self.path = path
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(path), True)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        self._finalizer()


@contextmanager
def zip_errors(source: Path | str, what: str = "packed bundle") -> Iterator[None]:
    """Turn every exception of reading a zip archive into a :class:`BundleError` naming ``source``."""
    try:
        yield
    except BundleError:
        raise
    except ZIP_ERRORS as error:
        raise BundleError(f"{source} is not a {what} or is damaged ({type(error).__name__}: {error}); "
                          "re-copy it") from None
    except OSError as error:
        raise BundleError(f"cannot read the {what} {source}: {error.strerror or error}") from error


def check_member(member: zipfile.ZipInfo, source: Path | str, what: str = "packed bundle") -> None:
    """Refuse encrypted, link, oddly compressed or badly named members (before reading them)."""
    name = member.filename
    if member.flag_bits & 0x1:
        raise BundleError(f"{what} member {name!r} of {source} is encrypted; refusing it")
    if member.compress_type not in _SUPPORTED_COMPRESSION:
        raise BundleError(f"{what} member {name!r} of {source} uses compression method {member.compress_type}; "
                          "only stored and deflated members are accepted")
    mode = (member.external_attr >> 16) & 0o170000
    if mode not in (0, 0o100000, 0o040000):
        raise BundleError(f"{what} member {name!r} of {source} is a symbolic link or special file; refusing it")
    check_relative_path(name[:-1] if member.is_dir() else name)


def read_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, limit: int, source: Path | str) -> bytes:
    """The content of ``member``, refusing more than ``limit`` bytes (whatever its header says)."""
    if member.file_size > limit:
        raise BundleError(f"member {member.filename!r} of {source} declares {member.file_size} bytes, more than "
                          f"the {limit} allowed; refusing it")
    with archive.open(member) as stream:
        data = stream.read(member.file_size + 1)  # never more than the (capped) declared size plus one byte
    if len(data) > limit or len(data) != member.file_size:
        raise BundleError(f"member {member.filename!r} of {source} holds {len(data)} bytes but declares "
                          f"{member.file_size}; the archive is damaged")
    return data


def _plan(archive: zipfile.ZipFile, packed: Path) -> tuple[bytes, Manifest, list[tuple[zipfile.ZipInfo, dict]]]:
    members = archive.infolist()
    if len(members) > MAX_FILES + 1:
        raise BundleError(f"{packed} holds {len(members)} members; refusing it")
    seen: set[str] = set()
    for member in members:
        check_member(member, packed)
        if member.filename in seen:
            raise BundleError(f"{packed} holds the member {member.filename!r} twice; refusing it")
        seen.add(member.filename)
    by_name = {member.filename: member for member in members}
    if MANIFEST_NAME not in by_name:
        raise BundleError(f"{packed} has no {MANIFEST_NAME}; it is not a packed bundle")
    raw = read_member(archive, by_name[MANIFEST_NAME], MAX_MANIFEST_BYTES, packed)
    def read_segment(path: str, size: int) -> bytes:
        if path not in by_name:
            raise BundleError(f"{packed} lacks the table segment {path!r} its manifest names; the archive is damaged")
        return read_member(archive, by_name[path], size, packed)

    manifest = Manifest.from_json(raw, f"{packed}:{MANIFEST_NAME}", read_segment)
    table = manifest.files
    folders = {"/".join(name.split("/")[:depth]) + "/" for name in table for depth in range(1, name.count("/") + 1)}
    files = []
    for member in members:
        if member.is_dir():
            if member.filename not in folders:
                raise BundleError(f"{packed} holds the folder {member.filename!r}, which no listed file uses")
            continue
        if member.filename == MANIFEST_NAME:
            continue
        entry = table.get(member.filename)
        if entry is None and member.filename in UNLISTED_FILES:
            if member.file_size > UNLISTED_FILES[member.filename]:
                raise BundleError(f"{packed}: member {member.filename!r} declares {member.file_size} bytes, at most "
                                  f"{UNLISTED_FILES[member.filename]} are allowed; refusing it")
            files.append((member, {"size": member.file_size, "sha256": None}))
            continue
        if entry is None:
            raise BundleError(f"{packed} holds {member.filename!r}, which its manifest does not list; refusing it")
        if member.file_size != entry["size"]:
            raise BundleError(f"{packed}: member {member.filename!r} declares {member.file_size} bytes, the manifest "
                              f"lists {entry['size']}; refusing it before inflating it")
        files.append((member, entry))
    missing = sorted(set(table) - {member.filename for member, _ in files})
    if missing:
        raise BundleError(f"{packed} lacks the listed file(s) {missing[:5]}; the packed bundle is incomplete")
    return raw, manifest, files


def _extract(archive: zipfile.ZipFile, member: zipfile.ZipInfo, destination: Path, entry: dict, packed: Path) -> None:
    """Stream one member to a new file, never more than the listed size, and check its sha256 (when listed)."""
    expected = int(entry["size"])
    digest = hashlib.sha256()
    written = 0
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        descriptor = create_exclusive(destination)
    except OSError as error:
        raise storage_error(error, destination.parent, "unpack the packed bundle") from error
    try:
        with zip_errors(packed), archive.open(member) as source:
            while True:
                chunk = source.read(min(_CHUNK, expected - written + 1))
                if not chunk:
                    break
                written += len(chunk)
                if written > expected:
                    raise BundleError(f"{packed}: member {member.filename!r} inflates beyond its listed {expected} "
                                      "bytes; refusing it (a zip bomb or a damaged archive)")
                digest.update(chunk)
                try:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(descriptor, view):]
                except OSError as error:
                    raise storage_error(error, destination.parent, "unpack the packed bundle") from error
    finally:
        os.close(descriptor)
    if written != expected or (entry["sha256"] is not None and digest.hexdigest() != entry["sha256"]):
        raise BundleError(f"{packed}: member {member.filename!r} fails its size or sha256 check; the packed bundle is "
                          "corrupted: re-copy it")


def extract_packed(packed: Path, output_dir: Path) -> Path:
    """Unpack ``packed`` into the new (or empty) folder ``output_dir``; see the module docstring."""
    from edgeadapt.device.bundle import Bundle

    if output_dir.is_symlink() or (output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir()))):
        raise BundleError(f"{output_dir} exists and is not an empty folder; unpack into a new directory")
    if not packed.is_file():
        raise BundleError(f"packed bundle {str(packed)!r} does not exist or is not a file")
    with zip_errors(packed):
        archive = zipfile.ZipFile(packed)
    with archive:
        with zip_errors(packed):
            raw, manifest, members = _plan(archive, packed)
        try:
            output_dir.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
        except OSError as error:
            raise storage_error(error, output_dir.parent, "unpack the packed bundle") from error
        try:
            needed = len(raw) + sum(int(entry["size"]) for _, entry in members)
            try:
                free = shutil.disk_usage(staging).free
            except OSError:
                free = needed
            if free < needed:
                raise storage_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), output_dir.parent,
                                    f"unpack the packed bundle ({needed} bytes needed, {free} free)")
            for member, entry in members:
                _extract(archive, member, staging / member.filename, entry, packed)
            try:
                with os.fdopen(create_exclusive(staging / MANIFEST_NAME), "wb") as handle:
                    handle.write(raw)
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError as error:
                raise storage_error(error, output_dir.parent, "unpack the packed bundle") from error
            # schema, tree and head binding; sizes and sha256 were checked above. Signatures are checked
            # when the unpacked bundle is opened with trusted keys, not here.
            Bundle._open_folder(staging, verify=False, trusted_keys=None, files_checked=True, check_signature=False)
            try:
                if output_dir.exists():
                    output_dir.rmdir()
                os.replace(staging, output_dir)
            except OSError as error:
                raise storage_error(error, output_dir, "unpack the packed bundle") from error
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return output_dir


def write_packed(bundle: "Bundle", output: Path) -> Path:
    """Write the open, verified ``bundle`` as one zip (manifest first) through a temporary file."""

    def write_zip(handle) -> None:
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.write(bundle.path / MANIFEST_NAME, MANIFEST_NAME)
            for name, limit in UNLISTED_FILES.items():
                extra = bundle.path / name
                if extra.is_file() and not extra.is_symlink() and extra.stat().st_size <= limit:
                    archive.write(extra, name)
            for relative_path in sorted(bundle.manifest.files):
                archive.write(bundle.file_path(relative_path), relative_path)

    try:
        return durable_write(output, write_zip)
    except OSError as error:
        raise storage_error(error, output.parent, f"write the packed bundle {output.name}") from error
