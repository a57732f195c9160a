"""export_bundle stores the ridge solver state only with BundleExportOptions(ridge_solver_state=True)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("ai_edge_litert")

from edgeadapt import Bundle, ClassStats, HeadUpdater, Runtime  # noqa: E402
from edgeadapt.converters import BundleExportOptions, export_bundle  # noqa: E402
from edgeadapt.device.incremental import AddClassOptions  # noqa: E402
from edgeadapt.training.backbones import BackboneOptions, build_classifier  # noqa: E402
from edgeadapt.training.head_training import HeadTrainingOptions, train_head  # noqa: E402
from edgeadapt.training.input_adaptation import input_spec_for_model  # noqa: E402
from edgeadapt.training.model_split import split_classifier  # noqa: E402

TINY = BackboneOptions(stem_filters=8, blocks=(("conv", 8, 2), ("separable", 16, 2)), dropout=0.0)


def _ridge_files(bundle: Bundle) -> list[str]:
    return sorted(name for name in bundle.manifest.files if name.rsplit("/", 1)[-1].startswith("ridge_"))


def test_export_stores_the_ridge_solver_state_only_when_asked(tmp_path):
    split = split_classifier(build_classifier((32, 32, 3), 3, TINY))
    spec = input_spec_for_model(split.backbone)
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(12, *spec.shape)).astype(np.uint8)
    labels = np.arange(12) % 3
    embeddings = np.asarray(split.backbone(images.astype(np.float32) * spec.scale + spec.offset, training=False))
    stats = ClassStats.from_embeddings(embeddings, labels, 3)
    head = train_head(embeddings, labels, 3, HeadTrainingOptions(normalization="center"))  # agrees with the statistics
    path = tmp_path / "state.eab"
    export_bundle(path, backbone=split.backbone, head=head, input_spec=spec, class_names=["a", "b", "c"],
                  calibration_images=images, class_stats=stats,
                  options=BundleExportOptions(formats=("tflite",), quantize=False, measure_parity=False,
                                              ridge_solver_state=True))
    kept = Bundle.open(path)
    section = kept.manifest.data["head"]["statistics"]["ridge_basis"]
    assert sorted(section["files"].values()) == _ridge_files(kept) and section["classes"] == 3
    assert all((kept.path / name).is_file() for name in _ridge_files(kept))
    stored = kept.load_class_stats().ridge_basis
    # a ridge update reads the stored state (a device commit shares its files) rather than rebuilding it
    with Runtime.open(path) as runtime:
        HeadUpdater(runtime, options=AddClassOptions(method="ridge")).add_class("d", list(images[:3]), force=True)
    after = Bundle.open(path)
    assert after.manifest.data["head"]["statistics"]["ridge_basis"]["files"] == section["files"]
    assert np.array_equal(after.load_class_stats().ridge_basis.discriminant_inverse, stored.discriminant_inverse)
    # without the option (the default) the export stores none: see tests/device/test_ridge_basis.py, whose
    # fixture bundle is a default export
