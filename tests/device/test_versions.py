"""Head versioning of a bundle directory: commit, history, prune, rollback, recovery, lock, readers.

Runs without TensorFlow (numpy + the interpreter only).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgeadapt.device import Bundle, ConcurrentUpdateError, HeadUpdater, InputError, Runtime, UpdateError
from edgeadapt.device.head_state import head_file_paths, refresh_runtime
from edgeadapt.device.bundle_lock import LOCK_NAME, BundleLock
from edgeadapt.device.versions import VersionStore

CRASH_WORKER = Path(__file__).with_name("test_crash_safety.py")


def examples_of(test_images, label: int, count: int = 5) -> list[np.ndarray]:
    images, labels = test_images
    return list(images[labels == label][:count])


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(item.relative_to(path)): item.read_bytes() for item in sorted(path.rglob("*"))
            if item.is_file() and item.name != LOCK_NAME}


# ----------------------------------------------------------------------------- store basics
def test_first_update_records_the_exported_version_and_history_says_what_changed(bundle_copy, test_images):
    runtime = Runtime.open(bundle_copy)
    updater = HeadUpdater(runtime)
    assert [info.version for info in updater.history()] == [1]
    updater.rename_class("ring", "donut")
    updater.add_class("ring", examples_of(test_images, 4), force=True)
    history = updater.history()
    assert [info.version for info in history] == [1, 2, 3]
    assert [info.action for info in history] == ["export", "rename-class", "add-class"]
    assert history[-1].current and not history[0].current
    assert "renamed 'ring' to 'donut'" in history[1].summary
    assert "added 'ring' from 5 example(s)" in history[2].summary
    assert (bundle_copy / "versions" / "v1.json").is_file()
    manifest = Bundle.open(bundle_copy).manifest
    assert manifest.version == 3 and manifest.data["parent_version"] == 2
    assert manifest.data["head"]["version"] == 3


def test_rename_shares_the_unchanged_head_files(bundle_copy):
    runtime = Runtime.open(bundle_copy)
    before = head_file_paths(runtime.manifest)
    HeadUpdater(runtime).rename_class("circle", "disc")
    after = Bundle.open(bundle_copy).manifest
    # nothing rewritten, files shared with v1; the only new file is the class and file tables as a
    # shared segment (written by the first device commit, see edgeadapt.device.manifest_tables)
    assert sorted(path for path in head_file_paths(after) if path != "heads/v2/tables.json") == sorted(before)
    assert after.class_names[0] == "disc"
    assert [path.name for path in (bundle_copy / "heads" / "v2").iterdir()] == ["tables.json"]


def test_keep_versions_prunes_records_and_unreferenced_head_files(bundle_copy, test_images):
    runtime = Runtime.open(bundle_copy)
    updater = HeadUpdater(runtime, keep_versions=3, reader_grace_seconds=0)
    for step in range(4):
        updater.add_class(f"extra{step}", examples_of(test_images, step % 5), force=True)
    store = VersionStore(bundle_copy)
    assert store.record_versions() == [3, 4, 5]
    assert [info.version for info in updater.history()] == [3, 4, 5]
    referenced = {name for manifest in store.kept_manifests().values() for name in manifest.files}
    on_disk = {str(path.relative_to(bundle_copy)) for path in (bundle_copy / "heads").rglob("*") if path.is_file()}
    assert on_disk == {name for name in referenced if name.startswith("heads/")}
    with pytest.raises(UpdateError, match="version 1 does not exist"):
        updater.rollback(1)


def test_keep_versions_must_allow_a_rollback(bundle_copy):
    with pytest.raises(InputError, match="at least 2"):
        VersionStore(bundle_copy, keep_versions=1)


def test_rollback_restores_head_classes_and_statistics_exactly(bundle_copy, test_images):
    runtime = Runtime.open(bundle_copy)
    original = Bundle.open(bundle_copy)
    head, stats = original.load_head(), original.load_class_stats()
    updater = HeadUpdater(runtime)
    updater.add_class("extra", examples_of(test_images, 4), force=True)
    updater.remove_class("circle")
    assert runtime.class_names[0] == "square"
    result = updater.rollback(1)
    assert result.version == 4 and result.change["to_version"] == 1 and result.change["from_version"] == 3
    restored = Bundle.open(bundle_copy)
    assert restored.manifest.class_names == original.manifest.class_names
    assert np.array_equal(restored.load_head().weights, head.weights)
    assert np.array_equal(restored.load_class_stats().sums, stats.sums)
    assert runtime.class_names == original.manifest.class_names  # the runtime follows
    assert np.array_equal(runtime.head.weights, head.weights)
    assert updater.history()[-1].summary == "rolled back to version 1"
    # a rollback shares the files of the version it restores
    assert set(head_file_paths(restored.manifest)) == set(head_file_paths(original.manifest))


def test_recover_removes_the_leftovers_of_an_interrupted_commit(bundle_copy):
    store = VersionStore(bundle_copy)
    (bundle_copy / "heads" / "v2").mkdir()
    (bundle_copy / "heads" / "v2" / "weights.npy").write_bytes(b"partial")
    (bundle_copy / "heads" / "v2" / ".bias.npy.tmp-123").write_bytes(b"partial")
    (bundle_copy / "versions").mkdir()
    (bundle_copy / "versions" / "v2.json").write_text("{}")
    (bundle_copy / ".manifest.json.tmp-99").write_text("{")
    with store.lock():
        current = store.recover()
    assert current.version == 1
    assert not (bundle_copy / "heads" / "v2").exists()
    assert not (bundle_copy / "versions" / "v2.json").exists()
    assert not (bundle_copy / ".manifest.json.tmp-99").exists()
    assert list((bundle_copy / "versions").iterdir()) == []  # recover() itself adds nothing
    Bundle.open(bundle_copy)


def test_history_needs_no_lock_and_works_on_an_exported_bundle(bundle_copy):
    with BundleLock(bundle_copy):
        history = VersionStore(bundle_copy).history()
    assert len(history) == 1 and history[0].current and history[0].action == "export"


# ----------------------------------------------------------------------------- the writer lock
def test_a_second_writer_gets_a_clear_error_or_waits(bundle_copy, test_images):
    runtime = Runtime.open(bundle_copy)
    before = snapshot(bundle_copy)
    with BundleLock(bundle_copy):
        with pytest.raises(ConcurrentUpdateError, match="another writer"):
            HeadUpdater(runtime).rename_class("circle", "disc")
        started = time.monotonic()
        with pytest.raises(ConcurrentUpdateError, match="for 0.3 s"):
            HeadUpdater(runtime, wait_for_lock=True, lock_timeout=0.3).rename_class("circle", "disc")
        assert time.monotonic() - started >= 0.25
    assert snapshot(bundle_copy) == before

    holder = BundleLock(bundle_copy)
    holder.acquire()
    releaser = threading.Timer(0.3, holder.release)
    releaser.start()
    started = time.monotonic()
    HeadUpdater(runtime, wait_for_lock=True, lock_timeout=10).rename_class("circle", "disc")
    assert time.monotonic() - started >= 0.25
    releaser.join()
    assert Bundle.open(bundle_copy).manifest.class_names[0] == "disc"


def test_lock_held_by_another_process_and_released_when_it_dies(bundle_copy):
    code = (
        "import sys, time\n"
        "from edgeadapt.device.bundle_lock import BundleLock\n"
        "lock = BundleLock(sys.argv[1]); lock.acquire(); print('locked', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(bundle_copy)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConcurrentUpdateError, match=r"process \d+"):
            BundleLock(bundle_copy).acquire()
    finally:
        holder.kill()
        holder.wait()
    with BundleLock(bundle_copy):  # the kernel dropped the dead holder's lock
        pass


# ----------------------------------------------------------------------------- concurrent readers
def test_concurrent_readers_keep_predicting_while_a_writer_commits(bundle_copy, test_images, tmp_path):
    images, labels = test_images
    examples_path = tmp_path / "examples.npy"
    np.save(examples_path, images[labels == 4][:5])
    base = Bundle.open(bundle_copy)
    base_head = base.load_head()
    base_names = base.manifest.class_names
    probe = images[:8]
    runtime = Runtime.open(bundle_copy)
    probe_embeddings = runtime.embed(probe)
    base_logits = base_head.logits(probe_embeddings)
    errors: list[str] = []
    counts = {"open": 0, "refresh": 0, "fresh-runtime": 0, "versions": set()}
    stop = threading.Event()

    def reader_bundle_open():
        while not stop.is_set():
            try:
                bundle = Bundle.open(bundle_copy, verify=True)
                head = bundle.load_head()
                names = bundle.manifest.class_names
                assert head.num_classes == len(names) and names[:5] == base_names
                logits = head.logits(probe_embeddings)
                assert np.array_equal(logits[:, :5], base_logits)  # old classes bit-identical
                counts["open"] += 1
                time.sleep(0.002)
                counts["versions"].add(bundle.manifest.version)
            except Exception as error:  # noqa: BLE001 - any failure is a test failure
                errors.append(f"bundle reader: {type(error).__name__}: {error}")

    def reader_long_lived_runtime():
        reader = Runtime.open(bundle_copy)
        while not stop.is_set():
            try:
                refresh_runtime(reader)
                predictions = reader.predict(probe, top_k=2)
                assert len(predictions) == len(probe)
                assert all(p.label in reader.class_names for row in predictions for p in row)
                counts["refresh"] += 1
                time.sleep(0.002)
            except Exception as error:  # noqa: BLE001
                errors.append(f"runtime reader: {type(error).__name__}: {error}")

    def reader_fresh_runtime():
        while not stop.is_set():
            try:
                reader = Runtime.open(bundle_copy)
                assert len(reader.predict(probe, top_k=1)) == len(probe)
                counts["fresh-runtime"] += 1
                time.sleep(0.002)
            except Exception as error:  # noqa: BLE001
                errors.append(f"fresh runtime reader: {type(error).__name__}: {error}")

    def enough() -> bool:  # every reader kept reading while the versions changed under it
        return (commits >= 5 and len(counts["versions"]) >= 3 and counts["open"] > 5 and counts["refresh"] > 5
                and counts["fresh-runtime"] > 2)

    threads = [threading.Thread(target=target) for target in
               (reader_bundle_open, reader_long_lived_runtime, reader_fresh_runtime)]
    stop_file = tmp_path / "stop-reading"
    reader_process = subprocess.Popen(
        [sys.executable, "-c", READER_PROCESS, str(bundle_copy), str(stop_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert reader_process.stdout.readline().strip() == "ready", reader_process.stderr.read()
    for thread in threads:
        thread.start()
    writer_process = subprocess.Popen(
        [sys.executable, str(CRASH_WORKER), "worker", str(bundle_copy), str(examples_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert writer_process.stdout.readline().strip() == "ready"
    # No fixed duration: the writer commits until every reader has read across several versions
    # (each commit line is the event to check on); the deadline only bounds a hung or failing run.
    commits = 0
    deadline = time.monotonic() + 240
    while not enough() and time.monotonic() < deadline:
        line = writer_process.stdout.readline()
        if not line:  # the writer died
            break
        commits += line.startswith("committed")
    reached = enough()
    writer_process.terminate()
    writer_process.wait(timeout=30)
    writer_errors = writer_process.stderr.read()
    writer_process.stdout.close()
    writer_process.stderr.close()
    stop.set()
    stop_file.touch()
    for thread in threads:
        thread.join(timeout=30)
    reader_process.wait(timeout=60)
    reader_output, reader_errors = reader_process.stdout.read(), reader_process.stderr.read()
    reader_process.stdout.close()
    reader_process.stderr.close()
    assert errors == []
    assert reached, (commits, counts, writer_errors[-2000:])
    assert reader_process.returncode == 0, reader_errors
    reads, versions_seen = (int(value) for value in reader_output.split())
    assert reads > 0 and versions_seen >= 2, reader_output  # the other process read while versions changed


READER_PROCESS = """
import sys
from pathlib import Path
import numpy as np
from edgeadapt.device import Runtime
from edgeadapt.device.head_state import refresh_runtime
runtime = Runtime.open(sys.argv[1])
images = np.zeros((4,) + runtime.input_spec.shape, np.uint8)
stop = Path(sys.argv[2])
count = 0
versions = set()
while not stop.exists():  # until the test has seen enough commits
    refresh_runtime(runtime)
    predictions = runtime.predict(images, top_k=1)
    assert len(predictions) == 4 and all(row[0].label in runtime.class_names for row in predictions)
    versions.add(runtime.manifest.version)
    if not count:
        print("ready", flush=True)
    count += 1
print(count, len(versions))
"""
