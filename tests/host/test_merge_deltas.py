"""Fleet round trip: devices export deltas, ``edgeadapt merge-deltas`` folds them into a new bundle."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgeadapt import MergeDeltasOptions, merge_deltas
from edgeadapt.bundles.deltas import parse_renames
from edgeadapt import Bundle, BundleError, HeadUpdater, IncompatibleModelError, InputError, Runtime


@pytest.fixture(scope="module")
def train_images(fixture_dir):
    return np.load(fixture_dir / "train_images.npy"), np.load(fixture_dir / "train_labels.npy")


@pytest.fixture
def base_without_ring(fixture_dir, tmp_path) -> Path:
    """The tiny bundle without 'ring' and 'cross' (the classes the devices will learn)."""
    path = tmp_path / "base.eab"
    shutil.copytree(fixture_dir / "tiny.eab", path)
    updater = HeadUpdater(Runtime.open(path))
    updater.remove_class("ring")
    updater.remove_class("cross")
    return path


def device_delta(base: Path, directory: Path, name: str, classes: dict[str, np.ndarray], strengthen=None) -> Path:
    device = directory / f"{name}.eab"
    shutil.copytree(base, device)
    updater = HeadUpdater(Runtime.open(device))
    for class_name, examples in classes.items():
        updater.add_class(class_name, list(examples), force=True)
    for class_name, examples in (strengthen or {}).items():
        updater.add_examples(class_name, list(examples), force=True)
    return updater.export_delta(directory / f"{name}.eadelta", source=name)


def test_merge_two_device_deltas_into_a_new_version(base_without_ring, train_images, test_images, tmp_path, fixture_info):
    images, labels = train_images
    first = device_delta(base_without_ring, tmp_path, "dev1", {"ring": images[labels == 4][:5]},
                         strengthen={"circle": images[labels == 0][:3]})
    second = device_delta(base_without_ring, tmp_path, "dev2", {"cross": images[labels == 3][:5]})
    report = merge_deltas(base_without_ring, [first, second], tmp_path / "merged.eab")
    assert [entry["name"] for entry in report.added] == ["ring", "cross"]
    assert report.strengthened == [{"name": "circle", "examples": 3, "sources": ["dev1"]}]
    base = Bundle.open(base_without_ring)
    merged = Bundle.open(tmp_path / "merged.eab")
    assert merged.manifest.version == base.manifest.version + 1
    assert merged.manifest.data["parent_version"] == base.manifest.version
    assert merged.manifest.class_names == ["circle", "square", "triangle", "ring", "cross"]
    entries = merged.manifest.data["classes"]
    assert entries[3]["origin"] == "device-added" and entries[3]["source"] == "dev1" and entries[4]["source"] == "dev2"
    assert merged.manifest.data["change"]["action"] == "merge-deltas"
    old, new = base.load_head(), merged.load_head()
    assert np.array_equal(new.weights[:, 1:3], old.weights[:, 1:3])  # untouched classes: bit-identical rows
    assert merged.load_class_stats().counts[0] == base.load_class_stats().counts[0] + 3
    base_references = base.load_reference_embeddings()
    base_count = 0 if base_references is None else len(base_references)
    assert len(merged.load_reference_embeddings()) == base_count + 10  # the merged classes bring gate references
    # the merged bundle classifies the devices' classes
    test_x, test_y = test_images
    runtime = Runtime.open(tmp_path / "merged.eab")
    names = np.array(fixture_info["class_names"])[test_y]
    predicted = np.array(runtime.class_names)[runtime.logits(test_x).argmax(axis=1)]
    assert np.mean(predicted == names) >= 0.85
    # ... and the merged bundle can be updated on a device again
    HeadUpdater(runtime).rename_class("cross", "plus")


def test_merged_version_keeps_the_ridge_state_only_when_the_base_has_it(fixture_dir, train_images, tmp_path):
    from ridge_support import rewrite_ridge_state, ridge_files

    images, labels = train_images
    plain = tmp_path / "plain.eab"
    shutil.copytree(fixture_dir / "tiny.eab", plain)
    stored = rewrite_ridge_state(plain, tmp_path / "stored.eab")
    for base in (plain, stored):
        delta = device_delta(base, tmp_path / base.stem, "dev", {"extra": images[labels == 4][:5]})
        merge_deltas(base, [delta], tmp_path / f"merged-{base.stem}.eab", MergeDeltasOptions(force=True))
    assert ridge_files(tmp_path / "merged-plain.eab") == []
    merged = Bundle.open(tmp_path / "merged-stored.eab")
    assert ridge_files(merged.path) and merged.load_class_stats().ridge_basis is not None


def test_merge_recomputes_rows_like_the_device_did(base_without_ring, train_images, tmp_path):
    images, labels = train_images
    delta = device_delta(base_without_ring, tmp_path, "dev1", {"ring": images[labels == 4][:5]})
    merge_deltas(base_without_ring, [delta], tmp_path / "merged.eab")
    device_head = Bundle.open(tmp_path / "dev1.eab").load_head()
    merged_head = Bundle.open(tmp_path / "merged.eab").load_head()
    np.testing.assert_allclose(merged_head.weights, device_head.weights, rtol=1e-5, atol=1e-6)
    merge_deltas(base_without_ring, [delta], tmp_path / "rows.eab", MergeDeltasOptions(use_device_rows=True))
    assert np.array_equal(Bundle.open(tmp_path / "rows.eab").load_head().weights[:, -1], device_head.weights[:, -1])


def test_name_clashes_are_never_resolved_silently(base_without_ring, train_images, tmp_path):
    images, labels = train_images
    first = device_delta(base_without_ring, tmp_path, "dev1", {"ring": images[labels == 4][:5]})
    second = device_delta(base_without_ring, tmp_path, "dev2",
                          {"ring": images[labels == 4][5:10], "squares": images[labels == 1][:4]})
    third = device_delta(base_without_ring, tmp_path, "dev3", {"ring": images[labels == 4][10:12]})
    with pytest.raises(InputError, match=r"'ring' from delta 2 \(dev2\) already exists in another delta.*--on-clash"):
        merge_deltas(base_without_ring, [first, second], tmp_path / "out.eab")
    assert not (tmp_path / "out.eab").exists()

    # dev2's "squares" are images of the old class "square": the update gate refuses such a merge by
    # default (see test_merge_gate_refuses_a_class_that_takes_old_predictions); forced here to test naming
    merged = merge_deltas(base_without_ring, [first, second, third], tmp_path / "merge.eab",
                          MergeDeltasOptions(on_clash="merge", force=True))
    assert [(entry["name"], entry["examples"], entry["sources"]) for entry in merged.added] == [
        ("ring", 12, ["dev1", "dev2", "dev3"]), ("squares", 4, ["dev2"])]

    renamed = merge_deltas(base_without_ring, [first, second], tmp_path / "rename.eab",
                           MergeDeltasOptions(on_clash="rename", force=True))
    assert [entry["name"] for entry in renamed.added] == ["ring", "ring@dev2", "squares"]

    skipped = merge_deltas(base_without_ring, [first, second], tmp_path / "skip.eab", MergeDeltasOptions(on_clash="skip", force=True))
    assert [entry["name"] for entry in skipped.added] == ["ring", "squares"]
    assert skipped.skipped[0]["name"] == "ring" and skipped.skipped[0]["source"] == "dev2"

    explicit = merge_deltas(base_without_ring, [first, second], tmp_path / "explicit.eab",
                            MergeDeltasOptions(renames=parse_renames(["2:ring=hoop", "squares=boxes"]), force=True))
    assert [entry["name"] for entry in explicit.added] == ["ring", "hoop", "boxes"]


def test_a_delta_class_named_like_a_bundle_class(base_without_ring, train_images, tmp_path):
    images, labels = train_images
    delta = device_delta(base_without_ring, tmp_path, "dev1", {"ring": images[labels == 4][:5]})
    # the host bundle meanwhile got its own "ring"
    host = tmp_path / "host.eab"
    shutil.copytree(base_without_ring, host)
    HeadUpdater(Runtime.open(host)).add_class("ring", list(images[labels == 4][20:30]), force=True)
    with pytest.raises(InputError, match="already exists in the bundle"):
        merge_deltas(host, [delta], tmp_path / "out.eab")
    report = merge_deltas(host, [delta], tmp_path / "out.eab", MergeDeltasOptions(on_clash="merge"))
    assert report.added == [] and report.strengthened[0]["name"] == "ring"
    assert Bundle.open(tmp_path / "out.eab").manifest.class_names.count("ring") == 1


def test_deltas_from_another_backbone_or_damaged_are_refused(base_without_ring, train_images, tmp_path):
    images, labels = train_images
    delta = device_delta(base_without_ring, tmp_path, "dev1", {"ring": images[labels == 4][:5]})
    with zipfile.ZipFile(delta) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    info = json.loads(members["delta.json"])
    info["backbone_fingerprint"] = "sha256:" + "0" * 64
    foreign = tmp_path / "foreign.eadelta"
    with zipfile.ZipFile(foreign, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, json.dumps(info) if name == "delta.json" else data)
    with pytest.raises(IncompatibleModelError, match="another backbone|was made with backbone"):
        merge_deltas(base_without_ring, [foreign], tmp_path / "out.eab")
    damaged = tmp_path / "damaged.eadelta"
    with zipfile.ZipFile(damaged, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data[:-8] + b"\0" * 8 if name == "weights.npy" else data)
    with pytest.raises(BundleError, match="fails its checksum"):
        merge_deltas(base_without_ring, [damaged], tmp_path / "out.eab")
    not_a_delta = tmp_path / "text.eadelta"
    not_a_delta.write_text("hello")
    with pytest.raises(BundleError, match="not a delta file"):
        merge_deltas(base_without_ring, [not_a_delta], tmp_path / "out.eab")
    with pytest.raises(InputError, match="refers to delta 3"):
        merge_deltas(base_without_ring, [delta], tmp_path / "out.eab", MergeDeltasOptions(renames={"3:ring": "x"}))
    assert not (tmp_path / "out.eab").exists()


def test_merge_deltas_cli(base_without_ring, train_images, tmp_path, capsys):
    from edgeadapt.cli import main

    images, labels = train_images
    first = device_delta(base_without_ring, tmp_path, "dev1", {"ring": images[labels == 4][:5]})
    second = device_delta(base_without_ring, tmp_path, "dev2", {"ring": images[labels == 4][5:10]})
    out = tmp_path / "new.eab"
    assert main(["merge-deltas", str(base_without_ring), str(first), str(second), "--out", str(out)]) == 1
    assert "class name clashes" in capsys.readouterr().err
    assert main(["merge-deltas", str(base_without_ring), str(first), str(second), "--out", str(out),
                 "--rename", "2:ring=hoop", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [entry["name"] for entry in report["added"]] == ["ring", "hoop"]
    assert Bundle.open(out).manifest.class_names[-2:] == ["ring", "hoop"]
