"""Zero-class bundles (a headless import before its first class) on the device, and the method choice.

The zero-class bundle is the tiny fixture bundle's real backbone files with an empty head
(weights D x 0) and empty class statistics, written like a headless import writes it. Runs
without TensorFlow.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeadapt.device.bundle import Bundle, write_bundle
from edgeadapt.device.head_section import head_payload
from edgeadapt.device.cli import main as device_main
from edgeadapt.device.delta import read_delta
from edgeadapt.device.errors import BundleError, IncompatibleModelError, InputError, UpdateError
from edgeadapt.device.head import ClassStats, Head
from edgeadapt.device.incremental import (
    DEFAULT_METHOD,
    METHODS,
    STATISTICS_FREE_METHOD,
    AddClassOptions,
    choose_method,
)
from edgeadapt.device.inspection import describe_bundle
from edgeadapt.device.runtime import Runtime
from edgeadapt.device.update_inputs import distinct_examples
from edgeadapt.device.updater import HeadUpdater
from edgeadapt.device.bundle_lock import LOCK_NAME


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(item.relative_to(path)): item.read_bytes() for item in sorted(path.rglob("*"))
            if item.is_file() and item.name != LOCK_NAME}


def make_zero_class_bundle(source: Path, output: Path, background: np.ndarray | None = None) -> Path:
    """``source``'s backbone files with an empty head, as a headless import writes it."""
    bundle = Bundle.open(source)
    size = bundle.manifest.embedding_size
    head = Head(weights=np.zeros((size, 0), np.float32), bias=np.zeros(0, np.float32))
    stats = ClassStats(sums=np.zeros((0, size)), counts=np.zeros(0, np.int64))
    section, head_files = head_payload(head, stats, 1, bundle.manifest.backbone_fingerprint, background=background)
    manifest = bundle.manifest.copy()
    manifest.data.update({"classes": [], "head": section, "version": 1, "parent_version": None})
    files = {name: bundle.path / name for name in bundle.manifest.files if not name.startswith("heads/")}
    files.update(head_files)
    return write_bundle(output, manifest, files)


@pytest.fixture
def empty_bundle(bundle_copy, tmp_path) -> Path:
    return make_zero_class_bundle(bundle_copy, tmp_path / "empty.eab")


def clusters(size: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Three well-separated synthetic classes: centres (3, D) and 1-2 examples of each."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, (3, size)) + 0.5
    examples = [centre + rng.normal(0.0, 0.05, (count, size)) for centre, count in zip(centres, (1, 2, 2))]
    return centres, examples


# ----------------------------------------------------------------------------- choose_method
def test_choose_method_picks_what_the_statistics_support():
    gram_stats = ClassStats(sums=np.ones((2, 4)), counts=np.ones(2, np.int64), gram=np.eye(4))
    plain_stats = ClassStats(sums=np.ones((2, 4)), counts=np.ones(2, np.int64))
    assert choose_method(gram_stats, False, None) == DEFAULT_METHOD
    assert choose_method(plain_stats, True, None) == STATISTICS_FREE_METHOD
    assert choose_method(None, False, None) == STATISTICS_FREE_METHOD
    assert choose_method(None, False, "imprint") == "imprint"
    assert choose_method(gram_stats, False, "ridge") == "ridge"
    with pytest.raises(IncompatibleModelError, match="'ridge' needs class statistics with a Gram matrix.*--data"):
        choose_method(None, True, "ridge")
    with pytest.raises(IncompatibleModelError, match="needs a Gram matrix"):
        choose_method(plain_stats, True, "ridge")
    with pytest.raises(InputError, match="unknown method 'fancy'.*" + ", ".join(METHODS)):
        choose_method(None, False, "fancy")


# ----------------------------------------------------------------------------- zero classes
def test_zero_class_bundle_opens_inspects_and_refuses_to_predict(empty_bundle, test_images, capsys):
    images, _ = test_images
    runtime = Runtime.open(empty_bundle)
    assert runtime.class_names == [] and runtime.head.weights.shape == (runtime.head.embedding_size, 0)
    assert runtime.embed(images[:2]).shape == (2, runtime.head.embedding_size)
    before = snapshot(empty_bundle)
    with pytest.raises(BundleError, match="no classes yet.*edgeadapt-device add-class"):
        runtime.predict(images[0])
    with pytest.raises(BundleError, match="no classes yet"):
        runtime.probabilities(images[:2])
    assert "classes    0 (none yet" in describe_bundle(Bundle.open(empty_bundle))
    updater = HeadUpdater(runtime)
    with pytest.raises(InputError, match="no classes yet"):
        updater.calibrate_unknown(images[:4])
    with pytest.raises(InputError, match="no classes yet"):
        updater.set_reference_embeddings(embeddings=np.ones((1, runtime.head.embedding_size), np.float32), labels=[0])
    with pytest.raises(UpdateError, match="nothing to export"):
        updater.export_delta(empty_bundle.parent / "empty.eadelta")
    assert not (empty_bundle.parent / "empty.eadelta").exists()
    assert snapshot(empty_bundle) == before


def test_device_cli_predict_on_zero_class_bundle_says_what_to_do(empty_bundle, fixture_dir, capsys):
    photo = sorted((fixture_dir / "images" / "ring").iterdir())[0]
    assert device_main(["predict", str(empty_bundle), str(photo)]) == 1
    assert "no classes yet" in capsys.readouterr().err


def test_coral_flow_learns_three_classes_from_one_or_two_examples(empty_bundle, tmp_path):
    runtime = Runtime.open(empty_bundle)
    updater = HeadUpdater(runtime)
    size = runtime.head.embedding_size
    centres, examples = clusters(size)
    names = ["mug", "keys", "wallet"]
    first = updater.add_class_embeddings(names[0], examples[0])
    assert first.change["method"] == STATISTICS_FREE_METHOD
    assert first.gate.passed and first.gate.checked == 0  # nothing to protect yet
    assert runtime.head.num_classes == 1 and runtime.predict(np.zeros((32, 32, 3), np.uint8))[0].label == "mug"
    for name, array in zip(names[1:], examples[1:]):
        assert updater.add_class_embeddings(name, array).gate.passed
    assert runtime.class_names == names
    rng = np.random.default_rng(7)
    near_duplicates = np.concatenate([example[:1] + rng.normal(0, 0.02, example[:1].shape) for example in examples])
    assert runtime.head.logits(near_duplicates).argmax(axis=1).tolist() == [0, 1, 2]
    # statistics accumulate from zero, so a class learned on the device can be strengthened
    stats = Bundle.open(empty_bundle).load_class_stats()
    assert stats.counts.tolist() == [1, 2, 2]
    assert updater.add_examples_embeddings("keys", examples[1] + 0.01).change["method"] == STATISTICS_FREE_METHOD
    # history, rollback to the empty version and forward again, export-delta
    assert [info.num_classes for info in updater.history()] == [0, 1, 2, 3, 3]
    updater.rollback(1)
    assert runtime.class_names == [] and runtime.head.num_classes == 0
    with pytest.raises(BundleError, match="no classes yet"):
        runtime.predict(np.zeros((32, 32, 3), np.uint8))
    updater.rollback(5)
    assert runtime.class_names == names
    delta = read_delta(updater.export_delta(tmp_path / "device.eadelta"))
    assert [entry.name for entry in delta.classes] == names
    assert "3 (3 device-added)" in describe_bundle(Bundle.open(empty_bundle))


def test_first_classes_from_real_photos_then_predict(empty_bundle, fixture_dir):
    runtime = Runtime.open(empty_bundle)
    updater = HeadUpdater(runtime)
    rings = sorted((fixture_dir / "images" / "ring").iterdir())
    crosses = sorted((fixture_dir / "images" / "cross").iterdir())
    updater.add_class("ring", rings[:2])
    assert runtime.predict(rings[5])[0].label == "ring"  # one class: it is the answer
    updater.add_class("cross", crosses[:2])
    tests = rings[5:15] + crosses[5:15]
    predicted = [prediction[0].label for prediction in runtime.predict(tests)]
    correct = sum(label == expected for label, expected in zip(predicted, ["ring"] * 10 + ["cross"] * 10))
    assert correct >= 15, predicted


# ----------------------------------------------------------------------------- --method
def test_method_the_bundle_cannot_support_is_refused_before_embedding(empty_bundle, tmp_path, capsys):
    before = snapshot(empty_bundle)
    runtime = Runtime.open(empty_bundle)
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"not a jpeg")  # embedding it would fail with InputError: the method check comes first
    updater = HeadUpdater(runtime, options=AddClassOptions(method="ridge"))
    with pytest.raises(IncompatibleModelError, match="'ridge' needs a Gram matrix"):
        updater.add_class("mug", [corrupt])
    with pytest.raises(IncompatibleModelError, match="'ridge' needs"):
        updater.add_class_embeddings("mug", np.ones((2, runtime.head.embedding_size), np.float32))
    with pytest.raises(IncompatibleModelError, match="'center_l2' needs a head trained on centred"):
        HeadUpdater(runtime, options=AddClassOptions(method="center_l2")).add_class("mug", [corrupt])
    assert device_main(["add-class", str(empty_bundle), "mug", str(corrupt), "--method", "ridge"]) == 1
    assert "needs a Gram matrix" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        device_main(["add-class", str(empty_bundle), "mug", str(corrupt), "--method", "fancy"])
    assert "invalid choice: 'fancy'" in capsys.readouterr().err
    assert snapshot(empty_bundle) == before


def test_device_cli_method_option_is_used(bundle_copy, fixture_dir, capsys):
    photos = sorted((fixture_dir / "images" / "ring").iterdir())[:3]
    assert device_main(["add-class", str(bundle_copy), "ring2", *map(str, photos), "--method", "imprint",
                        "--force", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["change"]["method"] == "imprint"
    assert device_main(["add-examples", str(bundle_copy), "ring2", str(photos[0]), "--method", "imprint",
                        "--force", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["change"]["method"] == "imprint"
    assert device_main(["add-class", str(bundle_copy), "ring3", *map(str, photos), "--force", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["change"]["method"] == DEFAULT_METHOD  # the fixture has a Gram matrix


# ----------------------------------------------------------------------------- bad input
def test_zero_shots_and_nan_embeddings_are_refused(empty_bundle):
    before = snapshot(empty_bundle)
    runtime = Runtime.open(empty_bundle)
    updater = HeadUpdater(runtime)
    size = runtime.head.embedding_size
    with pytest.raises(InputError, match="at least one|empty|no examples"):
        updater.add_class("mug", [])
    with pytest.raises(InputError, match=r"\(N >= 1"):
        updater.add_class_embeddings("mug", np.zeros((0, size), np.float32))
    bad = np.ones((2, size), np.float32)
    bad[1, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        updater.add_class_embeddings("mug", bad)
    assert snapshot(empty_bundle) == before and runtime.class_names == []


def test_the_same_photo_as_every_shot_learns_like_one_example(bundle_copy, fixture_dir, tmp_path):
    photo = sorted((fixture_dir / "images" / "ring").iterdir())[0]
    other = tmp_path / "other.eab"
    shutil.copytree(bundle_copy, other)
    once = HeadUpdater(Runtime.open(bundle_copy)).add_class("ring2", [photo], force=True)
    five = HeadUpdater(Runtime.open(other)).add_class("ring2", [photo] * 5, force=True)
    assert once.change["examples"] == five.change["examples"] == 1
    assert five.change["duplicates_ignored"] == 4 and "duplicates_ignored" not in once.change
    head_once, head_five = Bundle.open(bundle_copy).load_head(), Bundle.open(other).load_head()
    assert np.array_equal(head_once.weights, head_five.weights) and np.array_equal(head_once.bias, head_five.bias)


def test_distinct_examples_keeps_first_seen_order():
    rows = np.array([[3.0, 1.0], [1.0, 2.0], [3.0, 1.0], [0.0, 0.0], [1.0, 2.0]], np.float32)
    assert distinct_examples(rows).tolist() == [[3.0, 1.0], [1.0, 2.0], [0.0, 0.0]]
    assert distinct_examples(rows[:1]) is not None and distinct_examples(rows[:1]).shape == (1, 2)


def test_background_reaches_the_head_math_as_calibration(bundle_copy, tmp_path, monkeypatch):
    from edgeadapt.device import incremental

    size = Bundle.open(bundle_copy).manifest.embedding_size
    background = np.random.default_rng(3).normal(0, 1, (6, size)).astype(np.float16)
    bundle = make_zero_class_bundle(bundle_copy, tmp_path / "bg.eab", background=background)
    seen = []
    real = incremental.add_classes

    def recording(*arguments, **keywords):
        seen.append(keywords.get("calibration"))
        return real(*arguments, **keywords)

    monkeypatch.setattr(incremental, "add_classes", recording)
    updater = HeadUpdater(Runtime.open(bundle))
    centres, examples = clusters(size)
    updater.add_class_embeddings("a", examples[0])
    updater.add_class_embeddings("b", examples[1])
    assert seen[0].dtype == np.float32 and np.array_equal(seen[0], background.astype(np.float32))
    # no stored references: the background, then the examples learned on the device
    assert seen[1].shape == (6 + len(np.unique(examples[0], axis=0)), size)
    assert np.array_equal(seen[1][:6], background.astype(np.float32))
    assert np.array_equal(Bundle.open(bundle).load_background(), background)  # carried forward unchanged


def test_strengthening_without_statistics_works_and_says_what_does_not(bundle_copy, tmp_path, fixture_dir, capsys):
    parent = Bundle.open(bundle_copy)
    without = tmp_path / "nostats.eab"
    section, files = head_payload(parent.load_head(), None, 1, parent.manifest.backbone_fingerprint)
    manifest = parent.manifest.copy()
    manifest.data.update({"head": section, "version": 1, "parent_version": None})
    all_files = {name: parent.path / name for name in parent.manifest.files if not name.startswith("heads/")}
    all_files.update(files)
    write_bundle(without, manifest, all_files)
    before = snapshot(without)
    photo = str(sorted((fixture_dir / "images" / "ring").iterdir())[0])
    assert device_main(["add-examples", str(without), "ring", photo, "--method", "imprint"]) == 1
    assert "--method weight_align" in capsys.readouterr().err
    assert snapshot(without) == before
    old_head = Bundle.open(without).load_head()
    assert device_main(["add-examples", str(without), "ring", photo, "--force"]) == 0  # the default: claim
    new_head = Bundle.open(without).load_head()
    ring = Bundle.open(without).manifest.class_names.index("ring")
    others = [index for index in range(old_head.num_classes) if index != ring]
    assert np.array_equal(new_head.weights[:, others], old_head.weights[:, others])
    assert not np.array_equal(new_head.weights[:, ring], old_head.weights[:, ring])
    assert device_main(["add-examples", str(without), "ring", photo, "--method", "weight_align", "--force"]) == 0
