"""File-system safety for bundles: no symlinks, no special files, no writes through planted names.

Bundles arrive from other people and device updates often run as root, so every reader and
writer of a bundle goes through these helpers:

* :func:`check_tree` refuses a bundle in which any entry (file or folder, listed or not,
  including the lock file, ``heads/`` and ``versions/``) is a symbolic link or anything but
  a regular file or a folder;
* :func:`open_regular` opens a file for reading with ``O_NOFOLLOW`` and checks it is a
  regular file (a FIFO or device would block or read forever);
* :func:`create_exclusive` creates a new file with ``O_CREAT | O_EXCL | O_NOFOLLOW``, so a
  planted symlink or leftover at a temporary name is never written through;
* :func:`durable_write` / :func:`durable_write_all` write files atomically and durably
  (fresh exclusive temporary name, fsync, rename; the temporary file is removed on error);
* :func:`inside` checks a path after resolution, not only as text;
* :func:`storage_error` turns an ``OSError`` of a write (disk full, read-only, permission)
  into a :class:`~edgeadapt.device.errors.StorageError` that says what to do.

stdlib only.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import stat
from pathlib import Path
from typing import BinaryIO, Callable, Mapping, Union

from edgeadapt.device.errors import BundleError, EdgeAdaptError, StorageError

#: Folders of a bundle deeper than this are refused (a legitimate bundle is 2-3 levels deep).
MAX_TREE_DEPTH = 8
#: More entries than this in one bundle are refused (bounds the time of a check).
MAX_TREE_ENTRIES = 100_000
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
#: What :func:`durable_write` writes: bytes, or a function that writes into a binary file.
Content = Union[bytes, bytearray, memoryview, Callable[[BinaryIO], object]]


def check_tree(root: str | Path) -> None:
    """Refuse a bundle folder that holds a symlink or a special file anywhere below ``root``.

    Args:
        root: the bundle folder (itself may be reached through a symlink; its content may not).

    Raises:
        BundleError: naming the first offending entry.
    """
    root = Path(root)
    pending = [(os.fspath(root), 0)]
    seen = 0
    while pending:
        folder, depth = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as error:
            raise BundleError(f"cannot list {folder}: {error.strerror or error}; check the bundle's permissions") from error
        seen += len(entries)
        if seen > MAX_TREE_ENTRIES:
            raise BundleError(f"{root} holds more than {MAX_TREE_ENTRIES} entries; it is not a bundle")
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if depth + 1 > MAX_TREE_DEPTH:
                    raise BundleError(f"bundle entry {os.path.relpath(entry.path, root)!r} in {root} is nested too deeply")
                pending.append((entry.path, depth + 1))
            elif not entry.is_file(follow_symlinks=False):
                relative = os.path.relpath(entry.path, root)
                if entry.is_symlink():
                    raise BundleError(
                        f"bundle entry {relative!r} in {root} is a symbolic link; bundles may not contain links "
                        "(they could redirect reads or writes outside the bundle): re-copy or re-export the bundle"
                    )
                raise BundleError(
                    f"bundle entry {relative!r} in {root} is not a regular file or folder (a device, FIFO or "
                    "socket); refusing the bundle"
                )


def refuse_link(path: Path, what: str) -> None:
    """Raise :class:`BundleError` when ``path`` exists as a symlink or as anything but a file/folder."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as error:
        raise BundleError(f"cannot inspect {what} {path}: {error.strerror or error}") from error
    if stat.S_ISLNK(status.st_mode):
        raise BundleError(f"{what} {path} is a symbolic link; refusing to follow it (re-copy the bundle)")
    if not (stat.S_ISREG(status.st_mode) or stat.S_ISDIR(status.st_mode)):
        raise BundleError(f"{what} {path} is not a regular file or folder; refusing it")


def inside(root: Path, relative_path: str) -> Path:
    """``root / relative_path`` after resolution; :class:`BundleError` when it leaves ``root``.

    The folders on the way are resolved (a symlinked folder that leads elsewhere is refused);
    the final component is opened with ``O_NOFOLLOW`` by the readers (:func:`open_regular`).
    """
    resolved_root = os.path.realpath(root)
    folder = os.path.dirname(relative_path)
    if folder:
        resolved = os.path.realpath(os.path.join(resolved_root, folder))
        if not resolved.startswith(resolved_root.rstrip(os.sep) + os.sep):
            raise BundleError(f"bundle path {relative_path!r} resolves outside the bundle directory; refusing it")
    return Path(resolved_root) / relative_path


def open_regular(path: Path, what: str = "bundle file") -> int:
    """Open ``path`` read-only without following a final symlink; it must be a regular file.

    Returns:
        An open file descriptor (the caller closes it).

    Raises:
        BundleError: missing, a symlink, not a regular file, or unreadable.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError as error:
        raise BundleError(f"{what} {path} is missing; re-copy or re-export the bundle") from error
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise BundleError(f"{what} {path} is a symbolic link; bundles may not contain links") from error
        raise BundleError(f"cannot read {what} {path}: {error.strerror or error}") from error
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise BundleError(f"{what} {path} is not a regular file; refusing it")
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def read_regular(path: Path, max_bytes: int, what: str = "bundle file") -> bytes:
    """The content of the regular file ``path`` (no symlink), refusing more than ``max_bytes``."""
    descriptor = open_regular(path, what)
    try:
        size = os.fstat(descriptor).st_size
        if size > max_bytes:
            raise BundleError(f"{what} {path} has {size} bytes, more than the {max_bytes} allowed; refusing it")
        with os.fdopen(descriptor, "rb", closefd=False) as handle:
            data = handle.read(size + 1)  # (read(n) allocates n bytes up front: never ask for the cap)
    except OSError as error:
        raise BundleError(f"cannot read {what} {path}: {error.strerror or error}") from error
    finally:
        os.close(descriptor)
    if len(data) > min(size, max_bytes):
        raise BundleError(f"{what} {path} grew while being read; refusing it")
    return data


def sha256_and_size(path: Path, chunk_size: int = 1 << 20, what: str = "bundle file") -> tuple[str, int]:
    """sha256 and size of the regular file ``path``, opened with ``O_NOFOLLOW``."""
    descriptor = open_regular(path, what)
    digest = hashlib.sha256()
    size = 0
    try:
        with os.fdopen(descriptor, "rb", closefd=False) as handle:
            while chunk := handle.read(chunk_size):
                digest.update(chunk)
                size += len(chunk)
    except OSError as error:
        raise BundleError(f"cannot read {what} {path}: {error.strerror or error}") from error
    finally:
        os.close(descriptor)
    return digest.hexdigest(), size


def temporary_name(path: Path, marker: str = ".tmp-") -> Path:
    """A fresh hidden temporary name next to ``path`` (process id + random token)."""
    return path.with_name(f".{path.name}{marker}{os.getpid()}-{secrets.token_hex(4)}")


def create_exclusive(path: Path, mode: int = 0o644) -> int:
    """Create ``path`` as a new file (``O_EXCL | O_NOFOLLOW``) and return a write descriptor.

    Never writes through a symlink or an existing file planted at that name.

    Raises:
        OSError: as ``os.open`` (``EEXIST`` when the name is taken).
    """
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode)


def fsync_directory(path: Path) -> None:
    """Flush a folder's entries (rename durability) where the platform supports it (best effort)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _write_temporary(path: Path, content: Content, mode: int | None) -> Path:
    """``content`` written and fsynced under a fresh temporary name next to ``path``; that name."""
    temporary = temporary_name(path)
    descriptor = create_exclusive(temporary, 0o644 if mode is None else mode)
    try:
        with os.fdopen(descriptor, "w+b") as handle:
            if mode is not None:
                os.fchmod(handle.fileno(), mode)  # exactly ``mode``, whatever the umask
            if callable(content):
                content(handle)
            else:
                handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def durable_write(path: str | Path, content: Content, *, mode: int | None = None, sync_folder: bool = True) -> Path:
    """Replace ``path`` atomically and durably by ``content``.

    The content goes to a fresh temporary name in the same folder (created with ``O_EXCL |
    O_NOFOLLOW``, so a planted link is never written through), is fsynced and renamed over
    ``path``; then the folder is fsynced. Readers see the old file or the new one, never a
    part; on error the temporary file is removed and ``path`` is unchanged.

    Args:
        path: The file to write (its folder is created when missing).
        content: Bytes, or a function that writes into the open binary file (e.g. a zip or ``np.save``).
        mode: Exact permission bits of the new file (e.g. ``0o600`` for a private key); None
            for ``0o644`` less the umask.
        sync_folder: fsync the folder after the rename (callers that write many files into one
            folder may fsync it once themselves).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: As the file system raises it (callers turn it into their own error, e.g.
            with :func:`storage_error`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _write_temporary(path, content, mode)
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if sync_folder:
        fsync_directory(path.parent)
    return path


def durable_write_all(files: Mapping[Path, Content]) -> None:
    """Write several files like :func:`durable_write`: all are written and fsynced before any is renamed.

    An error while writing leaves every target unchanged (the temporary files are removed).

    Args:
        files: Target path -> content.

    Raises:
        OSError: As the file system raises it.
    """
    temporaries: dict[Path, Path] = {}
    try:
        for path, content in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            temporaries[path] = _write_temporary(path, content, None)
        for path, temporary in list(temporaries.items()):
            os.replace(temporary, path)
            del temporaries[path]
    finally:
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)
    for folder in sorted({path.parent for path in map(Path, files)}):
        fsync_directory(folder)


def storage_error(error: OSError, path: Path, what: str, *, error_type: type[EdgeAdaptError] = StorageError,
                  outcome: str = "nothing was written",
                  writable_advice: str = "choose a writable folder") -> EdgeAdaptError:
    """The error to raise for an ``OSError`` raised while writing ``path``: what happened and what to do.

    The one owner of how a full disk and a read-only or unwritable folder are told apart and worded.

    Args:
        error: The ``OSError`` the file system raised.
        path: The file or folder being written.
        what: What was being done, completing "cannot ..." (e.g. "commit version 3").
        error_type: The error class to return (a device commit returns an ``UpdateError``).
        outcome: What the caller guarantees happened, e.g. "nothing was changed".
        writable_advice: What to do about a read-only or unwritable folder.

    Returns:
        An ``error_type`` instance with the message (the caller raises it ``from error``).
    """
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return error_type(f"cannot {what}: no space left for {path} ({error.strerror}); {outcome}: "
                          "free some space and retry")
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return error_type(f"cannot {what}: {path} is read-only or not writable by this user ({error.strerror}); "
                          f"{outcome}: {writable_advice}")
    return error_type(f"cannot {what} ({path}): {error.strerror or error}; {outcome}")
