"""Bad input to the device updater: clear errors from edgeadapt.device.errors, and nothing lost.

Every test takes a byte-for-byte snapshot of the bundle (except the lock file) before the
bad call and checks it afterwards. Runs without TensorFlow.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeadapt.device import Bundle, BundleError, EdgeAdaptError, InputError, Runtime, UpdateError, commit_writes
from edgeadapt.device import HeadUpdater
from edgeadapt.device.bundle_lock import LOCK_NAME


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(item.relative_to(path)): item.read_bytes() for item in sorted(path.rglob("*"))
            if item.is_file() and item.name != LOCK_NAME}


@pytest.fixture
def setup(bundle_copy, test_images):
    images, labels = test_images
    runtime = Runtime.open(bundle_copy)
    return runtime, HeadUpdater(runtime), list(images[labels == 4][:5]), snapshot(bundle_copy)


def assert_unchanged(bundle_copy: Path, before: dict, runtime: Runtime) -> None:
    assert snapshot(bundle_copy) == before
    bundle = Bundle.open(bundle_copy)  # still opens, checksums pass
    assert runtime.manifest.version == bundle.manifest.version
    assert runtime.class_names == bundle.manifest.class_names


# ----------------------------------------------------------------------------- examples
@pytest.mark.parametrize("examples", [[], (), None, np.zeros((0, 32, 32, 3), np.uint8)])
def test_empty_example_list(setup, bundle_copy, examples):
    runtime, updater, _, before = setup
    with pytest.raises(InputError, match="empty|no examples|at least one"):
        updater.add_class("new", examples)
    assert_unchanged(bundle_copy, before, runtime)


def test_a_corrupt_image_among_good_ones_refuses_the_whole_update(setup, bundle_copy, fixture_dir, tmp_path):
    runtime, updater, _, before = setup
    good = sorted((fixture_dir / "images" / "ring").iterdir())[:4]
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(InputError, match=r"example 3 of 5 .*broken\.jpg.* nothing was changed"):
        updater.add_class("ring2", [*good[:2], corrupt, *good[2:]])
    with pytest.raises(InputError, match="example 2 of 2"):
        updater.add_examples("ring", [good[0], tmp_path / "missing.png"])
    with pytest.raises(InputError, match="dtype float64"):
        updater.add_class("ring2", [np.zeros((32, 32, 3))])
    with pytest.raises(InputError, match="example 1 of 1"):
        updater.add_class("ring2", ["not an image"])
    assert_unchanged(bundle_copy, before, runtime)


def test_bad_embeddings(setup, bundle_copy):
    runtime, updater, _, before = setup
    size = runtime.head.embedding_size
    with pytest.raises(InputError, match=rf"\(N >= 1, {size}\)"):
        updater.add_class_embeddings("x", np.zeros((3, size + 1), np.float32))
    with pytest.raises(InputError, match="NaN or infinite"):
        updater.add_class_embeddings("x", np.full((3, size), np.nan, np.float32))
    with pytest.raises(InputError, match="floats"):
        updater.add_class_embeddings("x", np.zeros((3, size), np.int64))
    assert_unchanged(bundle_copy, before, runtime)


# ----------------------------------------------------------------------------- names
@pytest.mark.parametrize("name, message", [
    ("", "empty"), ("   ", "empty"), (" ring2", "whitespace"), ("a\nb", "control characters"),
    (42, "must be a string"), ("circle", "already exists"), ("x" * 201, "at most 200"),
])
def test_bad_or_duplicate_class_names(setup, bundle_copy, name, message):
    runtime, updater, examples, before = setup
    with pytest.raises(InputError, match=message):
        updater.add_class(name, examples)
    assert_unchanged(bundle_copy, before, runtime)


def test_duplicate_names_in_one_call_and_bad_renames(setup, bundle_copy):
    runtime, updater, examples, before = setup
    with pytest.raises(InputError, match="no classes given"):
        updater.add_classes({})
    with pytest.raises(InputError, match="already exists"):
        updater.add_classes({"new": examples, "ring": examples})
    with pytest.raises(InputError, match="already exists"):
        updater.rename_class("circle", "square")
    with pytest.raises(InputError, match="not in the bundle"):
        updater.rename_class("hexagon", "hex")
    with pytest.raises(InputError, match="empty"):
        updater.rename_class("circle", "")
    with pytest.raises(InputError, match="already called"):
        updater.rename_class("circle", "circle")
    with pytest.raises(InputError, match="not in the bundle"):
        updater.add_examples("hexagon", examples)
    with pytest.raises(InputError, match="not in the bundle"):
        updater.remove_class("hexagon")
    assert_unchanged(bundle_copy, before, runtime)


def test_removing_the_last_class_is_refused(bundle_copy):
    runtime = Runtime.open(bundle_copy)
    updater = HeadUpdater(runtime)
    for name in ["circle", "square", "triangle", "cross"]:
        updater.remove_class(name)
    before = snapshot(bundle_copy)
    with pytest.raises(UpdateError, match="last class"):
        updater.remove_class("ring")
    assert_unchanged(bundle_copy, before, runtime)


# ----------------------------------------------------------------------------- versions
@pytest.mark.parametrize("version, error, message", [
    (7, UpdateError, "version 7 does not exist"), (0, UpdateError, "does not exist"),
    ("1", InputError, "must be an integer"), (1.5, InputError, "must be an integer"), (True, InputError, "integer"),
])
def test_rollback_to_a_version_that_does_not_exist(setup, bundle_copy, version, error, message):
    runtime, updater, _, before = setup
    with pytest.raises(error, match=message):
        updater.rollback(version)
    assert_unchanged(bundle_copy, before, runtime)


def test_rollback_to_a_version_whose_files_were_damaged_is_refused(bundle_copy, test_images):
    images, labels = test_images
    runtime = Runtime.open(bundle_copy)
    updater = HeadUpdater(runtime, compact_fraction=0.0)  # every version writes full files: v3 shares none of v2's
    updater.add_class("ring2", list(images[labels == 4][:5]), force=True)
    updater.add_class("ring3", list(images[labels == 3][:5]), force=True)
    (bundle_copy / "heads" / "v2" / "weights.npy").write_bytes(b"garbage")
    before = snapshot(bundle_copy)
    with pytest.raises(UpdateError, match="version 2 cannot be restored.*sha256|version 2 cannot be restored.*bytes"):
        updater.rollback(2)
    assert snapshot(bundle_copy) == before
    Bundle.open(bundle_copy)  # the current version (3) is intact


def test_a_packed_bundle_or_missing_directory_is_a_clear_error(tmp_path, bundle_copy):
    from edgeadapt.device import pack_bundle
    from edgeadapt.device.versions import VersionStore

    packed = pack_bundle(bundle_copy, tmp_path / "tiny.zip")
    with pytest.raises(BundleError, match="packed bundle"):
        VersionStore(packed)
    with pytest.raises(BundleError, match="opened from a packed bundle.*would be lost"):
        HeadUpdater(Runtime.open(packed))
    with pytest.raises(BundleError, match="does not exist"):
        VersionStore(tmp_path / "nothing.eab")


# ----------------------------------------------------------------------------- read-only and full disk
@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions; the simulated test below covers it")
def test_read_only_bundle_directory(setup, bundle_copy):
    runtime, updater, examples, before = setup
    folders = [bundle_copy, *[path for path in bundle_copy.rglob("*") if path.is_dir()]]
    for folder in folders:
        folder.chmod(0o555)
    try:
        with pytest.raises(UpdateError, match="read-only or not writable"):
            updater.add_class("ring2", examples)
    finally:
        for folder in folders:
            folder.chmod(0o755)
    assert_unchanged(bundle_copy, before, runtime)


@pytest.mark.parametrize("failing_call", [1, 2, 5])
def test_read_only_file_system_simulated(setup, bundle_copy, monkeypatch, failing_call):
    """EROFS from the file system at the lock file (call 1) or in the middle of a commit."""
    runtime, updater, examples, before = setup
    real_open = commit_writes.open_file
    calls = {"count": 0}

    def read_only_open(path, flags):
        calls["count"] += 1
        if calls["count"] >= failing_call:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags)

    monkeypatch.setattr(commit_writes, "open_file", read_only_open)
    with pytest.raises(UpdateError, match="read-only or not writable.*nothing was changed"):
        updater.add_class("ring2", examples, force=True)  # past the update gate, to the file system
    monkeypatch.undo()
    assert_unchanged(bundle_copy, before, runtime)
    assert updater.add_class("ring2", examples, force=True).version == 2  # works once writable again


def count_writes(bundle: Path, tmp_path: Path, examples, monkeypatch) -> int:
    """How many low-level writes the same update makes (run on a separate copy of the bundle)."""
    import shutil

    copy = tmp_path / "count.eab"
    shutil.copytree(bundle, copy)
    real_write = commit_writes.write_all
    calls = {"count": 0}

    def counting_write(descriptor, data):
        calls["count"] += 1
        return real_write(descriptor, data)

    monkeypatch.setattr(commit_writes, "write_all", counting_write)
    HeadUpdater(Runtime.open(copy)).add_class("ring2", examples, force=True)
    monkeypatch.undo()
    return calls["count"]


@pytest.mark.parametrize("position", ["first", "third", "middle", "record", "manifest"])
def test_full_disk_simulated_at_different_points_of_the_commit(setup, bundle_copy, tmp_path, monkeypatch, position):
    """ENOSPC at the n-th low-level write: a head file, the version record or the manifest itself."""
    runtime, updater, examples, before = setup
    total = count_writes(bundle_copy, tmp_path, examples, monkeypatch)
    failing_write = {"first": 1, "third": 3, "middle": total // 2, "record": total - 1, "manifest": total}[position]
    real_write = commit_writes.write_all
    calls = {"count": 0}

    def full_disk_write(descriptor, data):
        calls["count"] += 1
        if calls["count"] == failing_write:
            os.write(descriptor, bytes(data)[: len(data) // 2])  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(descriptor, data)

    monkeypatch.setattr(commit_writes, "write_all", full_disk_write)
    with pytest.raises(UpdateError, match="no space left.*nothing was changed"):
        updater.add_class("ring2", examples, force=True)
    assert calls["count"] == failing_write
    monkeypatch.undo()
    assert_unchanged(bundle_copy, before, runtime)
    assert updater.add_class("ring2", examples, force=True).version == 2


FULL_DISK_CHILD = """
import resource, signal, sys
import numpy as np
from edgeadapt.device import HeadUpdater, Runtime, UpdateError
runtime = Runtime.open(sys.argv[1])
examples = list(np.load(sys.argv[2]))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # writes beyond the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), resource.RLIM_INFINITY))
try:
    HeadUpdater(runtime).add_class("ring2", examples, force=True)
except UpdateError as error:
    print("refused:", error)
    sys.exit(0)
print("committed")
sys.exit(1)
"""


@pytest.mark.parametrize("limit", [600, 3000])
def test_full_disk_for_real_with_a_file_size_limit(bundle_copy, test_images, tmp_path, limit):
    """The kernel refuses writes beyond RLIMIT_FSIZE: a real mid-commit write failure in a child process."""
    images, labels = test_images
    examples = tmp_path / "examples.npy"
    np.save(examples, images[labels == 4][:5])
    before = snapshot(bundle_copy)
    child = subprocess.run([sys.executable, "-c", FULL_DISK_CHILD, str(bundle_copy), str(examples), str(limit)],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stdout + child.stderr
    assert "no space left" in child.stdout and "nothing was changed" in child.stdout
    assert snapshot(bundle_copy) == before
    Bundle.open(bundle_copy)
    runtime = Runtime.open(bundle_copy)
    assert HeadUpdater(runtime).add_class("ring2", list(np.load(examples)), force=True).version == 2


def test_all_errors_share_the_base_class(setup):
    _, updater, _, _ = setup
    with pytest.raises(EdgeAdaptError):
        updater.add_class("", [])


def test_a_damaged_current_head_file_stops_the_next_update(setup, bundle_copy):
    runtime, updater, examples, _ = setup
    updater.add_class("ring2", examples, force=True)  # the updater now holds this version in memory
    damaged = bundle_copy / runtime.manifest.data["head"]["bias"]
    damaged.write_bytes(damaged.read_bytes()[:-4] + b"\0\0\0\0")
    before = snapshot(bundle_copy)
    with pytest.raises(BundleError, match="fails its sha256 check"):
        updater.add_class("ring3", examples, force=True)
    assert snapshot(bundle_copy) == before
