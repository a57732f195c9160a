"""Host data layer: image folders, splits, the synthetic dataset. numpy + Pillow only."""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from edgeadapt.data.image_folders import (
    ImageSet,
    SplitOptions,
    load_image_folder,
    scan_image_folder,
    split_entries,
    write_image_folder,
)
from edgeadapt import DatasetError, InputError, InputSpec, SyntheticOptions, synthetic_dataset
from edgeadapt.data.synthetic import SHAPE_NAMES, generate_images

SPEC = InputSpec(height=16, width=16, channels=3)


# -- helpers ---------------------------------------------------------------------------
def _small_images(num_classes: int = 3, per_class: int = 10, seed: int = 0):
    options = SyntheticOptions(num_classes=num_classes, images_per_class=per_class, image_size=16, seed=seed)
    return generate_images(options)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    names, images, labels = _small_images()
    return write_image_folder(tmp_path / "data", names, images, labels)


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under root with the sha256 of its bytes (folders map to '')."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        for path in sorted(root.rglob("*"))
    }


def _assert_error_leaves_disk_alone(root: Path, message_part: str, **kwargs) -> DatasetError:
    before = _snapshot(root)
    with pytest.raises(DatasetError) as caught:
        load_image_folder(root, SPEC, progress=False, **kwargs)
    assert message_part in str(caught.value)
    assert _snapshot(root) == before
    return caught.value


def _fft_features(images: np.ndarray) -> np.ndarray:
    """Translation- and polarity-invariant features: log |FFT| of the standardised gray image."""
    gray = images.astype(np.float32).mean(axis=-1)
    gray = (gray - gray.mean(axis=(1, 2), keepdims=True)) / (gray.std(axis=(1, 2), keepdims=True) + 1e-6)
    spectrum = np.abs(np.fft.rfft2(gray))[:, : gray.shape[1] // 2]
    return np.log1p(spectrum).reshape(len(images), -1)


def _nearest_class_mean_predictions(train_x, train_y, test_x) -> np.ndarray:
    mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    centroids = np.stack([train_x[train_y == label].mean(axis=0) for label in np.unique(train_y)])
    distances = ((test_x[:, None, :] - centroids[None]) ** 2).sum(axis=-1)
    return distances.argmin(axis=1)


def _softmax_regression_predictions(train_x, train_y, test_x, steps: int = 200) -> np.ndarray:
    """Plain full-batch gradient descent on the softmax cross-entropy (numpy only)."""
    mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    classes = int(train_y.max()) + 1
    weights, bias = np.zeros((train_x.shape[1], classes)), np.zeros(classes)
    targets = np.eye(classes)[train_y]
    for _ in range(steps):
        logits = train_x @ weights + bias
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        error = probabilities - targets
        weights -= 0.5 * (train_x.T @ error / len(train_x) + 1e-3 * weights)
        bias -= 0.5 * error.mean(axis=0)
    return (test_x @ weights + bias).argmax(axis=1)


# -- round trip ------------------------------------------------------------------------
def test_round_trip_counts_splits_and_pixels(folder: Path) -> None:
    names, images, labels = _small_images()
    dataset = load_image_folder(folder, SPEC, progress=False)

    assert dataset.class_names == names
    assert dataset.spec == SPEC
    splits = (dataset.train, dataset.validation, dataset.test)
    assert sum(len(split) for split in splits) == len(labels) == 30
    path_sets = [set(split.paths) for split in splits]
    assert not (path_sets[0] & path_sets[1] or path_sets[0] & path_sets[2] or path_sets[1] & path_sets[2])
    assert set.union(*path_sets) == {str(p) for p in folder.rglob("*.png")}
    for split in splits:
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == SPEC.shape
        assert split.labels.dtype == np.int64
        for path, label in zip(split.paths, split.labels):
            assert Path(path).parent.name == names[label]
    for split in (dataset.train, dataset.test):
        assert set(split.labels.tolist()) == {0, 1, 2}  # stratified
    # PNG is lossless and the size already matches: pixels come back unchanged.
    first = dataset.train.paths[0]
    label = dataset.train.labels[0]
    index = int(Path(first).stem)
    np.testing.assert_array_equal(dataset.train.images[0], images[labels == label][index])


def test_split_is_deterministic_per_seed(folder: Path) -> None:
    first = load_image_folder(folder, SPEC, SplitOptions(seed=3), progress=False)
    again = load_image_folder(folder, SPEC, SplitOptions(seed=3), progress=False)
    other = load_image_folder(folder, SPEC, SplitOptions(seed=4), progress=False)
    assert first.test.paths == again.test.paths and first.train.paths == again.train.paths
    np.testing.assert_array_equal(first.train.images, again.train.images)
    assert first.test.paths != other.test.paths


def test_requested_classes_are_loaded_in_the_given_order(folder: Path) -> None:
    dataset = load_image_folder(folder, SPEC, classes=["triangle", "circle"], progress=False)
    assert dataset.class_names == ["triangle", "circle"]
    for path, label in zip(dataset.train.paths, dataset.train.labels):
        assert Path(path).parent.name == dataset.class_names[label]


def test_grayscale_spec_and_other_files(tmp_path: Path) -> None:
    names, images, labels = _small_images(num_classes=2, per_class=3)
    root = write_image_folder(tmp_path / "data", names, images, labels, suffix=".bmp")
    (root / "circle" / "notes.txt").write_text("not an image")
    (root / "circle" / "0000.bmp").rename(root / "circle" / "UPPER.BMP")
    dataset = load_image_folder(root, InputSpec(height=8, width=8, channels=1, color_order="GRAY"), progress=False)
    assert len(dataset.train) + len(dataset.validation) + len(dataset.test) == 6
    assert dataset.train.images.shape[1:] == (8, 8, 1)
    assert any(path.endswith("UPPER.BMP") for split in (dataset.train, dataset.test) for path in split.paths)


def test_write_image_folder_layout(tmp_path: Path) -> None:
    images = np.zeros((3, 4, 5, 1), dtype=np.uint8)
    images[1] = 7
    root = write_image_folder(tmp_path / "out", ["a", "b"], images, [0, 1, 0])
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*.png")) == ["a/0000.png", "a/0001.png", "b/0000.png"]
    with pytest.raises(InputError):
        write_image_folder(tmp_path / "bad", ["a"], images, [0, 1, 0])
    with pytest.raises(InputError):
        write_image_folder(tmp_path / "bad", ["../escape"], images, [0, 0, 0])


# -- splitting -------------------------------------------------------------------------
def test_split_entries_guarantees_for_tiny_classes() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2] + [3] * 20)
    train, validation, test = split_entries(labels, SplitOptions(seed=0))
    assert sorted(np.concatenate([train, validation, test]).tolist()) == list(range(len(labels)))
    assert set(labels[train].tolist()) == {0, 1, 2, 3}
    assert set(labels[test].tolist()) == {1, 2, 3}  # a 1-image class can only be trained on
    assert np.count_nonzero(labels[test] == 3) == 3 and np.count_nonzero(labels[validation] == 3) == 3
    again = split_entries(labels, SplitOptions(seed=0))
    for part, same in zip((train, validation, test), again):
        np.testing.assert_array_equal(part, same)


def test_split_of_one_class_does_not_depend_on_the_others() -> None:
    alone = np.zeros(20, dtype=np.int64)
    mixed = np.concatenate([alone, np.ones(7, dtype=np.int64)])
    _, _, test_alone = split_entries(alone, SplitOptions(seed=1))
    _, _, test_mixed = split_entries(mixed, SplitOptions(seed=1))
    np.testing.assert_array_equal(test_alone, test_mixed[mixed[test_mixed] == 0])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"test_fraction": 1.0},
        {"validation_fraction": -0.1},
        {"validation_fraction": 0.5, "test_fraction": 0.5},
        {"seed": -1},
    ],
)
def test_bad_split_options(kwargs) -> None:
    with pytest.raises(InputError):
        SplitOptions(**kwargs)


# -- duplicates ------------------------------------------------------------------------
def test_exact_duplicates_are_dropped(folder: Path, caplog) -> None:
    shutil.copy(folder / "circle" / "0003.png", folder / "circle" / "copy_of_3.png")
    with caplog.at_level(logging.INFO, logger="edgeadapt.data.image_folders"):
        _, entries = scan_image_folder(folder)
    assert len(entries) == 30
    assert all(entry.path.name != "copy_of_3.png" for entry in entries)
    assert "dropped 1 exact duplicate" in caplog.text
    assert len({entry.digest for entry in entries}) == 30


def test_duplicate_across_classes_keeps_the_first_and_warns(folder: Path, caplog) -> None:
    shutil.copy(folder / "circle" / "0000.png", folder / "triangle" / "stolen.png")
    with caplog.at_level(logging.WARNING, logger="edgeadapt.data.image_folders"):
        _, entries = scan_image_folder(folder)
    kept = [entry for entry in entries if entry.path.name in ("0000.png", "stolen.png")]
    assert all(entry.path.name == "0000.png" for entry in kept)
    assert "exact copy" in caplog.text and "stolen.png" in caplog.text


# -- errors (each leaves the disk as it was) -------------------------------------------
def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_folder(tmp_path / "nowhere", SPEC, progress=False)
    assert not (tmp_path / "nowhere").exists()


def test_root_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DatasetError, match="is not a directory"):
        load_image_folder(tmp_path / "file.png", SPEC, progress=False)


def test_empty_root(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "loose.png").write_bytes(b"x")
    _assert_error_leaves_disk_alone(tmp_path / "data", "no class sub-folders")


def test_empty_class_folder(folder: Path) -> None:
    (folder / "empty").mkdir()
    (folder / "empty" / "readme.txt").write_text("no images here")
    error = _assert_error_leaves_disk_alone(folder, "has no images")
    assert "empty" in str(error)


def test_class_folder_with_one_image(folder: Path) -> None:
    (folder / "lonely").mkdir()
    shutil.copy(folder / "circle" / "0000.png", folder / "lonely" / "x.png")
    (folder / "circle" / "0000.png").unlink()  # keep the copy unique
    error = _assert_error_leaves_disk_alone(folder, "needs at least 2 images to split into train and test")
    assert "lonely" in str(error)


def test_class_folder_with_one_image_after_dedupe(folder: Path) -> None:
    (folder / "twins").mkdir()
    (folder / "twins" / "a.png").write_bytes((folder / "circle" / "0000.png").read_bytes()[:-1] + b"\0")
    shutil.copy(folder / "twins" / "a.png", folder / "twins" / "b.png")
    _assert_error_leaves_disk_alone(folder, "needs at least 2 images")


def test_undecodable_image_names_the_file(folder: Path) -> None:
    (folder / "square" / "broken.jpg").write_text("this is not a JPEG")
    error = _assert_error_leaves_disk_alone(folder, "broken.jpg")
    assert isinstance(error.__cause__, InputError)


def test_unknown_requested_class(folder: Path) -> None:
    error = _assert_error_leaves_disk_alone(folder, "no class folder", classes=["circle", "hexagon"])
    assert "hexagon" in str(error) and "square" in str(error)  # lists what is available


# -- ImageSet / Dataset ----------------------------------------------------------------
def _image_set() -> ImageSet:
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    images = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 1), dtype=np.uint8)
    return ImageSet(images, labels, [f"img{i}" for i in range(10)])


def test_image_set_select_classes() -> None:
    images = _image_set()
    picked = images.select_classes([2, 0])
    assert picked.paths == ["img0", "img2", "img3", "img5", "img6", "img8", "img9"]
    assert picked.labels.tolist() == [1, 0, 1, 0, 1, 0, 0]
    np.testing.assert_array_equal(picked.images[:, 0, 0, 0], [0, 2, 3, 5, 6, 8, 9])
    assert images.select_classes([2, 0], relabel=False).labels.tolist() == [0, 2, 0, 2, 0, 2, 2]
    assert len(images) == 10  # the original is untouched


def test_image_set_per_class() -> None:
    images = _image_set()
    few = images.per_class(2, seed=0)
    assert np.bincount(few.labels).tolist() == [2, 2, 2]
    assert few.paths == images.per_class(2, seed=0).paths
    assert len(images.per_class(100, seed=0)) == 10
    seeds_differ = any(images.per_class(1, seed=s).paths != few.per_class(1, seed=0).paths for s in range(1, 6))
    assert seeds_differ
    with pytest.raises(InputError):
        images.per_class(0, seed=0)


def test_image_set_rejects_mismatched_arrays() -> None:
    with pytest.raises(InputError):
        ImageSet(np.zeros((3, 2, 2, 1), dtype=np.uint8), np.zeros(2))
    with pytest.raises(InputError):
        ImageSet(np.zeros((3, 2, 2, 1), dtype=np.float32), np.zeros(3))


def test_dataset_select_classes() -> None:
    dataset = synthetic_dataset(SyntheticOptions(num_classes=4, images_per_class=20, image_size=16))
    picked = dataset.select_classes(["cross", "circle"])
    assert picked.class_names == ["cross", "circle"] and picked.spec == dataset.spec
    for original, split in zip(
        (dataset.train, dataset.validation, dataset.test), (picked.train, picked.validation, picked.test)
    ):
        assert len(split) == np.isin(original.labels, [0, 3]).sum()
        assert set(split.labels.tolist()) <= {0, 1}
    cross_images = dataset.train.images[dataset.train.labels == 3]
    np.testing.assert_array_equal(picked.train.images[picked.train.labels == 0], cross_images)
    with pytest.raises(DatasetError, match="unknown classes"):
        dataset.select_classes(["hexagon"])


# -- synthetic -------------------------------------------------------------------------
def test_synthetic_shapes_dtypes_balance_and_determinism() -> None:
    options = SyntheticOptions(num_classes=8, images_per_class=15, image_size=24, seed=5)
    names, images, labels = generate_images(options)
    assert names == list(SHAPE_NAMES[:8]) and len(set(SHAPE_NAMES)) >= 8
    assert images.shape == (120, 24, 24, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [15] * 8
    _, again, _ = generate_images(options)
    np.testing.assert_array_equal(images, again)
    _, other, _ = generate_images(SyntheticOptions(num_classes=8, images_per_class=15, image_size=24, seed=6))
    assert not np.array_equal(images, other)
    assert images.std() > 20  # not blank


def test_synthetic_grayscale_dataset() -> None:
    dataset = synthetic_dataset(SyntheticOptions(channels=1, images_per_class=20, image_size=16))
    assert dataset.spec == InputSpec(height=16, width=16, channels=1, color_order="GRAY")
    assert dataset.train.images.shape[1:] == (16, 16, 1)
    assert len(dataset.train) + len(dataset.validation) + len(dataset.test) == 120
    assert dataset.train.paths is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 0},
        {"num_classes": len(SHAPE_NAMES) + 1},
        {"channels": 2},
        {"image_size": 4},
        {"images_per_class": 0},
    ],
)
def test_bad_synthetic_options(kwargs) -> None:
    with pytest.raises(InputError):
        SyntheticOptions(**kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("channels", [3, 1])
def test_synthetic_classes_are_learnable_by_shape_not_trivially(channels: int) -> None:
    dataset = synthetic_dataset(
        SyntheticOptions(num_classes=8, channels=channels, seed=1),
        SplitOptions(validation_fraction=0.0, test_fraction=0.25),
    )
    train, test = dataset.train, dataset.test
    # Raw pixels are no help: position, scale and colours are random.
    raw = _nearest_class_mean_predictions(
        train.images.reshape(len(train), -1).astype(np.float32),
        train.labels,
        test.images.reshape(len(test), -1).astype(np.float32),
    )
    assert np.mean(raw == test.labels) < 0.3
    # A linear model on translation-invariant shape features separates every class
    # (measured over 12 seeds: accuracy >= 0.85, every class recall >= 0.67).
    predicted = _softmax_regression_predictions(_fft_features(train.images), train.labels, _fft_features(test.images))
    assert np.mean(predicted == test.labels) > 0.75
    for label in range(8):
        assert np.mean(predicted[test.labels == label] == label) > 0.4, dataset.class_names[label]


def test_data_modules_do_not_import_tensorflow() -> None:
    code = "import sys, edgeadapt.data.image_folders, edgeadapt.data.synthetic; print('tensorflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
