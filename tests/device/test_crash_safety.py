"""Crash safety of device updates: SIGKILL the updating process at random points, again and again.

After every kill the bundle must open with its checksums verified and hold exactly one
committed version -- the one before the interrupted update or the one after it -- never a
mix and never nothing. The next writer must clean up the leftovers and carry on.

This file is also the worker script: ``python test_crash_safety.py worker BUNDLE IMAGES.npy``
runs an endless update loop, printing ``committed N`` after each commit.
Runs without TensorFlow (numpy + the interpreter only).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

BASE_CLASSES = 5
EXTRA = "extra"
RENAMED = "extra_renamed"
KILLS = 55
MIN_INTERRUPTED = 5


# ----------------------------------------------------------------------------- the worker
def next_operation(manifest_data: dict) -> str:
    """The update the worker does next; the cycle is add -> rename -> rollback -> remove."""
    names = [entry["name"] for entry in manifest_data["classes"]]
    action = (manifest_data.get("change") or {}).get("action")
    if EXTRA not in names and RENAMED not in names:
        return "add"
    if RENAMED in names:
        return "rollback"
    if action == "rollback":
        return "remove"
    return "rename"


def run_worker(bundle: str, images_path: str, stop_after: int | None = None) -> None:
    from edgeadapt.device import Runtime
    from edgeadapt.device import HeadUpdater

    images = np.load(images_path)
    runtime = Runtime.open(bundle)
    updater = HeadUpdater(runtime, keep_versions=3, wait_for_lock=True, lock_timeout=30)
    print("ready", flush=True)
    done = 0
    while stop_after is None or done < stop_after:
        data = runtime.manifest.data
        operation = next_operation(data)
        if operation == "add":
            result = updater.add_class(EXTRA, list(images), force=True)
        elif operation == "rename":
            result = updater.rename_class(EXTRA, RENAMED)
        elif operation == "rollback":
            result = updater.rollback(int(data["parent_version"]))
        else:
            result = updater.remove_class(EXTRA, force=True)
        print(f"committed {result.version}", flush=True)
        done += 1


# ----------------------------------------------------------------------------- checks
def check_consistent(bundle_path: Path, base_weights: np.ndarray, base_names: list[str]) -> int:
    """Open and verify the bundle; check it is one whole, valid version. Returns its version."""
    from edgeadapt.device import Bundle
    from edgeadapt.device.head_state import load_state

    bundle = Bundle.open(bundle_path, verify=True)  # every listed file present with its sha256
    manifest = bundle.manifest
    state = load_state(bundle_path, manifest)
    names = manifest.class_names
    assert names[:BASE_CLASSES] == base_names
    assert names[BASE_CLASSES:] in ([], [EXTRA], [RENAMED]), names
    assert state.head.num_classes == len(names)
    assert np.array_equal(state.head.weights[:, :BASE_CLASSES], base_weights)
    if state.stats is not None:
        assert state.stats.num_classes == len(names)
    record = bundle_path / "versions" / f"v{manifest.version}.json"
    if record.is_file():  # the history copy of the current version is the same document
        assert json.loads(record.read_text()) == json.loads((bundle_path / "manifest.json").read_text())
        assert json.loads(record.read_text()) == manifest.stored_document()
    return manifest.version


def operation_under_way(bundle_path: Path) -> str:
    """The update a worker runs after the version now on disk (a worker decides from its last commit)."""
    from edgeadapt.device.versions import VersionStore

    return next_operation(VersionStore(bundle_path).read_manifest().data)


def has_leftovers(bundle_path: Path) -> bool:
    """True when an interrupted commit left files behind (the kill landed inside a commit)."""
    from edgeadapt.device.versions import VersionStore

    store = VersionStore(bundle_path)
    current = store.read_manifest().version
    if any(number > current for number in store.record_versions()):
        return True
    if any(bundle_path.rglob(".*tmp-*")):
        return True
    referenced = referenced_files(bundle_path)
    return any(str(path.relative_to(bundle_path)) not in referenced
               for path in (bundle_path / "heads").rglob("*") if path.is_file())


def referenced_files(bundle_path: Path) -> set[str]:
    from edgeadapt.device.versions import VersionStore

    store = VersionStore(bundle_path)
    return {name for manifest in store.kept_manifests().values() for name in manifest.files}


# ----------------------------------------------------------------------------- the test
# 55 kills take ~20 s: marked slow, it runs once per CI run, in the host environment's `pytest -m slow`
# step (the device environments run the fast suite). It needs no TensorFlow either way.
@pytest.mark.slow
def test_sigkill_at_random_points_never_leaves_a_broken_bundle(bundle_copy, test_images, tmp_path):
    from edgeadapt.device import Bundle
    from edgeadapt.device import Runtime
    from edgeadapt.device.versions import VersionStore

    images, labels = test_images
    examples_path = tmp_path / "examples.npy"
    np.save(examples_path, images[labels == 4][:5])
    base = Bundle.open(bundle_copy)
    base_weights = base.load_head().weights.copy()
    base_names = base.manifest.class_names
    rng = random.Random(1234)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                            os.environ.get("PYTHONPATH")]))}
    last_version = 1
    kills = commits_seen = in_between = interrupted = 0
    durations: dict[str, list[float]] = {}  # seconds from one commit to the next, by operation
    started = time.monotonic()
    # Commits got fast (tens of ms), so a kill lands inside one only now and then: aim at the commit
    # point of the operation under way, and go on past KILLS (up to 3x) until enough kills landed inside.
    while kills < KILLS or (interrupted < MIN_INTERRUPTED and kills < 3 * KILLS):
        worker = subprocess.Popen(
            [sys.executable, __file__, "worker", str(bundle_copy), str(examples_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
        )
        ready = worker.stdout.readline()
        if ready.strip() != "ready":
            worker.kill()
            pytest.fail(f"worker did not start: {ready!r} {worker.stderr.read()}")
        # Let it commit 0-2 times (so the test adapts to a slow or busy machine), then kill it
        # after a random fraction of one more commit's duration.
        seen = []
        mark = time.monotonic()
        operation = operation_under_way(bundle_copy)
        for _ in range(rng.randint(0, 2)):
            seen.append(worker.stdout.readline())
            now = time.monotonic()
            durations.setdefault(operation, []).append(now - mark)
            mark = now
            operation = operation_under_way(bundle_copy)
        recent = durations.get(operation, [])[-20:]
        typical = float(np.median(recent)) if recent else 0.05
        # most kills near the end of the operation (where its commit is), some anywhere in it
        fraction = rng.uniform(0.6, 1.3) if rng.random() < 0.75 else rng.uniform(0.0, 1.0)
        time.sleep(fraction * typical)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
        # read through the same buffered streams readline() used (communicate() would skip their buffers)
        output = "".join(seen) + worker.stdout.read()
        errors = worker.stderr.read()
        worker.stdout.close()
        worker.stderr.close()
        interrupted += has_leftovers(bundle_copy)
        assert worker.returncode == -signal.SIGKILL, errors
        kills += 1
        committed = [int(line.split()[1]) for line in output.splitlines() if line.startswith("committed")]
        reported = committed[-1] if committed else last_version
        commits_seen += len(committed)
        version = check_consistent(bundle_copy, base_weights, base_names)
        # the version on disk is the last one the worker reported, or the one it was committing
        assert version in (reported, reported + 1), (version, reported, output, errors[-2000:])
        in_between += version == reported + 1
        last_version = version
    elapsed = time.monotonic() - started
    assert commits_seen >= KILLS // 2, "the workers were killed before committing much; the test proves little"
    assert interrupted >= MIN_INTERRUPTED, "too few kills landed inside a commit; the test proves little"
    # the next writer recovers: leftovers of interrupted commits are gone, and it can commit
    store = VersionStore(bundle_copy, keep_versions=3)
    with store.lock():
        store.recover()
    leftovers = [str(path.relative_to(bundle_copy)) for path in (bundle_copy / "heads").rglob("*")
                 if path.is_file() and str(path.relative_to(bundle_copy)) not in referenced_files(bundle_copy)]
    assert leftovers == []
    temporary = [path.name for path in bundle_copy.rglob(".*tmp-*")]
    assert temporary == []
    assert all(number <= last_version for number in store.record_versions())
    run_worker_once(bundle_copy, examples_path)
    runtime = Runtime.open(bundle_copy)
    assert len(runtime.predict(images[:3], top_k=1)) == 3
    print(f"{kills} kills, {commits_seen} commits, {interrupted} kills left a partial version behind, "
          f"{in_between} landed after the commit point but before the worker reported it, {elapsed:.1f} s")


def run_worker_once(bundle_path: Path, examples_path: Path) -> None:
    run_worker(str(bundle_path), str(examples_path), stop_after=2)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        run_worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python test_crash_safety.py worker BUNDLE IMAGES.npy")
