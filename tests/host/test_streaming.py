"""Streaming an image folder with tf.data: same split and pixels as the in-memory loader, per-worker
shards, fine-tuning from files, unreadable files and empty folders, the CLI and the two-process example."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import tensorflow as tf  # noqa: E402

from edgeadapt.training.backbones import BackboneOptions  # noqa: E402
from edgeadapt.data.image_folders import (  # noqa: E402
    Dataset,
    ImageSet,
    SplitOptions,
    load_image_folder,
    split_entries,
    write_image_folder,
)
from edgeadapt import DatasetError, EdgeAdaptError, FineTuneOptions, InputError, InputSpec, fine_tune  # noqa: E402
from edgeadapt.data.streaming import (  # noqa: E402
    FileSet,
    StreamOptions,
    stream_embeddings,
    stream_image_folder,
)
from edgeadapt import SyntheticOptions  # noqa: E402
from edgeadapt.data.synthetic import generate_images  # noqa: E402
from edgeadapt import ClassifierTrainingOptions, train_classifier  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SIZE = 16
SPLIT = SplitOptions(seed=3)
SPEC = InputSpec(height=SIZE, width=SIZE)
TINY = BackboneOptions(stem_filters=8, blocks=(("conv", 8, 1), ("conv", 16, 2), ("separable", 32, 2)))
QUICK = dict(head_epochs=25, head_patience=25, epochs=2, batch_size=32, verbose=0, head_learning_rate=1e-2)
PILLOW = StreamOptions(decoder="pillow")


COLOURS = np.array([[200, 40, 40], [40, 180, 60], [50, 70, 210], [210, 200, 40]], np.float64)


def colour_images(per_class: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """4 classes told apart by colour (noisy, with a grey square of clutter): a tiny model learns them in seconds."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), per_class)
    tint = COLOURS[labels] + rng.normal(0, 25, (len(labels), 3))
    images = tint[:, None, None, :] + rng.normal(0, 30, (len(labels), SIZE, SIZE, 3))
    for image in images:
        side = rng.integers(3, SIZE // 2)
        top, left = rng.integers(0, SIZE - side, 2)
        image[top:top + side, left:left + side] = rng.uniform(0, 255)
    return ["red", "green", "blue", "yellow"], np.clip(np.rint(images), 0, 255).astype(np.uint8), labels


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """4 classes, 40 PNG files each, 16x16 RGB."""
    names, images, labels = colour_images(40, seed=5)
    return write_image_folder(tmp_path_factory.mktemp("colours") / "data", names, images, labels)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory) -> Path:
    """JPEG files of other sizes than the model's (resizing and cropping happen), one class in grayscale."""
    from PIL import Image

    names, images, labels = generate_images(SyntheticOptions(num_classes=2, images_per_class=4, image_size=40, seed=2))
    root = write_image_folder(tmp_path_factory.mktemp("jpeg") / "data", names, images[:, :, :30], labels,
                              suffix=".jpg")
    gray = root / names[0] / "gray.jpg"
    Image.fromarray(images[0, :, :, 1]).save(gray)
    return root


@pytest.fixture(scope="module")
def in_memory(folder):
    return load_image_folder(folder, SPEC, SPLIT, progress=False)


@pytest.fixture(scope="module")
def base():
    """A small classifier 'pretrained' on other images of the same kind (another seed)."""
    names, images, labels = colour_images(24, seed=11)
    everything = ImageSet(images, labels)
    train, validation, test = split_entries(labels, SplitOptions(seed=0))
    pretraining = Dataset(names, everything.subset(train), everything.subset(validation), everything.subset(test),
                          SPEC)
    return train_classifier(pretraining, ClassifierTrainingOptions(epochs=5, seed=0, verbose=0, backbone=TINY))


def _image_digests(batches) -> list[str]:
    return [hashlib.sha256(image.astype(np.uint8).tobytes()).hexdigest()
            for batch in batches for image in np.asarray(batch)]


# ----------------------------------------------------------------------------- listing and sharding
def test_the_split_is_the_in_memory_loaders(folder, in_memory):
    stream = stream_image_folder(folder, SPEC, SPLIT)
    assert stream.class_names == in_memory.class_names
    for name in ("train", "validation", "test"):
        files, images = getattr(stream, name), getattr(in_memory, name)
        assert list(files.paths) == images.paths and np.array_equal(files.labels, images.labels), name
    other = SplitOptions(validation_fraction=0.2, seed=9)
    subset = stream_image_folder(folder, SPEC, other, classes=["yellow", "red"])
    reference = load_image_folder(folder, SPEC, other, classes=["yellow", "red"], progress=False)
    assert list(subset.train.paths) == reference.train.paths and subset.class_names == ["yellow", "red"]


def test_shards_of_two_workers_are_disjoint_and_cover_the_training_files(folder):
    stream = stream_image_folder(folder, SPEC, SPLIT, options=PILLOW)
    shards = [stream.train.shard(2, index) for index in range(2)]
    assert not set(shards[0].paths) & set(shards[1].paths)
    assert set(shards[0].paths) | set(shards[1].paths) == set(stream.train.paths)
    assert abs(len(shards[0]) - len(shards[1])) <= 1
    for shard in shards:  # files are ordered by class, so every shard holds every class
        assert set(shard.labels.tolist()) == set(range(4))

    # The trainer's input function: worker i reads the images of its own shard and nothing else.
    memory = {path: image for path, image in zip(stream.train.paths, stream.load("train").images)}
    global_batch = 8
    train_input = stream.per_worker_input("train", global_batch, training=True, seed=1)
    seen = []
    for index, shard in enumerate(shards):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=index, num_replicas_in_sync=2)
        batches = [images for images, _ in train_input(context).as_numpy_iterator()]
        own = set(_image_digests([np.stack([memory[path] for path in shard.paths])]))
        read = _image_digests([(batch + 1.0) * 127.5 + 0.5 for batch in batches])  # undo the normalisation
        assert all(batch.shape[0] == global_batch // 2 for batch in batches)  # full per-replica batches
        assert len(batches) == train_input.steps(2) == -(-len(shards[0]) // 4)  # same step count on both workers
        assert set(read) == own  # every own image, and only own images
        seen.append(set(read))
    assert not seen[0] & seen[1]


# ----------------------------------------------------------------------------- pixels
@pytest.mark.parametrize("spec", [
    InputSpec(height=24, width=24),
    InputSpec(height=20, width=28, resize="center_crop"),
    InputSpec(height=24, width=24, channels=1, color_order="GRAY"),
], ids=["stretch", "center_crop", "gray"])
def test_decoded_pixels_match_the_in_memory_loader(jpeg_folder, spec):
    split = SplitOptions(validation_fraction=0.0, test_fraction=0.2, seed=0)
    reference = load_image_folder(jpeg_folder, spec, split, progress=False).train
    for options, tolerance in ((StreamOptions(), 1), (PILLOW, 0)):
        stream = stream_image_folder(jpeg_folder, spec, split, options=options)
        batches = stream.dataset("train", 4, normalize=False).as_numpy_iterator()
        pixels = np.concatenate([images for images, _ in batches])
        assert pixels.dtype == np.float32 and pixels.shape == reference.images.shape
        difference = np.abs(pixels - reference.images.astype(np.float32))
        assert difference.max() <= tolerance, (options.decoder, difference.max())
        assert difference.mean() < 0.25
    normalized = next(iter(stream.dataset("train", 4)))[0].numpy()
    np.testing.assert_allclose(normalized, reference.images[:4] * np.float32(spec.scale) + np.float32(spec.offset),
                               atol=1e-6)


# ----------------------------------------------------------------------------- fine-tuning from files
@pytest.mark.slow
def test_head_only_from_files_equals_in_memory_and_learns(folder, in_memory, base):
    memory = fine_tune(base, in_memory, FineTuneOptions.head_only(**QUICK))
    exact = fine_tune(base, stream_image_folder(folder, SPEC, SPLIT, options=PILLOW),
                      FineTuneOptions.head_only(**QUICK))
    np.testing.assert_array_equal(exact.head.weights, memory.head.weights)  # same files, same pixels, same order
    np.testing.assert_array_equal(exact.class_stats.sums, memory.class_stats.sums)

    stream = stream_image_folder(folder, SPEC, SPLIT)  # TensorFlow decoder (the default)
    result = fine_tune(base, stream, FineTuneOptions.head_only(**QUICK))
    assert not result.backbone_changed and result.class_stats.counts.sum() == len(stream.train)
    accuracy = result.evaluate_stream(stream, "test")
    assert accuracy >= 0.75, accuracy
    assert accuracy == pytest.approx(result.evaluate(in_memory.test.images, in_memory.test.labels), abs=0.1)


@pytest.mark.slow
def test_top_layers_from_files(folder, in_memory, base):
    options = FineTuneOptions.top_layers(1, **{**QUICK, "epochs": 2})
    memory = fine_tune(base, in_memory, options)
    stream = stream_image_folder(folder, SPEC, SPLIT, options=PILLOW)
    result = fine_tune(base, stream, options)
    # Shuffling and batching act exactly as in the in-memory pipeline: the same backbone comes out.
    assert result.backbone_fingerprint == memory.backbone_fingerprint and result.backbone_changed
    assert result.history["backbone"] == memory.history["backbone"]
    assert result.evaluate_stream(stream) >= 0.75
    # class statistics describe the new backbone's embeddings of the training files
    embeddings = stream_embeddings(result.backbone, stream, "train")
    means = np.stack([embeddings[stream.train.labels == c].mean(axis=0) for c in range(4)])
    np.testing.assert_allclose(result.class_stats.means(), means, rtol=1e-4, atol=1e-5)


def test_augmentation_acts_as_in_the_in_memory_pipeline(folder, in_memory):
    from edgeadapt.training.classifier import augmentation_layers, make_tf_dataset

    stream = stream_image_folder(folder, SPEC, SPLIT, options=PILLOW)
    count = len(stream.train)  # one batch: the random draws cannot reach batches in another order
    streamed = next(iter(stream.dataset("train", count, augment=augmentation_layers(7))))[0].numpy()
    reference = next(iter(make_tf_dataset(in_memory.train.images, in_memory.train.labels, SPEC, count, False, 0,
                                          augmentation_layers(7))))[0].numpy()
    plain = next(iter(stream.dataset("train", count)))[0].numpy()
    np.testing.assert_array_equal(streamed, reference)
    assert np.abs(streamed - plain).max() > 0.1 and -1.0 <= streamed.min() and streamed.max() <= 1.0


def test_export_from_a_stream_calibrates_on_the_in_memory_choice(folder, in_memory):
    from edgeadapt.converters.calibration import select_calibration_images
    from edgeadapt.training.finetune_data import export_samples

    calibration, evaluation = export_samples(stream_image_folder(folder, SPEC, SPLIT), 40, 10)
    chosen = select_calibration_images(in_memory.train.images, in_memory.train.labels, count=40, seed=0)
    assert sorted(_image_digests([calibration.images])) == sorted(_image_digests([chosen]))
    assert len(evaluation) == 10 and set(evaluation.labels.tolist()) == set(range(4))  # stratified sample
    assert set(evaluation.paths) <= set(in_memory.test.paths)


# ----------------------------------------------------------------------------- bad data
@pytest.mark.slow  # trains the `base` classifier, then fine-tunes it until the broken file is read
def test_an_undecodable_file_is_named_in_a_dataset_error(folder, base, tmp_path):
    copy = Path(shutil.copytree(folder, tmp_path / "data"))
    stream = stream_image_folder(copy, SPEC, SPLIT)
    broken = Path(stream.train.paths[5])
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    stream = stream_image_folder(copy, SPEC, SPLIT)  # listing reads no pixels: it still works
    with pytest.raises(DatasetError, match=broken.name) as caught:
        fine_tune(base, stream, FineTuneOptions.head_only(**QUICK))
    assert "fix or delete that file" in str(caught.value) and isinstance(caught.value, EdgeAdaptError)
    assert [path for path, _ in stream.find_unreadable("train")] == [str(broken)]
    assert stream.find_unreadable("test") == []
    with pytest.raises(DatasetError, match=broken.name):  # the exact decoder says the same
        stream_embeddings(base, stream_image_folder(copy, SPEC, SPLIT, options=PILLOW), "train")


def test_empty_or_missing_folders_give_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        stream_image_folder(tmp_path / "empty", SPEC)
    (tmp_path / "classes" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetError, match="has no images"):
        stream_image_folder(tmp_path / "classes", SPEC)
    with pytest.raises(DatasetError, match="does not exist"):
        stream_image_folder(tmp_path / "missing", SPEC)


def test_bad_options():
    with pytest.raises(InputError, match="decoder"):
        StreamOptions(decoder="opencv")
    with pytest.raises(InputError, match="shard"):
        FileSet(("a.png", "b.png"), [0, 1]).shard(2, 2)
    with pytest.raises(InputError):
        FileSet(("a.png",), [0, 1])


# ----------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_train_streams_a_folder(folder, base, tmp_path, capsys):
    from edgeadapt.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--stream" in capsys.readouterr().out
    model_path = tmp_path / "base.keras"
    base.save(model_path)
    code = main(["train", "--data", str(folder), "--model", str(model_path), "--strategy", "top_layers:1", "--stream",
                 "--distribute", "mirrored", "--head-epochs", "5", "--epochs", "1", "--out",
                 str(tmp_path / "tuned.keras"), "--keras-verbose", "0", "--json-out", str(tmp_path / "report.json")])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["streamed"] and report["test_images"] == len(stream_image_folder(folder, SPEC).test)
    assert report["seconds"]["backbone"] > 0  # the backbone stage ran on the streamed pipeline under the strategy
    assert 0.0 <= report["test_accuracy"] <= 1.0 and (tmp_path / "tuned.keras").is_file()


# ----------------------------------------------------------------------------- two workers
@pytest.mark.slow
def test_multiworker_example_streams_one_shard_per_worker(tmp_path):
    """examples/multiworker_two_process.py --stream: two workers on 127.0.0.1, each reading its own files."""
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    completed = subprocess.run(
        [sys.executable, str(REPO / "examples" / "multiworker_two_process.py"), "--out", str(tmp_path), "--stream",
         "--epochs", "2", "--head-epochs", "8", "--timeout", "150"],
        capture_output=True, text=True, timeout=180, env=environment)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    reports = [json.loads((tmp_path / f"worker{index}.json").read_text()) for index in range(2)]
    # launch() checked that both ended with the same backbone and that the shards are disjoint and complete
    assert [report["shard"] for report in reports] == [[2, 0], [2, 1]]
    assert all(report["replicas"] == 2 for report in reports)
    assert 0.0 <= reports[0]["test_accuracy"] <= 1.0 and (tmp_path / "finetuned.keras").is_file()
