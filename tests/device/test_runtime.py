"""Device runtime on a real bundle: accuracy, batching, backends, preprocessing (no TensorFlow)."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from edgeadapt.device import Runtime
from edgeadapt.device.backends import available_backends
from edgeadapt.device import BackendUnavailableError, InputError

BACKENDS = [name for name in ("litert", "tflite-runtime", "onnxruntime") if name in available_backends()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_runtime_accuracy_matches_export_parity(fixture_dir, fixture_info, test_images, backend):
    images, labels = test_images
    runtime = Runtime.open(fixture_dir / "tiny.eab", backend=backend)
    assert runtime.backend_name == backend
    predictions = runtime.logits(images).argmax(1)
    accuracy = float(np.mean(predictions == labels))
    model_format = "onnx" if backend == "onnxruntime" else "tflite"
    recorded = fixture_info["parity"][model_format]["quantized_accuracy"]
    assert accuracy >= 0.85, f"{backend} accuracy {accuracy:.3f} is below the floor"
    assert abs(accuracy - recorded) < 1e-5, "runtime must reproduce the parity measured at export"


def test_auto_backend_prefers_tflite_interpreters(fixture_dir):
    runtime = Runtime.open(fixture_dir / "tiny.eab")
    assert runtime.backend_name == BACKENDS[0]


def test_predict_single_and_batch_agree(fixture_dir, test_images):
    images, _ = test_images
    runtime = Runtime.open(fixture_dir / "tiny.eab")
    single = [runtime.predict(image, top_k=3) for image in images[:6]]
    batch = runtime.predict(list(images[:6]), top_k=3)
    array_batch = runtime.predict(images[:6], top_k=3)
    assert len(batch) == 6 and len(array_batch) == 6
    for one, many, array_many in zip(single, batch, array_batch):
        assert [p.label for p in one] == [p.label for p in many] == [p.label for p in array_many]
        np.testing.assert_allclose([p.score for p in one], [p.score for p in many], rtol=1e-5, atol=1e-6)
        assert len(one) == 3 and one[0].score >= one[1].score >= one[2].score
        assert abs(sum(p.score for p in runtime.predict(images[0], top_k=100)) - 1.0) < 1e-4


def test_embed_batches_larger_than_batch_size(fixture_dir, test_images):
    images, _ = test_images
    runtime = Runtime.open(fixture_dir / "tiny.eab", batch_size=7)
    embeddings = runtime.embed(images[:20])
    assert embeddings.shape == (20, runtime.manifest.embedding_size)
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings[:7], runtime.embed(images[:7]), rtol=1e-5, atol=1e-5)


def test_image_paths_pil_and_arrays_give_same_answer(fixture_dir, fixture_info):
    from PIL import Image

    runtime = Runtime.open(fixture_dir / "tiny.eab")
    class_name = fixture_info["class_names"][0]
    path = sorted((fixture_dir / "images" / class_name).iterdir())[0]
    by_path = runtime.predict(path, top_k=1)[0]
    by_string = runtime.predict(str(path), top_k=1)[0]
    by_pil = runtime.predict(Image.open(path), top_k=1)[0]
    by_array = runtime.predict(np.asarray(Image.open(path).convert("RGB")), top_k=1)[0]
    assert by_path == by_string == by_pil == by_array


def test_other_sizes_and_modes_are_resized_and_converted(fixture_dir, test_images):
    from PIL import Image

    images, labels = test_images
    runtime = Runtime.open(fixture_dir / "tiny.eab")
    spec = runtime.input_spec
    big = [np.asarray(Image.fromarray(image).resize((spec.width * 3, spec.height * 3), Image.BILINEAR))
           for image in images[:30]]
    rgba = [np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=2) for image in images[:30]]
    base = runtime.logits(images[:30]).argmax(1)
    assert np.mean(runtime.logits(big).argmax(1) == base) >= 0.8
    assert np.array_equal(runtime.logits(rgba).argmax(1), base)
    gray = runtime.predict(images[0][:, :, 0], top_k=1)  # 2-D grayscale is replicated to RGB
    assert gray[0].label in runtime.class_names


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((32, 32, 3), np.float32), "dtype float32"),
        (np.zeros((32, 32, 2), np.uint8), "shape"),
        (np.zeros((2, 32, 32, 3, 1), np.uint8), "cannot read images"),
        (np.zeros((4, 32, 32, 3), np.int16), "dtype int16"),
        (12345, "cannot read"),
        ([], "empty list"),
    ],
)
def test_bad_images_raise_input_error(fixture_dir, bad, message):
    runtime = Runtime.open(fixture_dir / "tiny.eab")
    with pytest.raises(InputError, match=message):
        runtime.predict(bad)


def test_non_image_file_and_missing_file(fixture_dir, tmp_path):
    runtime = Runtime.open(fixture_dir / "tiny.eab")
    fake = tmp_path / "photo.jpg"
    fake.write_text("this is not a JPEG")
    with pytest.raises(InputError, match="not a readable image"):
        runtime.predict(fake)
    with pytest.raises(InputError, match="does not exist"):
        runtime.predict(tmp_path / "missing.png")
    assert fake.read_text() == "this is not a JPEG"


def test_unsupported_pil_mode(fixture_dir):
    from PIL import Image

    runtime = Runtime.open(fixture_dir / "tiny.eab")
    with pytest.raises(InputError, match="mode 'F'"):
        runtime.predict(Image.new("F", (32, 32)))


def test_unknown_backend_name(fixture_dir):
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        Runtime.open(fixture_dir / "tiny.eab", backend="tensorflow")


def test_device_package_never_imports_tensorflow(fixture_dir, test_images):
    """The device path must work without TensorFlow: check in a fresh interpreter."""
    import subprocess

    code = (
        "import sys, numpy as np\n"
        "from edgeadapt.device import Runtime\n"
        f"runtime = Runtime.open({str(fixture_dir / 'tiny.eab')!r})\n"
        "runtime.predict(np.zeros((32, 32, 3), np.uint8))\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf2onnx', 'tf_keras')]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
def test_tflite_and_onnx_backends_agree(fixture_dir, test_images):
    images, _ = test_images
    tflite_backend = next((name for name in BACKENDS if name != "onnxruntime"), None)
    if tflite_backend is None:
        pytest.skip("no TFLite interpreter installed")
    tflite = Runtime.open(fixture_dir / "tiny.eab", backend=tflite_backend).logits(images).argmax(1)
    onnx = Runtime.open(fixture_dir / "tiny.eab", backend="onnxruntime").logits(images).argmax(1)
    assert np.mean(tflite == onnx) >= 0.95
