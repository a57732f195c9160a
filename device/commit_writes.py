"""Durable file writes of a version commit (stdlib and numpy only).

What :meth:`edgeadapt.device.versions.VersionStore.commit` uses to put files on disk so that a
crash never leaves a half-written file under a real name: each file is written (streamed and
hashed) to a fresh exclusive temporary name next to its destination, the files and their folders
are fsynced together (one journal flush for many files), then renamed into place. Also the
translation of a write's ``OSError`` into an :class:`~edgeadapt.device.errors.UpdateError` that
says what to do (:func:`describe_os_error`), shared with the writers' lock.

:func:`open_file` is the one place files are opened for writing here (tests replace it to
simulate a read-only or full file system).
"""

from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeadapt.device.errors import UpdateError
from edgeadapt.device.safefs import storage_error, temporary_name

TEMPORARY_MARKER = ".tmp-"

def describe_os_error(error: OSError, path: Path, what: str) -> UpdateError:
    """An :class:`UpdateError` for an ``OSError`` raised during a commit (:func:`safefs.storage_error`'s wording)."""
    return storage_error(error, path, what, error_type=UpdateError, outcome="nothing was changed",
                         writable_advice="make the bundle directory writable (or copy it somewhere writable) and retry")


def open_file(path: Path, flags: int) -> int:
    """``os.open`` with mode 0o644 and ``O_NOFOLLOW`` (one place, so tests can simulate a read-only or full
    file system). A symlink planted at ``path`` is never followed."""
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0), 0o644)


def _create_temporary(path: Path) -> tuple[Path, int]:
    """A new temporary file next to ``path`` (fresh random name, ``O_EXCL``: never an existing file or link)."""
    temporary = temporary_name(path, TEMPORARY_MARKER)
    return temporary, open_file(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL)


def write_all(descriptor: int, data: bytes) -> None:
    """Write all of ``data`` to ``descriptor`` (the one low-level write of a commit; tests inject faults here)."""
    view = memoryview(data)
    while view:
        written = os.write(descriptor, view)
        view = view[written:]


class _HashingWriter:
    """A minimal binary file object over a descriptor that hashes and counts what it writes."""

    def __init__(self, descriptor: int):
        self.descriptor = descriptor
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        write_all(self.descriptor, view)
        self.digest.update(view)
        self.size += len(view)
        return len(view)

    def flush(self) -> None:
        pass


@dataclass
class _PendingFile:
    """A file written to its temporary name, not yet fsynced or renamed."""

    path: Path
    temporary: Path
    descriptor: int | None
    sha256: str
    size: int


def _write_temporary(path: Path, data: bytes | np.ndarray) -> _PendingFile:
    """Write ``data`` (bytes, or an array as ``.npy``, streamed) to a temporary file next to ``path``."""
    temporary, descriptor = _create_temporary(path)
    try:
        writer = _HashingWriter(descriptor)
        if isinstance(data, np.ndarray):
            np.lib.format.write_array(writer, np.ascontiguousarray(data), allow_pickle=False)
        else:
            writer.write(data)
    except BaseException:
        os.close(descriptor)
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    return _PendingFile(path, temporary, descriptor, writer.digest.hexdigest(), writer.size)


def _fsync_folder(descriptor: int) -> None:
    try:
        os.fsync(descriptor)
    except OSError:  # some platforms cannot fsync a folder; the files themselves were fsynced
        pass


def _fsync_all(descriptors: list[int], folders: list[int] = ()) -> None:
    """fsync files (errors propagate) and folders (best effort) at once: concurrent fsyncs share
    journal commits on most file systems, so N files cost about one flush instead of N."""
    calls = [(os.fsync, descriptor) for descriptor in descriptors] + [(_fsync_folder, folder) for folder in folders]
    if len(calls) <= 1:
        for function, descriptor in calls:
            function(descriptor)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, len(calls))) as pool:
        for future in [pool.submit(function, descriptor) for function, descriptor in calls]:
            future.result()  # re-raises an OSError from a file's fsync


def write_files_durably(files: list[tuple[Path, bytes | np.ndarray]]) -> list[tuple[str, int]]:
    """Write several files, each through a temporary file, fsync (all at once) and rename.

    Returns (sha256, size) per file. The folders are not fsynced here. On error every
    temporary file is removed, files already renamed stay (the caller cleans them up), and
    the OSError propagates.
    """
    pending: list[_PendingFile] = []
    try:
        for path, data in files:
            pending.append(_write_temporary(path, data))
    except BaseException:
        _flush_and_rename_abort(pending)
        raise
    _flush_and_rename(pending, [])
    return [(item.sha256, item.size) for item in pending]


def _flush_and_rename_abort(pending: list[_PendingFile]) -> None:
    for item in pending:
        if item.descriptor is not None:
            os.close(item.descriptor)
        if item.temporary is not None:
            try:
                os.unlink(item.temporary)
            except OSError:
                pass


def _flush_and_rename(pending: list[_PendingFile], folders: list[Path]) -> None:
    """fsync ``pending`` temporary files and ``folders`` together, then rename the files in order.

    On error every temporary file not yet renamed is removed and the error propagates.
    """
    folder_descriptors = []
    try:
        for folder in folders:
            try:
                folder_descriptors.append(os.open(folder, os.O_RDONLY))
            except OSError:
                continue
        _fsync_all([item.descriptor for item in pending], folder_descriptors)
        for item in pending:
            os.close(item.descriptor)
            item.descriptor = None
        for item in pending:
            os.replace(item.temporary, item.path)
            item.temporary = None
    finally:
        for descriptor in folder_descriptors:
            os.close(descriptor)
        _flush_and_rename_abort(pending)  # only what is left: nothing after success


def _link_record(temporary: Path, record: Path) -> bool:
    """Make ``record`` a hard link to the manifest's temporary file; False where the file system
    cannot (FAT, some network shares: the caller writes a copy instead)."""
    try:
        os.link(temporary, record, follow_symlinks=False)
    except OSError as error:
        if error.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            return False
        raise
    return True


def fsync_directories(paths: list[Path]) -> None:
    """fsync several folders at once (best effort, like :func:`fsync_directory`)."""
    descriptors = []
    try:
        for path in paths:
            try:
                descriptors.append(os.open(path, os.O_RDONLY))
            except OSError:
                continue
        _fsync_all([], descriptors)
    finally:
        for descriptor in descriptors:
            os.close(descriptor)


def write_manifest_and_record(manifest_path: Path, record: Path, text: bytes, folders: list[Path]) -> None:
    """Write a new manifest and its version record, then rename the manifest into place (the commit point).

    The manifest is written once, to a temporary name; ``record`` is a hard link to it (a second
    temporary copy, renamed into place first, where the file system has no hard links). One flush
    covers the manifest, the record and ``folders``; then the manifest is renamed over
    ``manifest_path``. On error every temporary file is removed and the error propagates (a record
    already linked stays: the caller removes it).

    Args:
        manifest_path: The bundle's ``manifest.json``.
        record: The version's ``versions/vN.json``.
        text: The manifest's JSON bytes.
        folders: Folders to fsync with the files (those that received the version's new files).
    """
    pending: list[_PendingFile] = []
    try:
        pending.append(_write_temporary(manifest_path, text))
        if not _link_record(pending[0].temporary, record):
            pending.insert(0, _write_temporary(record, text))
    except BaseException:
        _flush_and_rename_abort(pending)
        raise
    _flush_and_rename(pending, folders)
