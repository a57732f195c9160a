"""``edgeadapt bench fewshot``: the fair measure, the baselines, the report (synthetic embeddings; one real bundle)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeadapt.benchmarks.fewshot import (BASELINES, JOINT, METRICS, EmbeddedData, FewShotOptions, class_splits, draw_shots,
                                     per_class_split, run_fewshot_on_embeddings)
from edgeadapt.benchmarks.fewshot_stability import run_stability_on_embeddings
from edgeadapt.device import incremental as head_math
from edgeadapt.device.errors import IncompatibleModelError, InputError
from edgeadapt.device.head import ClassStats
from edgeadapt.benchmarks.fewshot_measure import fair_scores, harmonic_mean, shrinkage_discriminant_head, simpleshot_head
from edgeadapt.benchmarks.fewshot_report import report_table, write_report

CLASSES = [f"class{index}" for index in range(7)]


def clusters(seed: int = 0, dimension: int = 16, train: int = 30, test: int = 15, spread: float = 4.0) -> EmbeddedData:
    """Seven Gaussian class clusters of 'embeddings' (non-negative like pooled ReLU features)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(CLASSES), dimension)) * spread + 3 * spread

    def sample(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(len(CLASSES)), count)
        return (centres[labels] + rng.normal(size=(labels.size, dimension))).astype(np.float32), labels

    return EmbeddedData(list(CLASSES), sample(train), sample(test), description={"data": "synthetic"})


FAST = FewShotOptions(shots=(1, 5), draws=2, splits=2, head_epochs=40)


@pytest.fixture(scope="module")
def report() -> dict:
    return run_fewshot_on_embeddings(clusters(), FAST)


def do_nothing(setup, shots):
    return setup.base_head


# ----------------------------------------------------------------------------- the measure
def test_fair_scores_average_per_class_not_per_photo():
    labels = np.array([0] * 8 + [1] * 2 + [2] * 2)
    predictions = np.array([0] * 8 + [1, 0] + [2, 2])
    scores = fair_scores(predictions, labels, old_classes=[0, 1], new_classes=[2])
    assert scores["old_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    assert scores["new_recall"] == 1.0
    assert scores["harmonic_mean"] == pytest.approx(2 * 0.75 / 1.75)
    assert harmonic_mean(0.9, 0.0) == 0.0 and harmonic_mean(0.0, 0.0) == 0.0
    with pytest.raises(InputError, match="no test sample"):
        fair_scores(predictions, labels, [0, 1], [3])
    with pytest.raises(InputError, match="match"):
        fair_scores(predictions[:-1], labels, [0], [1])


# ----------------------------------------------------------------------------- the report
def test_json_shape(report):
    assert set(report) >= {"base_old_accuracy", "joint", "default_method", "methods"}
    assert report["default_method"] == head_math.DEFAULT_METHOD
    assert set(report["joint"]) == {"old_accuracy", "new_recall", "harmonic_mean"}
    assert set(report["methods"]) == set(head_math.METHODS) | set(BASELINES) | {JOINT}
    for name, by_shot in report["methods"].items():
        assert set(by_shot) == {"1", "5"}, name
        for entry in by_shot.values():
            assert set(METRICS) <= set(entry)
            if entry.get("n/a"):
                assert all(entry[metric] is None for metric in METRICS)
            else:
                assert all(0.0 <= entry[metric] <= 1.0 for metric in ("old_accuracy", "new_recall", "harmonic_mean"))
    # center_l2 needs a cosine head: reported as n/a with the reason, not a crash
    assert "L2" in report["methods"]["center_l2"]["1"]["n/a"] or "l2" in report["methods"]["center_l2"]["1"]["n/a"]
    assert len(report["splits"]) == 2
    assert json.loads(json.dumps(report)) == report
    text = report_table(report)
    assert "(default)" in text and "n/a:" in text and "joint" in text


def test_joint_has_ratio_one_and_learners_learn(report):
    for entry in report["methods"][JOINT].values():
        assert entry["ratio_to_joint"] == 1.0
        assert entry["harmonic_mean"] == pytest.approx(report["joint"]["harmonic_mean"])
    assert report["joint"]["new_recall"] > 0.9  # well separated clusters
    assert report["methods"]["imprint"]["5"]["new_recall"] > 0.5
    assert report["methods"]["simpleshot"]["5"]["new_recall"] > 0.5


def test_do_nothing_method_scores_zero():
    result = run_fewshot_on_embeddings(clusters(), FAST, methods={"base only": do_nothing})
    for entry in result["methods"]["base only"].values():
        assert entry["new_recall"] == 0.0
        assert entry["harmonic_mean"] == 0.0
        assert entry["ratio_to_joint"] == 0.0
        assert entry["old_drop"] == 0.0
        assert entry["old_accuracy"] == pytest.approx(result["base_old_accuracy"])


def test_deterministic_with_a_fixed_seed():
    options = FewShotOptions(shots=(1, 3), draws=2, splits=1, head_epochs=20, methods=("imprint", "ridge", "simpleshot"))

    def stripped(result: dict) -> dict:
        result = json.loads(json.dumps(result))
        result.pop("seconds")
        for by_shot in result["methods"].values():
            for entry in by_shot.values():
                entry.pop("update_ms", None)
        for split in result["splits"]:
            for by_shot in split["methods"].values():
                for entry in by_shot.values():
                    entry.pop("update_ms", None)
        return result

    first = run_fewshot_on_embeddings(clusters(), options)
    assert stripped(first) == stripped(run_fewshot_on_embeddings(clusters(), options))
    other = run_fewshot_on_embeddings(clusters(), FewShotOptions(shots=(1, 3), draws=2, splits=1, head_epochs=20,
                                                                 methods=("imprint",), seed=1))
    assert other["splits"][0]["new_classes"] != first["splits"][0]["new_classes"] \
        or other["methods"]["imprint"] != first["methods"]["imprint"]


def test_given_classes_and_seeded_splits():
    result = run_fewshot_on_embeddings(clusters(), FewShotOptions(shots=(2,), draws=1, head_epochs=20,
                                                                  methods=("imprint",)),
                                       base=["class0", "class1", "class2"], new=["class5"])
    assert result["splits"][0]["base_classes"] == ["class0", "class1", "class2"]
    assert result["splits"][0]["new_classes"] == ["class5"]
    splits = class_splits(CLASSES, None, None, 4, seed=3)
    assert splits == class_splits(CLASSES, None, None, 4, seed=3)
    assert len({frozenset(new) for _, new in splits}) == 4
    assert all(len(new) == 3 and len(base) == 4 and not set(base) & set(new) for base, new in splits)
    assert class_splits(CLASSES, None, ["class6"], 4, 0) == [(CLASSES[:6], ["class6"])]
    with pytest.raises(InputError, match="not class folders"):
        class_splits(CLASSES, ["nope"], None, 1, 0)
    with pytest.raises(InputError, match="both base and new"):
        class_splits(CLASSES, ["class0", "class1"], ["class1"], 1, 0)
    with pytest.raises(InputError, match="at least 2"):
        class_splits(CLASSES, ["class0"], ["class1"], 1, 0)
    with pytest.raises(InputError, match="at least 1 photo"):
        FewShotOptions(shots=(0, 5))
    with pytest.raises(InputError, match="unknown method"):
        FewShotOptions(methods=("magic",))


def test_photo_split_and_shot_draws_are_stable():
    labels = np.repeat(np.arange(3), 10)
    train, test = per_class_split(labels, ["a", "b", "c"], 0.4, seed=0)
    assert len(test) == 12 and len(train) == 18 and not set(train) & set(test)
    # class "b" keeps the same photos on each side when class "a" is absent
    _, sub_test = per_class_split(labels[labels > 0] - 1, ["b", "c"], 0.4, seed=0)
    assert np.array_equal(sub_test + 10, test[test >= 10])
    embeddings = np.arange(30, dtype=np.float32)[:, None]
    one = draw_shots(labels, embeddings, [1, 2], 1, seed=0, split=0, draw=0)
    five = draw_shots(labels, embeddings, [1, 2], 5, seed=0, split=0, draw=0)
    assert all(float(one_rows[0, 0]) in set(five_rows[:, 0].tolist()) for one_rows, five_rows in zip(one, five))  # nested
    assert [len(array) for array in draw_shots(labels, embeddings, [1], 50, 0, 0, 0)] == [10]
    with pytest.raises(InputError, match="at least 2"):
        per_class_split(np.array([0, 0, 1]), ["a", "b"], 0.4, 0)


# ----------------------------------------------------------------------------- baselines
def test_simpleshot_is_the_nearest_normalised_centroid():
    data = clusters(dimension=8)
    embeddings, labels = data.train
    base = labels < 4
    shots = [embeddings[labels == 5][:3]]
    head = simpleshot_head(embeddings[base], labels[base], 4, shots)
    mean = embeddings[base].astype(np.float64).mean(axis=0)

    def unit(values):
        centred = values - mean
        return centred / np.linalg.norm(centred, axis=1, keepdims=True)

    centroids = [unit(embeddings[labels == c]).mean(axis=0) for c in range(4)] + [unit(shots[0]).mean(axis=0)]
    queries = data.test[0]
    distances = ((unit(queries)[:, None, :] - np.stack(centroids)[None]) ** 2).sum(axis=2)
    assert np.array_equal(head.logits(queries).argmax(axis=1), distances.argmin(axis=1))


def test_shrinkage_discriminant_learns_and_needs_statistics():
    data = clusters()
    embeddings, labels = data.train
    base = labels < 4
    stats = ClassStats.from_embeddings(embeddings[base], labels[base], 4)
    shots = [embeddings[labels == label][:10] for label in (4, 5, 6)]
    head = shrinkage_discriminant_head(stats, shots)
    test_embeddings, test_labels = data.test
    scores = fair_scores(head.logits(test_embeddings).argmax(axis=1), test_labels, range(4), range(4, 7))
    assert scores["old_accuracy"] > 0.9 and scores["new_recall"] > 0.9
    with pytest.raises(IncompatibleModelError, match="statistics"):
        shrinkage_discriminant_head(None, shots)
    with pytest.raises(IncompatibleModelError, match="Gram"):
        shrinkage_discriminant_head(ClassStats(stats.sums, stats.counts), shots)
    with pytest.raises(InputError, match="NaN"):
        shrinkage_discriminant_head(stats, [np.full((2, 16), np.nan)])


# ----------------------------------------------------------------------------- stability (imported head)
def test_stability_scenario_on_embeddings():
    data = clusters()
    embeddings, labels = data.train
    base = labels < 4
    from edgeadapt.training.head_training import HeadTrainingOptions, train_head

    head = train_head(embeddings[base], labels[base], 4, HeadTrainingOptions(epochs=40))
    new_train = (embeddings[~base], labels[~base] - 4)
    test_embeddings, test_labels = data.test
    new_test = (test_embeddings[test_labels >= 4], test_labels[test_labels >= 4] - 4)
    stability, stability_labels = test_embeddings[test_labels < 4], test_labels[test_labels < 4]
    options = FewShotOptions(shots=(1, 5), draws=2, methods=("imprint",))
    result = run_stability_on_embeddings(head, None, None, new_train, new_test, ["x", "y", "z"], stability,
                                         stability_labels, options,
                                         methods={"base only": do_nothing,
                                                  "imprint": lambda setup, shots: head_math.add_classes(
                                                      setup.base_head, setup.stats, shots,
                                                      head_math.AddClassOptions(method="imprint"))[0],
                                                  "ridge": lambda setup, shots: head_math.add_classes(
                                                      setup.base_head, setup.stats, shots,
                                                      head_math.AddClassOptions(method="ridge"))[0]})
    assert result["stability"]["top1_accuracy_before"] > 0.9
    unchanged = result["methods"]["base only"]["5"]
    assert unchanged["changed_share"] == 0.0 and unchanged["new_recall"] == 0.0
    assert unchanged["top1_accuracy_after"] == result["stability"]["top1_accuracy_before"]
    assert result["methods"]["imprint"]["5"]["new_recall"] > 0.0
    assert "statistics" in result["methods"]["ridge"]["1"]["n/a"]  # an imported head without statistics
    assert "changed" in report_table(result)


# ----------------------------------------------------------------------------- figures
def test_report_png_and_html(report, tmp_path):
    png = write_report(report, tmp_path / "x.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    page = write_report(report, tmp_path / "sub" / "x.html").read_text()
    assert "data:image/png;base64," in page and "harmonic" not in page.split("<pre>")[0]
    assert "claim (default)" in page
    with pytest.raises(InputError, match="png"):
        write_report(report, tmp_path / "x.pdf")
    assert not (tmp_path / "x.pdf").exists()


def test_cli_refuses_stability_without_imported_head(tmp_path, capsys):
    from edgeadapt.cli import main

    code = main(["bench", "fewshot", "--data", str(tmp_path), "--backbone-bundle", str(tmp_path / "b.eab"),
                 "--stability", str(tmp_path)])
    assert code == 1
    assert "--imported-head" in capsys.readouterr().err
    assert main(["bench", "fewshot", "--data", str(tmp_path), "--backbone-bundle", str(tmp_path / "b.eab"),
                 "--report", str(tmp_path / "r.pdf")]) == 1
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- through a real bundle
@pytest.mark.slow
def test_cli_through_a_real_bundle(fixture_dir, tmp_path, capsys):
    from edgeadapt.cli import main

    cache = tmp_path / "cache"
    arguments = ["bench", "fewshot", "--data", str(fixture_dir / "images"), "--backbone-bundle",
                 str(fixture_dir / "tiny.eab"), "--shots", "1,2", "--draws", "2", "--splits", "2", "--cache", str(cache),
                 "--methods", "imprint,ridge,simpleshot,shrinkage_discriminant"]
    assert main(arguments + ["--json-out", str(tmp_path / "r.json"), "--report", str(tmp_path / "r.png")]) == 0
    first = json.loads((tmp_path / "r.json").read_text())
    assert set(first["methods"]) == {"imprint", "ridge", "simpleshot", "shrinkage_discriminant", JOINT}
    assert first["embeddings"]["computed"] > 0 and first["embeddings"]["from_cache"] == 0
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert "ridge" in capsys.readouterr().out
    assert main(arguments + ["--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["embeddings"]["computed"] == 0  # every embedding read from the cache
    assert second["methods"]["imprint"] == first["methods"]["imprint"] or all(
        second["methods"]["imprint"][k][m] == first["methods"]["imprint"][k][m]
        for k in ("1", "2") for m in METRICS)
    assert list(cache.glob("*.npz"))


@pytest.mark.slow
def test_imported_head_mode_through_a_real_bundle(fixture_dir, tmp_path, capsys):
    from edgeadapt.cli import main

    images = fixture_dir / "images"
    classes = sorted(path.name for path in images.iterdir() if path.is_dir())
    stability = images / classes[0]
    code = main(["bench", "fewshot", "--data", str(images), "--backbone-bundle", str(fixture_dir / "tiny.eab"),
                 "--imported-head", "--stability", str(stability), "--new-classes", classes[-1], "--shots", "1,3",
                 "--draws", "2", "--cache", str(tmp_path / "cache"), "--methods", "imprint,imprint_calibrated",
                 "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "imported-head" and result["new_classes"] == [classes[-1]]
    assert result["stability"]["photos"] == len(list(stability.iterdir()))
    for entry in result["methods"]["imprint"].values():
        assert 0.0 <= entry["changed_share"] <= 1.0 and 0.0 <= entry["new_recall"] <= 1.0


def test_calibration_embeddings_are_references_and_background():
    from edgeadapt.benchmarks.fewshot import base_setup

    data = clusters()
    embeddings, labels = data.train
    base = labels < 4
    background = np.random.default_rng(1).normal(size=(7, 16)).astype(np.float32)
    options = FewShotOptions(head_epochs=5)
    setup = base_setup((embeddings[base], labels[base]), 4, background, options, split_seed=0)
    assert setup.calibration.shape == (4 * options.references_per_class + 7, 16)
    np.testing.assert_array_equal(setup.calibration[-7:], background)
    for row in setup.calibration[:-7]:  # references are base-class training photos
        assert np.any(np.all(embeddings[base] == row, axis=1))
    assert setup.stats.gram is not None and setup.base_head.feature_mean is not None  # "center", as the SDK trains
    assert base_setup((embeddings[base], labels[base]), 4, None, FewShotOptions(head_epochs=5, references_per_class=0),
                      0).calibration is None


@pytest.mark.slow
def test_embedding_cache_follows_the_files(fixture_dir, tmp_path):
    import os
    import shutil

    from edgeadapt.device.runtime import Runtime
    from edgeadapt.data.embedding_cache import EmbeddingCache

    folder = tmp_path / "photos"
    source = next(path for path in (fixture_dir / "images").iterdir() if path.is_dir())
    shutil.copytree(source, folder)
    files = sorted(folder.iterdir())[:6]
    with Runtime.open(fixture_dir / "tiny.eab") as runtime:
        first = EmbeddingCache(runtime, tmp_path / "cache").embed(files)
        np.testing.assert_array_equal(first, runtime.embed([str(path) for path in files]))
        again = EmbeddingCache(runtime, tmp_path / "cache")
        np.testing.assert_array_equal(again.embed(files), first)
        assert (again.hits, again.computed) == (6, 0)
        status = files[2].stat()
        os.utime(files[2], ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))  # a changed file is embedded again
        touched = EmbeddingCache(runtime, tmp_path / "cache")
        touched.embed(files)
        assert (touched.hits, touched.computed) == (5, 1)
        (folder / "broken.png").write_bytes(b"not an image")
        before = (tmp_path / "cache").stat().st_mtime_ns, sorted(p.name for p in (tmp_path / "cache").iterdir())
        with pytest.raises(InputError, match="broken.png"):
            EmbeddingCache(runtime, tmp_path / "cache").embed(files + [folder / "broken.png"])
        assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == before[1]


def test_background_imprint_claims_its_share_in_any_order():
    from edgeadapt.benchmarks.fewshot_measure import background_imprint_head
    from edgeadapt.training.head_training import HeadTrainingOptions, train_head

    data = clusters()
    embeddings, labels = data.train
    base = labels < 4
    head = train_head(embeddings[base], labels[base], 4, HeadTrainingOptions(epochs=30, normalization="center"))
    background = embeddings[base]
    shots = [embeddings[labels == label][:5] for label in (4, 5)]
    grown = background_imprint_head(head, shots, background, claim=0.1)
    np.testing.assert_array_equal(grown.logits(background)[:, :4], head.logits(background))  # old columns kept
    logits = grown.logits(background)
    for column in (4, 5):
        claimed = np.mean(logits[:, column] > logits[:, :4].max(axis=1))
        assert 0.05 <= claimed <= 0.15
    swapped = background_imprint_head(head, shots[::-1], background, claim=0.1)
    np.testing.assert_array_equal(swapped.weights[:, 4], grown.weights[:, 5])
    np.testing.assert_array_equal(swapped.bias[4], grown.bias[5])
    with pytest.raises(IncompatibleModelError, match="calibration"):
        background_imprint_head(head, shots, None)
