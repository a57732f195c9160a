"""Bundle format: verification, corruption, tampering, packing, path traversal (no TensorFlow)."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgeadapt.device import Bundle, Runtime, pack_bundle, unpack_bundle
from edgeadapt.device import BundleError, EdgeAdaptError, IncompatibleModelError


def snapshot(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (to prove nothing on disk changed)."""
    return {
        str(file.relative_to(path)): hashlib.sha256(file.read_bytes()).hexdigest()
        for file in sorted(path.rglob("*")) if file.is_file()
    }


def test_open_verifies_and_describes(fixture_dir):
    bundle = Bundle.open(fixture_dir / "tiny.eab")
    manifest = bundle.manifest
    assert manifest.schema_version == 1
    assert {model["format"] for model in manifest.models} == {"tflite", "onnx"}
    assert all(model["quantization"] == "int8" for model in manifest.models)
    assert set(manifest.data["parity"]) == {"tflite", "onnx"}
    for figures in manifest.data["parity"].values():
        assert figures["top1_agreement"] >= 0.9
    stats = bundle.load_class_stats()
    head = bundle.load_head()
    assert stats.num_classes == head.num_classes == len(manifest.classes)
    assert stats.gram.shape == (head.embedding_size, head.embedding_size)
    assert all(info.origin == "base" for info in manifest.classes)


def test_corrupted_model_file_is_refused(bundle_copy):
    model = bundle_copy / "backbone.int8.tflite"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    before = snapshot(bundle_copy)
    with pytest.raises(BundleError, match="sha256"):
        Runtime.open(bundle_copy)
    assert snapshot(bundle_copy) == before


def test_truncated_file_is_refused(bundle_copy):
    model = bundle_copy / "backbone.int8.onnx"
    model.write_bytes(model.read_bytes()[:100])
    with pytest.raises(BundleError, match="truncated"):
        Bundle.open(bundle_copy)


def test_edited_head_is_refused(bundle_copy):
    head_file = bundle_copy / Bundle.open(bundle_copy).manifest.data["head"]["weights"]
    weights = np.load(head_file)
    weights[0, 0] += 1.0
    np.save(head_file, weights)
    with pytest.raises(BundleError, match="sha256"):
        Bundle.open(bundle_copy)


def test_missing_file_is_refused(bundle_copy):
    (bundle_copy / "backbone.int8.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        Bundle.open(bundle_copy)


def test_unknown_schema_version_is_refused(bundle_copy):
    manifest_path = bundle_copy / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data["schema_version"] = 99
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="schema_version 99"):
        Bundle.open(bundle_copy)


def test_invalid_manifest_json(bundle_copy):
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.open(bundle_copy)


def test_head_bound_to_another_backbone_is_refused(bundle_copy):
    manifest_path = bundle_copy / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data["head"]["backbone_fingerprint"] = "sha256:" + "0" * 64
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(IncompatibleModelError, match="bound to backbone"):
        Bundle.open(bundle_copy)


def test_manifest_path_escaping_the_bundle_is_refused(bundle_copy):
    manifest_path = bundle_copy / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data["files"]["../../etc/passwd"] = {"sha256": "0", "size": 1}
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="escapes"):
        Bundle.open(bundle_copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        Bundle.open(tmp_path / "nothing.eab")
    (tmp_path / "empty.eab").mkdir()
    with pytest.raises(BundleError, match="no manifest.json"):
        Bundle.open(tmp_path / "empty.eab")


def test_all_errors_share_one_base(bundle_copy):
    (bundle_copy / "manifest.json").write_text("[]")
    with pytest.raises(EdgeAdaptError):
        Bundle.open(bundle_copy)


def test_pack_and_unpack_round_trip(fixture_dir, tmp_path, test_images):
    images, _ = test_images
    packed = pack_bundle(fixture_dir / "tiny.eab", tmp_path / "tiny.eab.zip")
    unpacked = unpack_bundle(packed, tmp_path / "unpacked.eab")
    assert snapshot(unpacked) == snapshot(fixture_dir / "tiny.eab")
    direct = Runtime.open(fixture_dir / "tiny.eab").logits(images[:8])
    np.testing.assert_array_equal(Runtime.open(packed).logits(images[:8]), direct)


def test_unpack_refuses_path_traversal(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("manifest.json", "{}")
        archive.writestr("../outside.txt", "gotcha")
    with pytest.raises(BundleError, match="escapes"):
        unpack_bundle(evil, tmp_path / "out.eab")
    assert not (tmp_path / "outside.txt").exists()
    assert not (tmp_path / "out.eab").exists()


def test_unpack_refuses_corrupted_member(fixture_dir, tmp_path):
    packed = pack_bundle(fixture_dir / "tiny.eab", tmp_path / "tiny.zip")
    tampered = tmp_path / "tampered.zip"
    with zipfile.ZipFile(packed) as source, zipfile.ZipFile(tampered, "w") as sink:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith("bias.npy"):
                data = data[:-4] + b"\x00\x00\x80\x7f"
            sink.writestr(item, data)
    with pytest.raises(BundleError, match="sha256"):
        unpack_bundle(tampered, tmp_path / "out.eab")
    assert not (tmp_path / "out.eab").exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.eab")]
    assert leftovers == []


def test_unpack_refuses_non_zip(tmp_path):
    bogus = tmp_path / "bogus.zip"
    bogus.write_bytes(os.urandom(64))
    with pytest.raises(BundleError, match="not a packed bundle"):
        unpack_bundle(bogus, tmp_path / "out.eab")
