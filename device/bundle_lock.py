"""The writers' lock of a bundle directory: an exclusive ``fcntl.flock`` on ``.edgeadapt.lock``.

One writer at a time commits a version (:class:`~edgeadapt.device.versions.VersionStore`);
readers need no lock. The lock file is never listed in a manifest.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path
from typing import Any

from edgeadapt.device import commit_writes
from edgeadapt.device.errors import BundleError, ConcurrentUpdateError, UpdateError

LOCK_NAME = ".edgeadapt.lock"


class BundleLock:
    """An exclusive ``fcntl.flock`` on ``BUNDLE/.edgeadapt.lock`` that serialises writers.

    With ``wait`` false a second writer gets :class:`ConcurrentUpdateError` at once; with
    ``wait`` true it waits up to ``timeout`` seconds (forever when None). The kernel drops
    the lock when the holder dies, so a killed writer never leaves the bundle locked.
    """

    def __init__(self, bundle_path: str | Path, wait: bool = False, timeout: float | None = None,
                 poll_interval: float = 0.02):
        self.path = Path(bundle_path) / LOCK_NAME
        self.wait = wait
        self.timeout = timeout
        self.poll_interval = poll_interval
        self._descriptor: int | None = None

    @property
    def held(self) -> bool:
        return self._descriptor is not None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError as error:  # pragma: no cover - Windows
            raise UpdateError("device updates need POSIX file locks (fcntl); run them on Linux or macOS") from error
        if self._descriptor is not None:
            raise UpdateError(f"{self.path} is already locked by this updater")
        if not self.path.parent.is_dir():
            raise BundleError(f"bundle {str(self.path.parent)!r} does not exist or is not a bundle directory")
        try:
            descriptor = commit_writes.open_file(self.path, os.O_RDWR | os.O_CREAT)  # looked up per call: tests replace it
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise BundleError(f"the lock file {self.path} is a symbolic link; refusing to write through it "
                                  "(remove it; the bundle may have been tampered with)") from error
            raise commit_writes.describe_os_error(error, self.path.parent, "lock the bundle for writing") from error
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode) or status.st_nlink != 1:
            os.close(descriptor)
            raise BundleError(f"the lock file {self.path} is not a plain regular file (a device, FIFO or hard link "
                              "to another file); refusing to write to it: remove it")
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not self.wait or (deadline is not None and time.monotonic() >= deadline):
                    holder = _read_holder(descriptor)
                    os.close(descriptor)
                    waited = "" if not self.wait else f" for {self.timeout:g} s"
                    raise ConcurrentUpdateError(
                        f"another writer{holder} is updating {self.path.parent}{waited}; retry when it is done "
                        "or pass wait_for_lock=True (--wait) to queue behind it"
                    ) from None
                time.sleep(self.poll_interval)
            except OSError as error:
                os.close(descriptor)
                raise commit_writes.describe_os_error(error, self.path.parent, "lock the bundle for writing") from error
        try:  # who holds the lock, for the error message of the next writer (best effort, fixed width)
            os.pwrite(descriptor, f"{os.getpid():>10}\n".encode(), 0)
        except OSError:
            pass
        self._descriptor = descriptor

    def release(self) -> None:
        if self._descriptor is None:
            return
        import fcntl

        try:
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)
        finally:
            os.close(self._descriptor)
            self._descriptor = None

    def __enter__(self) -> "BundleLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(descriptor: int) -> str:
    try:
        text = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    return f" (process {text})" if text.isdigit() else ""
