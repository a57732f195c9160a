"""In-place, crash-safe head versioning of a bundle directory (numpy-free, stdlib only).

A device update never rewrites a file that a reader may be using. It writes a new head
version next to the current one and then switches ``manifest.json`` in one atomic rename::

    NAME.eab/
      manifest.json          the current version (the only file readers start from)
      heads/v7/*.npy         files of version 7 (files that did not change are shared:
                             a manifest may point at heads/v5/gram.npy; a version that only
                             appended classes lists small ``part_*.npy`` files on top of shared
                             base files, see :mod:`edgeadapt.device.head_parts`)
      versions/v7.json       a copy of each kept version's manifest (history, rollback)
      .edgeadapt.lock        lock file that serialises writers (never listed in the manifest)

Commit order (:meth:`VersionStore.commit`):

1. each new head file (and the record of the version being replaced if it has none yet, as
   for a freshly exported bundle): write a temporary file; fsync them all (concurrently, so
   the file system can share one journal flush); rename each into place;
2. the new manifest, written once to a temporary file; ``versions/v{N}.json`` is a hard link to
   it (a second temporary copy, renamed into place, where the file system has no hard links);
   fsync the manifest and the folders;
3. ``manifest.json`` (rename of that temporary file, fsync the folder) -- the commit point;
4. prune: keep the newest ``keep_versions`` version records (and, for a short grace period,
   versions that were current moments ago, so readers that just read their manifest can
   finish loading them), delete head files that no kept version references.

A crash before step 3 leaves the old ``manifest.json`` in place, whose files are all
untouched; a crash after it leaves the new one, whose files were all fsynced before. The
next writer (:meth:`VersionStore.recover`, run under the lock) deletes the leftovers of an
interrupted commit: records newer than the current manifest, unreferenced head files and
temporary files. Readers need no lock. A head file is deleted only when no kept version lists
it (versions share base files and parts: the union of the kept versions' file tables is what
stays).

The file writes of a commit live in :mod:`edgeadapt.device.commit_writes`, the writers' lock
in :mod:`edgeadapt.device.bundle_lock`.

Versions only grow: a rollback to version 3 commits a new version whose manifest is version
3's (same head files, shared, not copied) with ``change.action == "rollback"``.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from edgeadapt.device.bundle import MANIFEST_NAME, Bundle
from edgeadapt.device.bundle_lock import BundleLock
from edgeadapt.device.commit_writes import (
    TEMPORARY_MARKER,
    describe_os_error,
    fsync_directories,
    write_files_durably,
    write_manifest_and_record,
)
from edgeadapt.device.errors import BundleError, InputError, UpdateError
from edgeadapt.device.manifest import MAX_MANIFEST_BYTES, Manifest, check_relative_path, utc_timestamp
from edgeadapt.device.manifest_tables import folder_reader
from edgeadapt.device.safefs import check_tree, read_regular, refuse_link

logger = logging.getLogger(__name__)

VERSIONS_DIR = "versions"
HEADS_DIR = "heads"
DEFAULT_KEEP_VERSIONS = 5
#: A version superseded less than this many seconds ago is not pruned yet, so that a reader
#: that has just read its manifest can still load its head files.
DEFAULT_READER_GRACE_SECONDS = 10.0
MINIMUM_KEEP_VERSIONS = 2
_RECORD_PATTERN = re.compile(r"^v(\d+)\.json$")


# ----------------------------------------------------------------------------- history
@dataclass(frozen=True)
class VersionInfo:
    """One kept version of a bundle's head, as listed by :meth:`VersionStore.history`."""

    version: int
    parent_version: int | None
    committed_at: str | None
    action: str
    summary: str
    class_names: tuple[str, ...]
    current: bool
    change: dict = field(default_factory=dict, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "parent_version": self.parent_version,
            "committed_at": self.committed_at,
            "action": self.action,
            "summary": self.summary,
            "classes": len(self.class_names),
            "current": self.current,
            "change": self.change,
        }


def summarize_change(change: Mapping[str, Any] | None) -> str:
    """One readable line for a manifest's ``change`` record."""
    if not change:
        return "exported"
    action = change.get("action", "?")
    classes = ", ".join(repr(name) for name in change.get("classes", []))
    if action == "add-class":
        return f"added {classes} from {change.get('examples')} example(s)"
    if action == "add-examples":
        return f"added {change.get('examples')} example(s) to {classes}"
    if action == "remove-class":
        return f"removed {classes}"
    if action == "rename-class":
        return f"renamed {change.get('old_name')!r} to {change.get('new_name')!r}"
    if action == "rollback":
        return f"rolled back to version {change.get('to_version')}"
    if action == "set-references":
        return f"stored {change.get('references')} reference embedding(s) for the update gate"
    if action == "calibrate-unknown":
        return f"calibrated unknown rejection (threshold {change.get('threshold', float('nan')):.4f})"
    if action == "compact":
        return f"compacted the head files ({change.get('parts', 0)} part(s) folded in)"
    if action == "merge-deltas":
        return f"merged {len(change.get('deltas', []))} delta(s) on the host: {classes}"
    return action


def version_info(manifest: Manifest, current_version: int) -> VersionInfo:
    data = manifest.data
    change = data.get("change") or {}
    return VersionInfo(
        version=manifest.version,
        parent_version=data.get("parent_version"),
        committed_at=data.get("committed_at") or data.get("created_at"),
        action=change.get("action", "export"),
        summary=summarize_change(change),
        class_names=tuple(manifest.class_names),
        current=manifest.version == current_version,
        change=dict(change),
    )


# ----------------------------------------------------------------------------- the store
class VersionStore:
    """Versions of one bundle directory: read the current one, commit, list, roll back, prune.

    Methods that change the bundle (:meth:`recover`, :meth:`commit`, :meth:`prune`) must be
    called while holding :meth:`lock`. Reading needs no lock.
    """

    def __init__(self, bundle_path: str | Path, keep_versions: int = DEFAULT_KEEP_VERSIONS,
                 reader_grace_seconds: float = DEFAULT_READER_GRACE_SECONDS):
        self.path = Path(bundle_path)
        self.reader_grace_seconds = float(reader_grace_seconds)
        if isinstance(keep_versions, bool) or not isinstance(keep_versions, int) or keep_versions < MINIMUM_KEEP_VERSIONS:
            raise InputError(
                f"keep_versions must be an integer of at least {MINIMUM_KEEP_VERSIONS} (the current version and "
                f"one to roll back to), got {keep_versions!r}"
            )
        self.keep_versions = keep_versions
        self._record_cache: dict[int, tuple[tuple[int, int, int], Manifest]] = {}
        self._manifest_cache: tuple[tuple[int, int, int, int], Manifest] | None = None
        if not self.path.is_dir():
            if self.path.is_file():
                raise BundleError(
                    f"{self.path} is a packed bundle; updates need the bundle directory: unpack it first "
                    "(edgeadapt.device.unpack_bundle)"
                )
            raise BundleError(f"bundle {str(self.path)!r} does not exist or is not a bundle directory")

    # ------------------------------------------------------------------ reading
    def lock(self, wait: bool = False, timeout: float | None = None) -> BundleLock:
        return BundleLock(self.path, wait=wait, timeout=timeout)

    def read_manifest(self) -> Manifest:
        """The current manifest (validated, files not verified; parsed once while the file is unchanged).

        The returned manifest is shared with later calls: copy it (:meth:`Manifest.copy`) to change it.
        """
        manifest_path = self.path / MANIFEST_NAME
        try:
            status = os.lstat(manifest_path)
        except FileNotFoundError:
            raise BundleError(f"{self.path} has no {MANIFEST_NAME}; it is not a bundle (or it is incomplete)") from None
        signature = (status.st_mtime_ns, status.st_size, status.st_ino, status.st_ctime_ns)
        cached = self._manifest_cache
        if cached is not None and cached[0] == signature and stat.S_ISREG(status.st_mode):
            return cached[1]
        manifest = Manifest.from_json(read_regular(manifest_path, MAX_MANIFEST_BYTES, "bundle manifest"),
                                      str(manifest_path), folder_reader(self.path))
        self._manifest_cache = (signature, manifest)
        return manifest

    def record_path(self, version: int) -> Path:
        return self.path / VERSIONS_DIR / f"v{int(version)}.json"

    def record_versions(self) -> list[int]:
        """Version numbers that have a record in ``versions/``, ascending."""
        folder = self.path / VERSIONS_DIR
        refuse_link(folder, "version folder")
        if not folder.is_dir():
            return []
        numbers = []
        for entry in folder.iterdir():
            match = _RECORD_PATTERN.match(entry.name)
            if match:
                numbers.append(int(match.group(1)))
        return sorted(numbers)

    def read_record(self, version: int) -> Manifest:
        """The manifest copy of ``version`` (parsed once and cached while the file is unchanged)."""
        path = self.record_path(version)
        refuse_link(path.parent, "version folder")
        try:
            status = os.lstat(path)
            signature = (status.st_mtime_ns, status.st_size, status.st_ino)
            cached = self._record_cache.get(version)
            if cached is not None and cached[0] == signature:
                return cached[1]
            manifest = Manifest.from_json(read_regular(path, MAX_MANIFEST_BYTES, "version record"), str(path),
                                          folder_reader(self.path))
        except FileNotFoundError as error:
            raise BundleError(f"version {version} has no record in {path.parent}") from error
        self._record_cache[version] = (signature, manifest)
        return manifest

    def _record_data(self, version: int) -> dict | None:
        try:
            return self.read_record(version).data if self.record_path(version).is_file() else None
        except BundleError:
            return None

    def kept_manifests(self) -> dict[int, Manifest]:
        """Every readable version record with a number not above the current version, plus the current one."""
        current = self.read_manifest()
        manifests: dict[int, Manifest] = {}
        for number in self.record_versions():
            if number > current.version:
                continue  # leftover of an interrupted commit (removed by recover())
            try:
                manifests[number] = self.read_record(number)
            except BundleError as error:
                logger.warning("ignoring unreadable version record: %s", error)
        manifests[current.version] = current
        return manifests

    def history(self) -> list[VersionInfo]:
        """Kept versions, oldest first, each with what changed and whether it is current."""
        current = self.read_manifest()
        return [version_info(manifest, current.version) for _, manifest in sorted(self.kept_manifests().items())]

    # ------------------------------------------------------------------ writing (lock held)
    def recover(self) -> Manifest:
        """Clean up after an interrupted commit.

        Deletes version records newer than ``manifest.json``, head files no kept version
        references, and temporary files. Returns the current manifest.
        """
        check_tree(self.path)  # no symlink or special file anywhere (lock file, heads/, versions/ included)
        current = self.read_manifest()
        try:
            for number in self.record_versions():
                if number > current.version:
                    logger.info("removing the record of interrupted version %d", number)
                    self.record_path(number).unlink(missing_ok=True)
            self._collect_garbage(self.kept_manifests())
        except OSError as error:
            raise describe_os_error(error, self.path, "prepare the bundle for an update") from error
        return current

    def next_version(self, current: Manifest) -> int:
        return max([current.version, *self.record_versions()]) + 1

    def commit(self, manifest: Manifest, new_files: Mapping[str, bytes | np.ndarray]) -> Manifest:
        """Write ``new_files`` and make ``manifest`` the current version (lock held, after :meth:`recover`).

        ``manifest.data["files"]`` must already list every file the new version shares with
        older ones (backbone files, unchanged head files); entries (sha256, size) for
        ``new_files`` (bytes, or arrays written as ``.npy``) are added while they are written.
        New files must live directly in ``heads/v{N}/`` where N is the new version.

        Args:
            manifest: The new version's manifest (copied, not changed).
            new_files: The new head files by relative path.

        Returns:
            The committed manifest (with the new files' entries).

        Raises:
            UpdateError: When the version exists already, a file is misplaced or missing, or a write
                fails (nothing was changed then).
            BundleError: When the bundle holds a link or the new manifest is invalid.
        """
        check_tree(self.path)
        manifest = manifest.copy()
        version = manifest.version
        head_folder = self.path / HEADS_DIR / f"v{version}"
        table = self._checked_file_table(manifest, new_files, head_folder)
        written: list[Path] = []
        committed = False
        parent = self.read_manifest()
        try:
            self._write_head_files(parent, new_files, head_folder, table, written)
            manifest.data["files"] = table
            manifest.validate(str(self.path / MANIFEST_NAME))
            record = self.record_path(version)
            written.append(record)
            # One flush for: the folders that received the new files and the record, and the manifest.
            # Then the manifest -- the commit point -- is renamed into place and the folders flushed.
            # A record newer than manifest.json is removed by recover().
            folders = [head_folder, head_folder.parent, record.parent] if new_files else [record.parent]
            write_manifest_and_record(self.path / MANIFEST_NAME, record, manifest.to_json().encode(), folders)
            committed = True
            self._remember_committed(manifest, record)
            fsync_directories([record.parent, self.path])
        except (OSError, BundleError) as error:
            if not committed:
                _remove_written(written, head_folder)
                if isinstance(error, BundleError):
                    raise
                raise describe_os_error(error, self.path, f"write version {version}") from error
            logger.warning("version %d is committed but flushing the folder failed: %s", version, error)
        try:
            self.prune()
        except (OSError, BundleError) as error:  # the commit stands; the next writer prunes again
            logger.warning("version %d committed; pruning old versions failed: %s", version, error)
        return manifest

    def _checked_file_table(self, manifest: Manifest, new_files: Mapping[str, bytes | np.ndarray],
                            head_folder: Path) -> dict:
        """The new version's file table, after checking the version is new, every new file lives directly
        in its head folder and every shared file exists."""
        version = manifest.version
        prefix = f"{HEADS_DIR}/v{version}/"
        if self.record_path(version).exists() or (head_folder.exists() and any(head_folder.iterdir())):
            raise UpdateError(f"version {version} already exists in {self.path}; run recover() first")
        table = dict(manifest.data.get("files", {}))
        for relative_path in new_files:
            check_relative_path(relative_path)
            if not relative_path.startswith(prefix) or "/" in relative_path[len(prefix):]:
                raise UpdateError(f"new head file {relative_path!r} must live directly in {prefix}")
        missing = [name for name in table if name not in new_files and not (self.path / name).is_file()]
        if missing:
            raise UpdateError(f"the new version refers to files missing from {self.path}: {missing}")
        return table

    def _write_head_files(self, parent: Manifest, new_files: Mapping[str, bytes | np.ndarray], head_folder: Path,
                          table: dict, written: list[Path]) -> None:
        """Step 1 of a commit: the new head files (and the replaced version's record when it has none yet),
        durably; their entries go into ``table``, their paths into ``written`` (before they are written)."""
        batch: list[tuple[Path, bytes | np.ndarray]] = []
        if self._record_data(parent.version) != parent.data:
            # the version being replaced needs its history copy (an exported bundle has none yet)
            batch.append((self.record_path(parent.version), parent.to_json().encode()))
        for relative_path, data in new_files.items():
            batch.append((self.path / relative_path, data))
        refuse_link(self.path / VERSIONS_DIR, "version folder")
        (self.path / VERSIONS_DIR).mkdir(exist_ok=True)
        if new_files:
            head_folder.mkdir(parents=True, exist_ok=True)
        written.extend(path for path, _ in batch)
        prefix = f"{HEADS_DIR}/{head_folder.name}/"
        for (path, _), (digest, size) in zip(batch, write_files_durably(batch)):
            if path.parent == head_folder:
                table[f"{prefix}{path.name}"] = {"sha256": digest, "size": size}

    def _remember_committed(self, manifest: Manifest, record: Path) -> None:
        """Seed the manifest and record caches with what was just written (no re-parse by prune)."""
        try:
            status = os.lstat(self.path / MANIFEST_NAME)
            self._manifest_cache = ((status.st_mtime_ns, status.st_size, status.st_ino, status.st_ctime_ns), manifest)
            status = os.lstat(record)
            self._record_cache[manifest.version] = ((status.st_mtime_ns, status.st_size, status.st_ino), manifest)
        except OSError:
            pass

    def prune(self) -> list[int]:
        """Keep the newest ``keep_versions`` records; delete older records and unreferenced head files.

        A version superseded less than ``reader_grace_seconds`` ago is kept for now (a later
        commit or :meth:`recover` prunes it).
        """
        current = self.read_manifest()
        numbers = sorted(number for number in self.record_versions() if number <= current.version)
        kept = set(numbers[-self.keep_versions:]) | {current.version}
        now = time.time()
        for older, newer in zip(numbers, numbers[1:]):
            try:  # ``older`` stopped being current when ``newer`` was written
                if now - self.record_path(newer).stat().st_mtime < self.reader_grace_seconds:
                    kept.add(older)
            except OSError:
                kept.add(older)
        removed = [number for number in numbers if number not in kept]
        for number in removed:  # records first: a head file is only ever deleted once no record names it
            self.record_path(number).unlink(missing_ok=True)
        # (no fsync: a deletion lost in a crash is simply redone by the next prune)
        self._collect_garbage(self.kept_manifests())
        return removed

    def _collect_garbage(self, manifests: Mapping[int, Manifest]) -> None:
        """Delete unreferenced head files and temporary files. Never follows a link: a symlinked
        entry is refused (:class:`BundleError`), so nothing outside the bundle is ever deleted."""
        referenced = {name for manifest in manifests.values() for name in manifest.files}
        heads = self.path / HEADS_DIR
        refuse_link(heads, "head folder")
        if heads.is_dir():
            for folder in sorted(os.scandir(heads), key=lambda entry: entry.name):
                refuse_link(Path(folder.path), "head folder")
                if not folder.is_dir(follow_symlinks=False):
                    relative = f"{HEADS_DIR}/{folder.name}"
                    if relative not in referenced:
                        os.unlink(folder.path)
                    continue
                for entry in os.scandir(folder.path):
                    refuse_link(Path(entry.path), "head file")
                    relative = f"{HEADS_DIR}/{folder.name}/{entry.name}"
                    if relative not in referenced and entry.is_file(follow_symlinks=False):
                        Path(entry.path).unlink(missing_ok=True)
                try:
                    os.rmdir(folder.path)  # only succeeds when empty
                except OSError:
                    pass
        for folder in (self.path, self.path / VERSIONS_DIR):
            refuse_link(folder, "bundle folder")
            if folder.is_dir():
                for entry in os.scandir(folder):
                    if entry.name.startswith(".") and TEMPORARY_MARKER in entry.name and not entry.is_dir(
                            follow_symlinks=False):
                        Path(entry.path).unlink(missing_ok=True)  # a planted link is removed, never followed

    # ------------------------------------------------------------------ rollback
    def rollback_manifest(self, version: int, current: Manifest, change: dict | None = None) -> Manifest:
        """The manifest of a new version that restores ``version`` (files verified, not committed)."""
        if isinstance(version, bool) or not isinstance(version, int):
            raise InputError(f"version must be an integer, got {version!r}")
        available = sorted(self.kept_manifests())
        if version not in available:
            raise UpdateError(
                f"version {version} does not exist in {self.path} (kept versions: {available}); "
                "nothing was changed"
            )
        target = self.kept_manifests()[version]
        if target.backbone_fingerprint != current.backbone_fingerprint:
            raise UpdateError(
                f"version {version} belongs to another backbone ({target.backbone_fingerprint}); it cannot be restored"
            )
        try:
            Bundle(self.path, target).verify()
        except BundleError as error:
            raise UpdateError(f"version {version} cannot be restored: {error}; nothing was changed") from error
        restored = target.copy()
        number = self.next_version(current)
        restored.data["version"] = number
        restored.data["parent_version"] = current.version
        restored.data["committed_at"] = utc_timestamp()
        restored.data["head"]["version"] = number
        from edgeadapt.device.change_actions import ChangeAction

        restored.data["change"] = {"action": ChangeAction.ROLLBACK.value, "to_version": version, **(change or {})}
        return restored


def _remove_written(written: list[Path], head_folder: Path) -> None:
    """Undo the writes of a commit that did not reach its commit point (best effort)."""
    for path in reversed(written):
        try:
            path.unlink()
        except OSError:
            pass
    try:
        head_folder.rmdir()
    except OSError:
        pass
