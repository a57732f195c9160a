"""Headless import (a .tflite feature extractor -> a zero-class bundle), ``import --background``, and the
automatic method choice of host ``add-classes`` on imported bundles, with their bad input.

A tiny Keras CNN that ends in global average pooling is converted to TFLite here (float and
uint8), once per module.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("ai_edge_litert")

from PIL import Image  # noqa: E402

from edgeadapt.cli import main as host_main  # noqa: E402
from edgeadapt.converters.fused_export import probe_image_batch  # noqa: E402
from edgeadapt.converters.tflite_import import tflite_scores  # noqa: E402
from edgeadapt.device.bundle import Bundle  # noqa: E402
from edgeadapt.device.errors import DatasetError, IncompatibleModelError, InputError  # noqa: E402
from edgeadapt.device.incremental import STATISTICS_FREE_METHOD, AddClassOptions  # noqa: E402
from edgeadapt.device.inspection import describe_bundle  # noqa: E402
from edgeadapt.device.manifest import InputSpec  # noqa: E402
from edgeadapt.device.runtime import Runtime  # noqa: E402
from edgeadapt.device.updater import HeadUpdater  # noqa: E402
from edgeadapt.bundles.importing import ImportSettings, import_classifier  # noqa: E402
from edgeadapt.bundles.incremental import add_classes  # noqa: E402

pytestmark = pytest.mark.slow  # every test converts or imports a real model
SIZE = 32
SPEC = InputSpec(height=SIZE, width=SIZE)
FILTERS = 16


def _extractor(classes: int = 0, feature_map: bool = False):
    import keras

    keras.utils.set_random_seed(4)
    layers = keras.layers
    inputs = keras.Input((SIZE, SIZE, 3))
    x = layers.Conv2D(12, 3, strides=2, padding="same", activation="relu")(inputs)
    x = layers.Conv2D(FILTERS, 3, strides=2, padding="same", activation="relu")(x)
    if feature_map:
        return keras.Model(inputs, x)
    x = layers.GlobalAveragePooling2D()(x)
    if classes:
        x = layers.Dense(classes, activation="softmax")(x)
    return keras.Model(inputs, x)


def _to_tflite(model, quantize: bool) -> bytes:
    import tensorflow as tf

    table = (np.arange(256) / 127.5 - 1.0).astype(np.float32)
    calibration = table[probe_image_batch(SPEC, 32, seed=11)]
    with tempfile.TemporaryDirectory() as directory:
        model.export(directory, format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(directory)
        if quantize:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda: ([calibration[i : i + 1]] for i in range(len(calibration)))
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.uint8
            converter.inference_output_type = tf.uint8
        return converter.convert()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    built = {
        "float": _to_tflite(_extractor(), quantize=False),
        "uint8": _to_tflite(_extractor(), quantize=True),
        "classifier": _to_tflite(_extractor(classes=3), quantize=True),
        "feature_map": _to_tflite(_extractor(feature_map=True), quantize=False),
    }
    paths = {}
    for name, content in built.items():
        paths[name] = folder / f"{name}.tflite"
        paths[name].write_bytes(content)
    return paths


def _photos(folder: Path, count: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, image in enumerate(probe_image_batch(SPEC, count, seed=seed)):
        path = folder / f"photo{number:02d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def _background_folder(root: Path) -> Path:
    """Nested photos, a corrupt .jpg, a text file, a dot-file and a dot-folder (both must be skipped)."""
    _photos(root / "a", 4, seed=21)
    _photos(root / "b" / "c", 4, seed=22)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (root / "notes.txt").write_text("not an image")
    _photos(root / ".thumbnails", 3, seed=23)
    Image.fromarray(probe_image_batch(SPEC, 1, seed=24)[0]).save(root / ".hidden.png")
    return root


# ----------------------------------------------------------------------------- headless import
@pytest.mark.parametrize("kind", ["float", "uint8"])
def test_headless_import_makes_a_zero_class_bundle_with_the_original_embedding(models, tmp_path, kind):
    output = tmp_path / "extractor.eab"
    report = import_classifier(models[kind], None, output, ImportSettings(probes=8, onnx=kind == "uint8"))
    assert report.headless and report.num_classes == 0 and report.embedding_size == FILTERS
    assert f"updaters use {STATISTICS_FREE_METHOD}" in report.table()
    assert "embedding cosine with the original output 1.000000" in report.table()
    bundle = Bundle.open(output)
    assert bundle.manifest.class_names == [] and bundle.manifest.data["import"]["headless"] is True
    head = bundle.load_head()
    assert head.weights.shape == (FILTERS, 0) and head.bias.shape == (0,) and head.feature_mean is None
    stats = bundle.load_class_stats()
    assert stats.sums.shape == (0, FILTERS) and stats.gram is None
    images = probe_image_batch(SPEC, 6, seed=3)
    original = tflite_scores(models[kind].read_bytes(), images, bundle.manifest.input_spec)
    for backend in (["litert", "onnxruntime"] if kind == "uint8" else ["litert"]):
        embedded = Runtime.open(output, backend=backend).embed(images)
        if backend == "litert":
            np.testing.assert_allclose(embedded, original, rtol=1e-5, atol=1e-6)
        else:  # onnxruntime's x86 u8s8 kernels (no VNNI) may round a value one output step differently
            step = float(np.min(np.diff(np.unique(original)))) if np.unique(original).size > 1 else 1e-3
            assert np.max(np.abs(embedded - original)) <= step * 1.01 + 1e-6
            assert np.mean(np.isclose(embedded, original, rtol=1e-5, atol=1e-6)) >= 0.9
    assert "classes    0 (none yet" in describe_bundle(bundle)


def test_headless_import_from_the_command_line_then_teach_two_classes(models, tmp_path, capsys):
    output = tmp_path / "cli.eab"
    assert host_main(["import", str(models["uint8"]), "--out", str(output), "--no-onnx", "--probes", "4"]) == 0
    assert "classes       0, embedding 16" in capsys.readouterr().out
    runtime = Runtime.open(output)
    updater = HeadUpdater(runtime)
    photos = _photos(tmp_path / "photos", 3, seed=31)
    assert updater.add_class("first", photos[:1]).change["method"] == STATISTICS_FREE_METHOD
    updater.add_class("second", photos[1:2])  # the gate keeps "first"'s photo "first"
    updater.add_class("third", photos[2:])
    predictions = runtime.predict(photos, top_k=3)
    assert [sorted(entry.label for entry in row) for row in predictions] == [["first", "second", "third"]] * 3
    logits = runtime.head.logits(runtime.embed(photos))
    # each photo scores its own class at least as high as any other (the statistics-free method sets a new
    # class's bias where it just wins on its own example; float32 rounding may leave a tie)
    assert np.all(np.diag(logits) >= logits.max(axis=1) - 1e-6), logits


def test_headless_import_refuses_scores_feature_maps_data_and_other_formats(models, tmp_path):
    output = tmp_path / "refused.eab"
    with pytest.raises(IncompatibleModelError, match="class scores, not an embedding.*--labels"):
        import_classifier(models["classifier"], None, output, ImportSettings(probes=4, onnx=False))
    with pytest.raises(IncompatibleModelError, match="feature map.*global average pooling"):
        import_classifier(models["feature_map"], None, output, ImportSettings(probes=4, onnx=False))
    with pytest.raises(InputError, match="headless model .* has none"):
        import_classifier(models["float"], None, output, ImportSettings(data=tmp_path))
    onnx_file = tmp_path / "extractor.onnx"
    onnx_file.write_bytes(b"\x08\x07")
    with pytest.raises(IncompatibleModelError, match="supports .tflite and .keras feature extractors"):
        import_classifier(onnx_file, None, output, ImportSettings(probes=4))
    with pytest.raises(IncompatibleModelError, match="import it without labels"):
        import_classifier(models["float"], ["a"] * FILTERS, output, ImportSettings(probes=4, onnx=False))
    assert not output.exists()


@pytest.mark.parametrize("calibrated", [False, True])
def test_headless_keras_extractor_float32_or_int8_calibrated_on_background_photos(tmp_path, calibrated):
    model = _extractor()
    path = tmp_path / "extractor.keras"
    model.save(path)
    folder = _background_folder(tmp_path / "photos") if calibrated else None
    report = import_classifier(path, None, tmp_path / "k.eab", ImportSettings(probes=8, onnx=False, background=folder))
    assert report.headless and report.num_classes == 0 and report.source_format == "keras"
    assert report.formats[0].quantization == ("int8" if calibrated else "float32")
    assert report.formats[0].embedding_cosine >= (0.98 if calibrated else 0.9999)
    images = probe_image_batch(SPEC, 6, seed=9)
    expected = np.asarray(model((np.arange(256) / 127.5 - 1.0).astype(np.float32)[images], training=False))
    embedded = Runtime.open(tmp_path / "k.eab").embed(images)
    cosine = np.sum(embedded * expected, axis=1) / (np.linalg.norm(embedded, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() > (0.95 if calibrated else 0.9999)
    with pytest.raises(IncompatibleModelError, match="class scores, not an embedding"):
        classifier = tmp_path / "classifier.keras"
        _extractor(classes=3).save(classifier)
        import_classifier(classifier, None, tmp_path / "c.eab", ImportSettings(probes=4, onnx=False))
    assert not (tmp_path / "c.eab").exists()


def test_device_deltas_merge_into_a_zero_class_bundle_on_the_host(models, tmp_path):
    from edgeadapt.bundles.deltas import merge_deltas

    base = tmp_path / "base.eab"
    import_classifier(models["uint8"], None, base, ImportSettings(probes=4, onnx=False))
    device = tmp_path / "device.eab"
    shutil.copytree(base, device)
    updater = HeadUpdater(Runtime.open(device))
    photos = _photos(tmp_path / "photos", 2, seed=61)
    updater.add_class("first", photos[:1])
    updater.add_class("second", photos[1:])
    delta = updater.export_delta(tmp_path / "device.eadelta")
    merge_deltas(base, [delta], tmp_path / "merged.eab")  # the automatic method: no Gram matrix, no refusal
    merged = Bundle.open(tmp_path / "merged.eab")
    assert merged.manifest.class_names == ["first", "second"] and merged.manifest.version == 2
    assert merged.load_head().weights.shape == (FILTERS, 2)


# ----------------------------------------------------------------------------- --background
def test_background_is_embedded_subsampled_deterministically_and_stored_as_float16(models, tmp_path):
    folder = _background_folder(tmp_path / "photos")
    settings = ImportSettings(probes=4, onnx=False, background=folder, background_limit=5)
    report = import_classifier(models["uint8"], None, tmp_path / "a.eab", settings)
    assert report.background_count == 5 and report.background_bytes == 5 * FILTERS * 2
    assert f"background    5 of 9 photos in {folder} (5 x {FILTERS} float16, 0 KiB" in report.table()
    bundle = Bundle.open(tmp_path / "a.eab")
    background = bundle.load_background()
    assert background.dtype == np.float16 and background.shape == (5, FILTERS)
    visible = sorted(path for path in folder.rglob("*.png") if not any(p.startswith(".") for p in path.relative_to(folder).parts))
    embedded = Runtime.open(tmp_path / "a.eab").embed(visible).astype(np.float16)
    matches = [int(np.flatnonzero((embedded == row).all(axis=1))[0]) for row in background]
    assert len(set(matches)) == 5  # five distinct visible photos, none from the dot-folder or dot-file
    again = import_classifier(models["uint8"], None, tmp_path / "b.eab", settings)
    assert again.background_count == 5
    assert np.array_equal(Bundle.open(tmp_path / "b.eab").load_background(), background)
    assert "background 5 embeddings of ordinary photos, float16" in describe_bundle(bundle)


def test_background_folder_without_readable_images_is_refused_and_nothing_written(models, tmp_path):
    output = tmp_path / "bg.eab"
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (unreadable / "notes.txt").write_text("text")
    _photos(unreadable / ".cache", 2, seed=5)  # hidden: not used
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, message in ((unreadable, "none of the 1 image files .* could be read"),
                            (empty, "holds no .* images"), (tmp_path / "missing", "does not exist")):
        with pytest.raises(DatasetError, match=message):
            import_classifier(models["float"], None, output, ImportSettings(probes=4, onnx=False, background=folder))
        assert not output.exists()
    with pytest.raises(SystemExit):
        host_main(["import", str(models["float"]), "--out", str(output), "--background", str(empty),
                   "--background-limit", "0"])
    assert not output.exists()


# ----------------------------------------------------------------------------- host add-classes
def _imported_classifier(models, tmp_path: Path) -> Path:
    output = tmp_path / "classifier.eab"
    import_classifier(models["classifier"], ["x", "y", "z"], output, ImportSettings(probes=8, onnx=False))
    return output


def test_host_add_classes_on_an_imported_bundle_without_statistics_learns_by_default(models, tmp_path, capsys):
    bundle = _imported_classifier(models, tmp_path)
    data = tmp_path / "new"
    _photos(data / "mug", 3, seed=41)
    _photos(data / "keys", 3, seed=42)
    assert host_main(["add-classes", str(bundle), "--data", str(data), "--out", str(tmp_path / "v2.eab"),
                      "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == STATISTICS_FREE_METHOD and result["old_rows_unchanged"]
    assert Bundle.open(tmp_path / "v2.eab").manifest.class_names == ["x", "y", "z", "keys", "mug"]
    # the device updater chooses the same way
    runtime = Runtime.open(bundle)
    assert HeadUpdater(runtime).add_class("mug", sorted((data / "mug").iterdir()), force=True).change["method"] \
        == STATISTICS_FREE_METHOD


def test_host_add_classes_checks_the_method_before_embedding(models, tmp_path, capsys):
    bundle = _imported_classifier(models, tmp_path)
    data = tmp_path / "new"
    (data / "mug").mkdir(parents=True)
    (data / "mug" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # embedding it would raise InputError
    output = tmp_path / "v2.eab"
    with pytest.raises(IncompatibleModelError, match="'ridge' needs class statistics with a Gram matrix"):
        add_classes(bundle, data, output, options=AddClassOptions(method="ridge"))
    with pytest.raises(IncompatibleModelError, match="'center_l2' needs a head trained on centred"):
        add_classes(bundle, data, output, options=AddClassOptions(method="center_l2"))
    assert host_main(["add-classes", str(bundle), "--data", str(data), "--out", str(output), "--method", "ridge"]) != 0
    assert "needs class statistics" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        host_main(["add-classes", str(bundle), "--data", str(data), "--out", str(output), "--method", "fancy"])
    assert "invalid choice: 'fancy'" in capsys.readouterr().err
    assert not output.exists()


def test_host_add_classes_bad_shots(models, tmp_path):
    bundle = _imported_classifier(models, tmp_path)
    output = tmp_path / "v2.eab"
    nan = np.ones((2, FILTERS), np.float32)
    nan[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        add_classes(bundle, {"mug": nan}, output)
    with pytest.raises(InputError, match="zero"):
        add_classes(bundle, {"mug": np.zeros((0, FILTERS), np.float32)}, output)
    with pytest.raises(InputError, match="zero images"):
        add_classes(bundle, {"mug": []}, output)
    assert not output.exists()
    photo = _photos(tmp_path / "one", 1, seed=51)[0]
    result = add_classes(bundle, {"mug": [photo, photo, photo]}, output)
    assert result.added[0]["examples"] == 1 and "duplicate(s) ignored" in " ".join(result.notes)
    single = add_classes(bundle, {"mug": [photo]}, tmp_path / "single.eab")
    assert np.array_equal(Bundle.open(output).load_head().weights, Bundle.open(tmp_path / "single.eab").load_head().weights)
    assert single.method == result.method == STATISTICS_FREE_METHOD


# ----------------------------------------------------------------------------- real MobileNet, Coral's flow
DATA = Path(os.environ.get("EDGEADAPT_DATA", Path(__file__).resolve().parents[2] / ".." / "shared" / "data"))
MOBILENET = DATA / "imagenet_mobilenet" / "mobilenet_v1_0.25_128_quant.tflite"


@pytest.mark.real_data
@pytest.mark.skipif(not MOBILENET.is_file() or not (DATA / "clothing").is_dir(), reason="needs ../shared/data")
def test_real_headless_extractor_learns_clothing_from_one_photo_each(tmp_path):
    """The backbone of the imported real MobileNet, imported headless with a background, learns 3 clothing
    classes from 1 photo each (Coral's imprinting, --method imprint) and recognises near-duplicates of them."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from bench_headless import near_duplicate

    classifier = tmp_path / "classifier.eab"
    import_classifier(MOBILENET, DATA / "imagenet_mobilenet" / "imagenet_labels.txt", classifier,
                      ImportSettings(onnx=False, probes=4))
    extractor = tmp_path / "extractor.eab"
    report = import_classifier(classifier / "backbone.int8.tflite", None, extractor,
                               ImportSettings(onnx=False, probes=8, background=DATA / "detection" / "coco_old",
                                              background_limit=32))
    assert report.num_classes == 0 and report.embedding_size == 256 and report.background_count == 32
    runtime = Runtime.open(extractor)
    updater = HeadUpdater(runtime, options=AddClassOptions(method="imprint"))
    names = ["shoes", "dress", "pants"]
    firsts = [sorted((DATA / "clothing" / name).iterdir())[0] for name in names]
    for name, photo in zip(names, firsts):
        assert updater.add_class(name, [photo]).gate.passed
    predicted = [row[0].label for row in runtime.predict([near_duplicate(photo) for photo in firsts])]
    assert predicted == names
