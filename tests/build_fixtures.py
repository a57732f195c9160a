"""Build the real test bundle that device tests use (needs TensorFlow; run on the host).

    python tests/build_fixtures.py OUT_DIR

writes OUT_DIR/tiny.eab (int8 TFLite + int8 ONNX backbones, head, class statistics),
OUT_DIR/images/<class>/*.png (held-out test images) and OUT_DIR/info.json. The device
test environment (no TensorFlow) reads them through EDGEADAPT_TEST_FIXTURES=OUT_DIR.

:func:`cached_fixtures` keeps one build in a cache folder (pytest's ``.pytest_cache``), keyed
by the content of everything that shapes it (this file, the ``sdk/``, ``converters/`` and
``device/`` sources, the versions of the libraries that train and convert, the platform),
and checked file by file before each reuse; any other key or a changed file means a new build.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

FIXTURE_VERSION = 2


@contextlib.contextmanager
def deterministic_tensorflow():
    """TensorFlow with deterministic kernels inside the block, as it was afterwards.

    Tests that train a model and assert accuracy floors use it, so the floors cannot fail on
    an unlucky run (TF's CPU training is otherwise not bit-reproducible). Switched back off
    because pytest runs every test in one process.
    """
    from tensorflow.python.framework import config as tf_config

    was_deterministic = tf_config.is_op_determinism_enabled()
    tf_config.enable_op_determinism()
    try:
        yield
    finally:
        if not was_deterministic:
            tf_config.disable_op_determinism()


def build_fixtures(output: Path, seed: int = 0) -> Path:
    """Train a tiny classifier on the built-in data and export it as a bundle with test images."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np

    from edgeadapt.training.backbones import BackboneOptions
    from edgeadapt.converters.bundle_export import BundleExportOptions, export_bundle
    from edgeadapt.data.image_folders import SplitOptions, write_image_folder
    from edgeadapt.device.reference_embeddings import ReferenceEmbeddings
    from edgeadapt.device.head import ClassStats
    from edgeadapt.data.embeddings import compute_embeddings
    from edgeadapt.training.model_split import backbone_fingerprint, split_classifier
    from edgeadapt.data.synthetic import SyntheticOptions, synthetic_dataset
    from edgeadapt.training.classifier import ClassifierTrainingOptions, train_classifier

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    dataset = synthetic_dataset(SyntheticOptions(num_classes=5, images_per_class=120, image_size=32, seed=seed),
                                SplitOptions(seed=seed))
    backbone_options = BackboneOptions(
        stem_filters=16,
        blocks=(("conv", 16, 1), ("conv", 16, 2), ("conv", 32, 1), ("conv", 32, 2), ("separable", 64, 1)),
    )
    # deterministic kernels: every CI run gets the same fixture, so accuracy floors in tests
    # cannot fail on an unlucky training run (TF's CPU training is otherwise not reproducible)
    with deterministic_tensorflow():
        model = train_classifier(dataset, ClassifierTrainingOptions(epochs=30, patience=10, seed=seed, verbose=0,
                                                                    backbone=backbone_options))
    split = split_classifier(model)
    train_embeddings = compute_embeddings(split.backbone, dataset.train.images, dataset.spec, progress=False)
    stats = ClassStats.from_embeddings(train_embeddings, dataset.train.labels, len(dataset.class_names))
    fingerprint = backbone_fingerprint(split.backbone)
    export = export_bundle(
        output / "tiny.eab",
        backbone=split.backbone,
        head=split.head,
        input_spec=dataset.spec,
        class_names=dataset.class_names,
        calibration_images=dataset.train.images,
        calibration_labels=dataset.train.labels,
        evaluation_images=dataset.test.images,
        evaluation_labels=dataset.test.labels,
        class_stats=stats,
        backbone_fingerprint=fingerprint,
        reference_embeddings=ReferenceEmbeddings.select(train_embeddings, dataset.train.labels, per_class=5),
        options=BundleExportOptions(name="tiny", overwrite=True, calibration_samples=100),
    )
    write_image_folder(output / "images", dataset.class_names, dataset.test.images, dataset.test.labels)
    np.save(output / "test_images.npy", dataset.test.images)
    np.save(output / "test_labels.npy", dataset.test.labels)
    np.save(output / "train_images.npy", dataset.train.images)
    np.save(output / "train_labels.npy", dataset.train.labels)
    test_embeddings = compute_embeddings(split.backbone, dataset.test.images, dataset.spec, progress=False)
    keras_accuracy = float(np.mean(split.head.logits(test_embeddings).argmax(1) == dataset.test.labels))
    info = {
        "fixture_version": FIXTURE_VERSION,
        "class_names": dataset.class_names,
        "keras_test_accuracy": keras_accuracy,
        "parity": {name: report.to_dict() for name, report in export.parity.items()},
    }
    (output / "info.json").write_text(json.dumps(info, indent=2))
    return output


#: Packages whose versions change what build_fixtures writes (training, conversion, quantization).
_KEYED_PACKAGES = ("tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime", "numpy", "ai-edge-litert", "pillow")
_SOURCE_FOLDERS = ("sdk", "converters", "device")
_CONTENTS_FILE = "contents.sha256.json"


def fixture_key() -> str:
    """A hash of everything the built fixture depends on: sources, library versions, platform."""
    from importlib import metadata

    digest = hashlib.sha256()
    digest.update(f"fixture {FIXTURE_VERSION} {sys.version} {platform.machine()} {platform.system()}\n".encode())
    for package in _KEYED_PACKAGES:
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            version = "absent"
        digest.update(f"{package}=={version}\n".encode())
    root = Path(__file__).resolve().parents[1]
    sources = [Path(__file__).resolve()]
    for folder in _SOURCE_FOLDERS:
        sources += sorted((root / folder).rglob("*.py"))
    for source in sources:
        digest.update(str(source.relative_to(root)).encode() + b"\0" + source.read_bytes() + b"\0")
    return digest.hexdigest()[:24]


def _contents(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> hex digest), the contents file itself excluded."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != _CONTENTS_FILE}


def _intact(folder: Path) -> bool:
    try:
        recorded = json.loads((folder / _CONTENTS_FILE).read_text())
    except (OSError, ValueError):
        return False
    return recorded == _contents(folder)


def cached_fixtures(cache_root: Path) -> Path:
    """The fixture folder for the current sources from ``cache_root``, built there first if needed.

    A cached build is reused only when its key (:func:`fixture_key`) matches and every file
    still has the content recorded right after the build; otherwise it is rebuilt. Builds land
    in a temporary folder renamed into place, so an interrupted or concurrent build is never
    half-read. Builds for other keys (and builds interrupted a day ago) are removed.
    """
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    key = fixture_key()
    target = cache_root / key
    if target.is_dir() and _intact(target):
        return target
    building = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=cache_root))
    build_fixtures(building)
    (building / _CONTENTS_FILE).write_text(json.dumps(_contents(building), indent=1))
    shutil.rmtree(target, ignore_errors=True)
    try:
        building.rename(target)
    except OSError:  # another session renamed its build first: use that one
        shutil.rmtree(building, ignore_errors=True)
        if not _intact(target):
            raise
    for entry in cache_root.iterdir():  # other keys, and builds interrupted more than a day ago
        building_now = entry.name.startswith(".build-") and time.time() - entry.stat().st_mtime < 86400
        if entry != target and not building_now:
            shutil.rmtree(entry, ignore_errors=True)
    return target


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/build_fixtures.py OUT_DIR")
    print(json.dumps(json.loads((build_fixtures(Path(sys.argv[1])) / "info.json").read_text()), indent=2))
