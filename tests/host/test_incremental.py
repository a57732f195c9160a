"""Adding classes and merging heads on the host (new bundle versions), and the class-incremental benchmark."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from edgeadapt import cli
from edgeadapt.data.image_folders import write_image_folder
from edgeadapt.device import Bundle, Runtime
from edgeadapt import BundleError, IncompatibleModelError, InputError
from edgeadapt.device.incremental import STATISTICS_FREE_METHOD, AddClassOptions, remove_class
from edgeadapt import add_classes, merge_heads
from edgeadapt.bundles.incremental import NamedHead
from edgeadapt.bundles.version_writing import write_version

NEW = ["cross", "ring"]


def snapshot(path: Path) -> dict[str, str]:
    return {str(file.relative_to(path)): hashlib.sha256(file.read_bytes()).hexdigest()
            for file in sorted(path.rglob("*")) if file.is_file()}


@pytest.fixture(scope="module")
def train_images(fixture_dir):
    return np.load(fixture_dir / "train_images.npy"), np.load(fixture_dir / "train_labels.npy")


@pytest.fixture(scope="module")
def base_bundle(fixture_dir, tmp_path_factory) -> Path:
    """The tiny bundle without 'cross' and 'ring' (version 2), written through write_version."""
    parent = Bundle.open(fixture_dir / "tiny.eab")
    head, stats = parent.load_head(), parent.load_class_stats()
    names = parent.manifest.class_names
    for name in reversed(NEW):
        head, stats = remove_class(head, stats, names.index(name))
    classes = [dict(entry) for entry in parent.manifest.data["classes"] if entry["name"] not in NEW]
    for index, entry in enumerate(classes):
        entry["index"] = index
    path = tmp_path_factory.mktemp("base") / "base.eab"
    write_version(parent, head, stats, classes, path, {"action": "test-remove", "classes": NEW})
    return path


@pytest.fixture(scope="module")
def new_class_folder(train_images, fixture_dir, tmp_path_factory) -> Path:
    images, labels = train_images
    names = json.loads((fixture_dir / "info.json").read_text())["class_names"]
    keep = np.isin(labels, [names.index(name) for name in NEW])
    folder = tmp_path_factory.mktemp("new") / "photos"
    relabelled = np.array([NEW.index(names[label]) for label in labels[keep]])
    return write_image_folder(folder, NEW, images[keep], relabelled)


@pytest.fixture(scope="module")
def old_class_folder(train_images, fixture_dir, tmp_path_factory) -> Path:
    images, labels = train_images
    names = json.loads((fixture_dir / "info.json").read_text())["class_names"]
    old_names = [name for name in names if name not in NEW]
    keep = np.isin(labels, [names.index(name) for name in old_names])
    folder = tmp_path_factory.mktemp("old") / "photos"
    relabelled = np.array([old_names.index(names[label]) for label in labels[keep]])
    return write_image_folder(folder, old_names, images[keep], relabelled)


def relabel_test(test_images, fixture_dir, order: list[str]):
    images, labels = test_images
    names = json.loads((fixture_dir / "info.json").read_text())["class_names"]
    return images, np.array([order.index(names[label]) for label in labels])


# ----------------------------------------------------------------------------- add classes
def test_add_classes_writes_a_new_version_with_old_rows_bit_identical(
        base_bundle, new_class_folder, test_images, fixture_dir, tmp_path):
    before = snapshot(base_bundle)
    output = tmp_path / "v3.eab"
    result = add_classes(base_bundle, new_class_folder, output, classes=NEW)
    assert snapshot(base_bundle) == before, "the parent bundle must not change"
    parent, child = Bundle.open(base_bundle), Bundle.open(output)
    assert result.old_rows_unchanged and result.resolved is None
    assert child.manifest.version == parent.manifest.version + 1 == result.version
    assert child.manifest.data["parent_version"] == parent.manifest.version
    assert child.manifest.class_names == parent.manifest.class_names + NEW
    for entry in child.manifest.data["classes"][-2:]:
        assert entry["origin"] == "host-added" and entry["added_at"] and entry["examples"] > 0
        assert entry["added_in_version"] == child.manifest.version
    assert child.manifest.data["change"]["action"] == "host-add-classes"
    for model in parent.manifest.models:  # backbone copied unchanged, through the writer (checksummed)
        assert child.manifest.files[model["file"]]["sha256"] == parent.manifest.files[model["file"]]["sha256"]
    statistics = child.manifest.data["head"]["statistics"]
    assert statistics["bytes_per_class"] == 8 * 64 + 8 and statistics["bytes_shared"] == 8 * 64 * 64
    assert child.load_class_stats().num_classes == 5

    order = parent.manifest.class_names + NEW
    images, labels = relabel_test(test_images, fixture_dir, order)
    old_runtime, new_runtime = Runtime.open(base_bundle), Runtime.open(output)
    old_logits, new_logits = old_runtime.logits(images), new_runtime.logits(images)
    assert np.array_equal(new_logits[:, :3], old_logits), "old-class logits must be bit-identical"
    predictions = new_logits.argmax(axis=1)
    old = labels < 3
    before_old = np.mean(old_logits[old].argmax(1) == labels[old])
    assert np.mean(predictions[old] == labels[old]) >= before_old - 0.1
    assert np.mean(predictions[~old] == labels[~old]) >= 0.6
    assert np.mean(predictions == labels) >= 0.75


def test_add_classes_resolve_is_labelled(base_bundle, new_class_folder, tmp_path):
    result = add_classes(base_bundle, new_class_folder, tmp_path / "r.eab", classes=NEW, resolve=True)
    assert result.resolved == "statistics" and not result.old_rows_unchanged
    change = Bundle.open(tmp_path / "r.eab").manifest.data["change"]
    assert change["resolved"] == "statistics" and change["old_rows_unchanged"] is False


def test_add_classes_cli(base_bundle, new_class_folder, tmp_path, capsys):
    output = tmp_path / "cli.eab"
    status = cli.main(["add-classes", str(base_bundle), "--data", str(new_class_folder), "--classes", "cross,ring",
                       "--method", "ridge", "--out", str(output)])
    assert status == 0, capsys.readouterr()
    assert "bit-identical to the parent: yes" in capsys.readouterr().out
    assert Bundle.open(output).manifest.class_names[-2:] == NEW
    status = cli.main(["add-classes", str(base_bundle), "--data", str(new_class_folder), "--classes", "cross",
                       "--out", str(output)])
    assert status == 1 and "already exists" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input
def test_name_already_present_is_refused(base_bundle, train_images, tmp_path):
    images, _ = train_images
    output = tmp_path / "out.eab"
    with pytest.raises(InputError, match="already exist"):
        add_classes(base_bundle, {"circle": images[:3]}, output)
    assert not output.exists()


def test_class_with_zero_images_is_refused(base_bundle, new_class_folder, tmp_path):
    output = tmp_path / "out.eab"
    with pytest.raises(InputError, match="zero"):
        add_classes(base_bundle, {"mug": np.zeros((0, 32, 32, 3), np.uint8)}, output)
    empty = tmp_path / "folder"
    (empty / "mug").mkdir(parents=True)
    with pytest.raises(InputError, match="no images"):
        add_classes(base_bundle, empty, output)
    assert not output.exists()


def test_mismatched_embedding_size_and_nan_are_refused(base_bundle, tmp_path):
    output = tmp_path / "out.eab"
    with pytest.raises(InputError, match="65"):
        add_classes(base_bundle, {"mug": np.ones((4, 65), np.float32)}, output)
    bad = np.ones((4, 64), np.float32)
    bad[1, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        add_classes(base_bundle, {"mug": bad}, output)
    bad[1, 3] = np.inf
    with pytest.raises(InputError, match="infinite"):
        add_classes(base_bundle, {"mug": bad}, output)
    assert not output.exists()


def test_missing_statistics_say_what_to_do_and_replay_fixes_it(
        base_bundle, new_class_folder, old_class_folder, tmp_path):
    parent = Bundle.open(base_bundle)
    without = tmp_path / "nostats.eab"
    write_version(parent, parent.load_head(), None, [dict(e) for e in parent.manifest.data["classes"]], without,
                  {"action": "test-drop-statistics"})
    output = tmp_path / "out.eab"
    with pytest.raises(IncompatibleModelError, match="'ridge' needs class statistics") as error:
        add_classes(without, new_class_folder, output, classes=NEW, options=AddClassOptions(method="ridge"))
    assert "--data" in str(error.value)
    assert not output.exists()
    # without a chosen method, the bundle learns with the statistics-free method (issue 11)
    automatic = add_classes(without, new_class_folder, tmp_path / "automatic.eab", classes=NEW)
    assert automatic.method == STATISTICS_FREE_METHOD and automatic.old_rows_unchanged
    result = add_classes(without, new_class_folder, output, classes=NEW, replay=old_class_folder)
    assert result.old_rows_unchanged and any("replay" in note for note in result.notes)
    assert Bundle.open(output).load_class_stats().num_classes == 5
    # a method that needs no statistics works without them (and the new version has none either)
    aligned = add_classes(without, new_class_folder, tmp_path / "aligned.eab", classes=NEW,
                          options=AddClassOptions(method="weight_align"))
    assert aligned.old_rows_unchanged and Bundle.open(tmp_path / "aligned.eab").load_class_stats() is None


def test_existing_output_is_refused(base_bundle, new_class_folder, tmp_path):
    output = tmp_path / "taken.eab"
    output.mkdir()
    with pytest.raises(BundleError, match="already exists"):
        add_classes(base_bundle, new_class_folder, output, classes=NEW)


def test_host_add_classes_keeps_the_ridge_state_only_when_the_parent_has_it(base_bundle, new_class_folder, tmp_path):
    """The solver state follows the parent: a bundle exported without it stays without, one with it keeps it."""
    from ridge_support import rewrite_ridge_state, ridge_files

    plain = tmp_path / "plain.eab"
    add_classes(base_bundle, new_class_folder, plain, classes=NEW, options=AddClassOptions(method="ridge"))
    assert ridge_files(base_bundle) == ridge_files(plain) == []
    assert "ridge_basis" not in Bundle.open(plain).manifest.data["head"]["statistics"]

    parent = rewrite_ridge_state(base_bundle, tmp_path / "base-ridge.eab")  # as an export with the state writes it
    assert ridge_files(parent)
    kept = tmp_path / "kept.eab"
    add_classes(parent, new_class_folder, kept, classes=NEW)
    child = Bundle.open(kept)
    section = child.manifest.data["head"]["statistics"]["ridge_basis"]
    assert section["classes"] == 3 and section["updates"] == 2  # the parent's state, having served two classes
    assert len(ridge_files(kept)) == len(ridge_files(parent))
    carried, stored = child.load_class_stats().ridge_basis, Bundle.open(parent).load_class_stats().ridge_basis
    assert np.array_equal(carried.discriminant_inverse, stored.discriminant_inverse)


# ----------------------------------------------------------------------------- merge heads
def test_merge_heads(base_bundle, new_class_folder, test_images, fixture_dir, tmp_path):
    from edgeadapt import ClassStats
    from edgeadapt.training.head_training import HeadTrainingOptions, train_head
    from edgeadapt.bundles.incremental_inputs import folder_examples

    parent = Bundle.open(base_bundle)
    runtime = Runtime.open(base_bundle)
    examples = folder_examples(new_class_folder, NEW)
    embeddings = [runtime.embed([str(path) for path in examples[name]]) for name in NEW]
    labels = np.concatenate([np.full(len(part), index) for index, part in enumerate(embeddings)])
    stacked = np.concatenate(embeddings)
    two_class = train_head(stacked, labels, 2, HeadTrainingOptions(normalization="center"))
    stats = ClassStats.from_embeddings(stacked, labels, 2)
    other = NamedHead(two_class, NEW, stats, backbone_fingerprint=parent.manifest.backbone_fingerprint,
                      source="two-class head")

    result = merge_heads(base_bundle, other, tmp_path / "merged.eab")
    merged = Bundle.open(tmp_path / "merged.eab")
    assert result.old_rows_unchanged and merged.manifest.class_names[-2:] == NEW
    assert merged.manifest.data["classes"][-1]["source"] == "merged from two-class head"
    images, test_labels = relabel_test(test_images, fixture_dir, parent.manifest.class_names + NEW)
    merged_logits = Runtime.open(tmp_path / "merged.eab").logits(images)
    assert np.array_equal(merged_logits[:, :3], runtime.logits(images))
    assert np.mean(merged_logits.argmax(1) == test_labels) >= 0.75

    stranger = NamedHead(two_class, NEW, stats, backbone_fingerprint="sha256:" + "0" * 64)
    with pytest.raises(IncompatibleModelError, match="different backbones"):
        merge_heads(base_bundle, stranger, tmp_path / "never.eab")
    assert not (tmp_path / "never.eab").exists()
    with pytest.raises(InputError, match="exist in both"):
        merge_heads(base_bundle, NamedHead(two_class, ["circle", "x"], stats), tmp_path / "never.eab")
    status = cli.main(["merge-heads", str(base_bundle), str(tmp_path / "merged.eab"), "--out", str(tmp_path / "x")])
    assert status == 1  # every class of the second bundle's base already exists in the first


# ----------------------------------------------------------------------------- benchmark
@pytest.mark.slow
def test_class_incremental_benchmark_on_builtin_data(tmp_path):
    """Built-in shapes, base 4 + 2 new, one order: accuracy floors and the append-only guarantee."""
    pytest.importorskip("tensorflow")
    from edgeadapt.training.backbones import BackboneOptions
    from edgeadapt.benchmarks.incremental import IncrementalBenchmarkOptions, run_incremental_benchmark
    from edgeadapt.benchmarks.incremental_measure import ALL_SHOTS, JOINT

    backbone = BackboneOptions(stem_filters=16, blocks=(("conv", 16, 1), ("conv", 16, 2), ("conv", 32, 1),
                                                        ("conv", 32, 2), ("separable", 64, 1)))
    from build_fixtures import deterministic_tensorflow

    options = IncrementalBenchmarkOptions(base=4, step=2, orders=1, shots=(5, ALL_SHOTS), image_size=32, epochs=10,
                                          backbone=backbone, synthetic_images_per_class=150)
    with deterministic_tensorflow():  # the same backbone every run: the floors below cannot be luck
        report = run_incremental_benchmark(options)
    rows = {(row["shots"], row["method"]): row["mean"] for row in report.rows}
    joint = rows[(ALL_SHOTS, JOINT)]
    ridge_all, ridge_five = rows[(ALL_SHOTS, "ridge")], rows[(5, "ridge")]
    # the fair measure (harmonic mean of old-class accuracy and new-class recall), measured with deterministic
    # training: joint 0.896; ridge with all new images 0.747 (old 0.955, new recall 0.614; 0.833 of the joint),
    # ridge 5 shots 0.659 (old 0.966, new recall 0.500). One order, 132 test images: a point is ~1.3 images.
    assert ridge_all["harmonic_mean"] >= 0.7 and ridge_all["ratio_to_joint"] >= 0.78
    assert ridge_all["old_drop"] <= 0.1
    assert ridge_five["harmonic_mean"] >= 0.6 and ridge_five["new"] >= 0.4
    assert joint["ratio_to_joint"] == 1.0
    assert rows[(ALL_SHOTS, "none")]["old"] < ridge_all["old"]  # the uncalibrated lower bound forgets
    assert all(row["old_logits_identical"] for row in report.rows
               if row["old_logits_identical"] is not None and row["method"] != "resolve_all")
    text = report.table()
    assert "claim (default)" in text and "ridge " in text and "figures (targets of docs/INCREMENTAL.md)" in text
    report.write_json(tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text())["rows"]


def _rebind_backbone(bundle: Path, fingerprint: str) -> None:
    """Give a bundle copy another backbone fingerprint (the manifest is not itself checksummed)."""
    manifest_path = bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["backbone"]["fingerprint"] = fingerprint
    manifest["head"]["backbone_fingerprint"] = fingerprint
    manifest_path.write_text(json.dumps(manifest, indent=2))


def test_class_incremental_benchmark_with_a_bundle_backbone(bundle_copy, tmp_path):
    """backbone_bundle: the bundle's backbone embeds through the device Runtime, cached per backbone."""
    import dataclasses

    from edgeadapt.benchmarks.incremental import IncrementalBenchmarkOptions, run_incremental_benchmark
    from edgeadapt.benchmarks.incremental_data import BundleBackbone, load_dataset, order_embeddings
    from edgeadapt.benchmarks.incremental_measure import ALL_SHOTS

    cache = tmp_path / "cache"
    options = IncrementalBenchmarkOptions(base=3, step=2, orders=1, shots=(5, ALL_SHOTS), methods=("claim", "ridge", "none"),
                                          synthetic_classes=5, synthetic_images_per_class=40, cache=cache,
                                          backbone_bundle=bundle_copy)
    report = run_incremental_benchmark(options)
    fingerprint = Bundle.open(bundle_copy).manifest.backbone_fingerprint
    assert {(row["shots"], row["method"]) for row in report.rows} >= {(5, "ridge"), (ALL_SHOTS, "joint")}
    assert {check["name"] for check in report.figures["checks"]} >= {"five_shots_ratio", "old_logits_identical"}
    assert report.backbone["kind"] == "bundle" and report.backbone["fingerprint"] == fingerprint
    assert report.orders[0]["backbone"] == "bundle" and not report.orders[0]["cached"]
    assert "pretrained, from bundle" in report.table()
    assert len(list(cache.glob("order-*.npz"))) == 1

    # the embeddings are the device Runtime's, on images prepared for the bundle's input spec
    bundle = BundleBackbone.open(bundle_copy)
    dataset = load_dataset(options, bundle.spec)
    data = order_embeddings(dataclasses.replace(options, cache=None), dataset, 0, [4, 0, 2, 1, 3], bundle=bundle)
    subset = dataset.select_classes(data.class_names)
    with Runtime.open(bundle_copy) as runtime:
        np.testing.assert_array_equal(data.test[0], runtime.embed(subset.test.images))
    np.testing.assert_array_equal(data.test[1], subset.test.labels)
    bundle.close()
    with pytest.raises(InputError, match="built-in backbone"):
        IncrementalBenchmarkOptions(backbone_bundle=bundle_copy, epochs=3)

    # same bundle: read from the cache; another backbone fingerprint: another cache entry
    assert run_incremental_benchmark(options).orders[0]["cached"]
    _rebind_backbone(bundle_copy, "sha256:" + "0" * 64)
    other = run_incremental_benchmark(options)
    assert not other.orders[0]["cached"] and other.backbone["fingerprint"] != fingerprint
    assert len(list(cache.glob("order-*.npz"))) == 2
