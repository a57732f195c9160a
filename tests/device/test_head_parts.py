"""Head parts: a device commit writes what it changes, readers assemble base + parts (device environment)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from edgeadapt.device import Bundle, HeadUpdater, Runtime
from edgeadapt.device.errors import BundleError
from edgeadapt.device.head import ClassStats
from edgeadapt.device.version_builder import ChangeAction
from edgeadapt.device.versions import VersionStore


def _current(bundle_path) -> dict:
    """The current manifest, its tables assembled from the shared segments."""
    return VersionStore(bundle_path).read_manifest().data


def _new_files(before: dict, after: dict) -> dict[str, int]:
    return {name: entry["size"] for name, entry in after["files"].items() if name not in before["files"]}


def _assert_same_state(bundle_path, runtime, stats_in_memory: ClassStats | None = None) -> None:
    reopened = Bundle.open(bundle_path, trusted_keys=False)
    head = reopened.load_head()
    np.testing.assert_array_equal(head.weights, runtime.head.weights)
    np.testing.assert_array_equal(head.bias, runtime.head.bias)
    if stats_in_memory is not None:
        stats = reopened.load_class_stats()
        np.testing.assert_array_equal(stats.sums, stats_in_memory.sums)
        np.testing.assert_array_equal(stats.counts, stats_in_memory.counts)
        if stats_in_memory.gram is not None:
            np.testing.assert_allclose(stats.gram, stats_in_memory.gram, rtol=1e-12, atol=1e-9)


def test_add_class_writes_a_small_part_and_readers_assemble_it(bundle_copy, test_images):
    images, labels = test_images
    runtime = Runtime.open(bundle_copy)
    updater = HeadUpdater(runtime, reader_grace_seconds=0.0)
    base = _current(bundle_copy)
    stats_before = Bundle.open(bundle_copy, trusted_keys=False).load_class_stats()
    embeddings = runtime.embed(images[labels == 1][:4])
    result = updater.add_class_embeddings("extra", embeddings, force=True)
    after = _current(bundle_copy)
    written = _new_files(base, after)
    assert result.action == ChangeAction.ADD_CLASS == "add-class"
    assert set(written) <= {f"heads/v{result.version}/part_{name}.npy"
                            for name in ("indices", "weights", "bias", "class_sums", "class_counts", "examples",
                                         "labels")} | {f"heads/v{result.version}/tables.json"}
    parts = after["head"]["parts"]
    assert len(parts) == 1 and parts[0]["added"] == 1 and parts[0]["rows"] == 4
    assert after["head"]["weights"] == base["head"]["weights"]  # the base files are shared, not rewritten
    # a fresh reader sees the whole head and the statistics with the new examples folded in
    expected = ClassStats.from_embeddings(embeddings, np.zeros(4, np.int64), 1)
    reopened = Bundle.open(bundle_copy, trusted_keys=False)
    stats = reopened.load_class_stats()
    assert stats.num_classes == stats_before.num_classes + 1
    np.testing.assert_allclose(stats.sums[-1], expected.sums[0], rtol=1e-12)
    if stats_before.gram is not None:
        np.testing.assert_allclose(stats.gram, stats_before.gram + expected.gram, rtol=1e-9, atol=1e-6)
    examples = reopened.load_device_examples()
    assert len(examples) == 4 and set(examples.labels.tolist()) == {stats.num_classes - 1}
    _assert_same_state(bundle_copy, runtime)
    # the version record is the manifest itself (a hard link on this file system)
    record = bundle_copy / "versions" / f"v{result.version}.json"
    assert record.read_bytes() == (bundle_copy / "manifest.json").read_bytes()


def test_strengthen_rename_compact_remove_and_rollback_over_parts(bundle_copy, test_images):
    images, labels = test_images
    runtime = Runtime.open(bundle_copy)
    updater = HeadUpdater(runtime, keep_versions=3, reader_grace_seconds=0.0)
    first = updater.add_class_embeddings("extra", runtime.embed(images[labels == 1][:4]), force=True).version
    second = updater.add_class_embeddings("more", runtime.embed(images[labels == 2][:3]), force=True).version
    updater.add_examples_embeddings("extra", runtime.embed(images[labels == 1][4:7]), force=True)
    strengthened = _current(bundle_copy)
    assert len(strengthened["head"]["parts"]) == 3 and strengthened["head"]["parts"][-1]["added"] == 0
    updater.rename_class("more", "renamed")
    renamed = _current(bundle_copy)
    assert renamed["head"]["parts"] == strengthened["head"]["parts"]  # nothing new to write but the manifest
    _assert_same_state(bundle_copy, runtime)
    # keep_versions=3 pruned the first versions' records: the base (v1) and parts they share stay on disk
    Bundle.open(bundle_copy, trusted_keys=False).verify()
    assert not (bundle_copy / "versions" / f"v{first}.json").exists()
    compacted = updater.compact()
    assert compacted.action == "compact"
    after = _current(bundle_copy)
    assert "parts" not in after["head"] and after["head"]["weights"] == f"heads/v{compacted.version}/weights.npy"
    _assert_same_state(bundle_copy, runtime)
    updater.remove_class("extra", force=True)
    assert "extra" not in [entry["name"] for entry in _current(bundle_copy)["classes"]]
    _assert_same_state(bundle_copy, runtime)
    # roll back to the version before compaction (still kept), whose files are base + parts
    kept = [info.version for info in updater.history()]
    target = max(version for version in kept if version < compacted.version)
    updater.rollback(target)
    restored = Bundle.open(bundle_copy, trusted_keys=False)
    assert restored.manifest.class_names[-1] == "renamed" and restored.manifest.data["head"]["parts"]
    _assert_same_state(bundle_copy, runtime)
    assert second < target


def test_parts_grow_until_the_compaction_threshold(bundle_copy, test_images):
    images, labels = test_images
    runtime = Runtime.open(bundle_copy)
    updater = HeadUpdater(runtime, reader_grace_seconds=0.0, compact_fraction=0.0)
    updater.add_class_embeddings("extra", runtime.embed(images[labels == 1][:4]), force=True)
    assert "parts" not in _current(bundle_copy)["head"]  # a zero fraction writes full files every time
    _assert_same_state(bundle_copy, runtime)


def test_parts_that_do_not_fit_their_base_are_refused(bundle_copy, test_images):
    images, labels = test_images
    runtime = Runtime.open(bundle_copy)
    HeadUpdater(runtime).add_class_embeddings("extra", runtime.embed(images[labels == 1][:4]), force=True)
    manifest_path = bundle_copy / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data["tables"]["head_parts"][0]["added"] = 2  # claims one more class than its files hold
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="head.parts.0..added must be"):
        Bundle.open(bundle_copy, trusted_keys=False).load_head()
    data["tables"]["head_parts"][0]["added"] = 1
    data["tables"]["head_parts"][0]["weights"] = "heads/v1/weights.npy"  # a file of another shape
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(BundleError):
        Bundle.open(bundle_copy, trusted_keys=False).load_head()


@pytest.mark.skipif(not hasattr(os, "link"), reason="needs hard links")
def test_record_is_written_as_a_copy_where_hard_links_fail(bundle_copy, test_images, monkeypatch):
    import errno

    images, labels = test_images
    runtime = Runtime.open(bundle_copy)

    def no_links(*args, **kwargs):
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    result = HeadUpdater(runtime).add_class_embeddings("extra", runtime.embed(images[labels == 1][:4]), force=True)
    record = bundle_copy / "versions" / f"v{result.version}.json"
    assert record.read_bytes() == (bundle_copy / "manifest.json").read_bytes()
    assert os.stat(record).st_nlink == 1


def test_compact_command(bundle_copy, test_images, capsys):
    from edgeadapt.device.cli import main

    images, labels = test_images
    runtime = Runtime.open(bundle_copy)
    HeadUpdater(runtime).add_class_embeddings("extra", runtime.embed(images[labels == 1][:4]), force=True)
    assert _current(bundle_copy)["head"]["parts"]
    assert main(["compact", str(bundle_copy)]) == 0
    assert "compacted the head files (1 part(s) folded in)" in capsys.readouterr().out
    assert "parts" not in _current(bundle_copy)["head"]
    _assert_same_state(bundle_copy, Runtime.open(bundle_copy))
