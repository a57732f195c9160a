"""`edgeadapt export-head` and the C head library on a real imported MobileNet (host environment)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from edgeadapt import cli
from edgeadapt.device import Bundle, Runtime, pack_bundle
from edgeadapt.device.head_file import carry_head_file, head_from_bytes, load_carried_head_file, read_head_file

C_DIR = Path(__file__).resolve().parents[2] / "device" / "c"
DATA = Path(os.environ.get("EDGEADAPT_DATA", Path(__file__).resolve().parents[2] / ".." / "shared" / "data"))
MOBILENET = DATA / "imagenet_mobilenet"


def test_export_head_writes_the_bundle_head(fixture_dir, tmp_path, capsys):
    bundle = Bundle.open(fixture_dir / "tiny.eab")
    out = tmp_path / "head.eah"
    assert cli.main(["export-head", str(fixture_dir / "tiny.eab"), "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    written = read_head_file(out)
    assert report["bytes"] == out.stat().st_size and report["weights"] == "float32"
    assert written.class_names == bundle.manifest.class_names
    assert np.array_equal(written.head.weights, bundle.load_head().weights)
    assert cli.main(["export-head", str(fixture_dir / "tiny.eab"), "--out", str(tmp_path / "q.eah"), "--int8"]) == 0
    assert read_head_file(tmp_path / "q.eah").is_int8
    assert "int8 head" in capsys.readouterr().out


def test_export_head_refuses_to_overwrite(fixture_dir, tmp_path, capsys):
    out = tmp_path / "head.eah"
    out.write_bytes(b"keep me")
    assert cli.main(["export-head", str(fixture_dir / "tiny.eab"), "--out", str(out)]) == 1  # a domain error
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert cli.main(["export-head", str(fixture_dir / "tiny.eab"), "--out", str(out), "--overwrite"]) == 0
    assert head_from_bytes(out.read_bytes()).head.num_classes == 5


def test_export_head_needs_something_to_write(fixture_dir, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["export-head", str(fixture_dir / "tiny.eab")])
    assert stopped.value.code == 2 and "--into-bundle" in capsys.readouterr().err


def test_export_head_into_the_bundle(bundle_copy, tmp_path, capsys):
    version = Bundle.open(bundle_copy).manifest.version
    report_path = tmp_path / "report.json"
    assert cli.main(["export-head", str(bundle_copy), "--into-bundle", "--int8", "--json-out", str(report_path)]) == 0
    assert "the bundle carries it as heads/" in capsys.readouterr().out
    report = json.loads(report_path.read_text())
    bundle = Bundle.open(bundle_copy)
    assert report["bundle_version"] == bundle.manifest.version == version + 1 and report["out"] is None
    carried = load_carried_head_file(bundle)
    assert carried.is_int8 and report["carried_in_bundle"] == bundle.manifest.data["head"]["head_file"]["file"]
    assert report["sha256"] == (bundle_copy / report["carried_in_bundle"]).read_bytes()[-32:].hex()
    packed = tmp_path / "packed.zip"
    pack_bundle(bundle_copy, packed)
    assert cli.main(["export-head", str(packed), "--into-bundle"]) == 1  # updates need the directory
    assert "packed bundle" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.skipif(not (MOBILENET / "mobilenet_v1_0.25_128_quant.tflite").is_file(), reason="needs ../shared/data")
@pytest.mark.skipif(shutil.which("gcc") is None, reason="no gcc: the C head library cannot be built")
def test_c_library_on_the_imported_mobilenet_and_flowers(tmp_path):
    """The real 1001-class head: C float32 logits match, int8 keeps >= 99% of top-1 on the flowers test split."""
    from edgeadapt.bundles.importing import ImportSettings, import_classifier
    from PIL import Image

    bundle_path = tmp_path / "mobilenet.eab"
    import_classifier(MOBILENET / "mobilenet_v1_0.25_128_quant.tflite", MOBILENET / "imagenet_labels.txt",
                      bundle_path, ImportSettings(onnx=False, probes=4))
    cli_binary = tmp_path / "ea_head_cli"
    subprocess.run(["gcc", "-O2", "-o", str(cli_binary), "edgeadapt_head_cli.c", "edgeadapt_head.c", "ea_sha256.c",
                    "-lm"], cwd=C_DIR, check=True)
    photos = sorted((DATA / "flowers").rglob("*.jpg"))[::5]  # every 5th photo: the test split
    with Runtime.open(bundle_path) as runtime:
        embeddings = np.concatenate([runtime.embed([Image.open(path).convert("RGB") for path in photos[i:i + 64]])
                                     for i in range(0, len(photos), 64)]).astype("<f4")
        head = runtime.head
    embeddings.tofile(tmp_path / "e.f32")
    expected = head.logits(embeddings)
    results = {}
    for mode in ("float32", "int8"):
        out = tmp_path / f"{mode}.eah"
        arguments = ["export-head", str(bundle_path), "--out", str(out)] + (["--int8"] if mode == "int8" else [])
        assert cli.main(arguments) == 0
        subprocess.run([str(cli_binary), "logits", str(out), str(tmp_path / "e.f32"), str(tmp_path / "l.f32")],
                       check=True)
        results[mode] = np.fromfile(tmp_path / "l.f32", dtype="<f4").reshape(expected.shape)
    assert expected.shape == (len(photos), 1001)
    assert np.abs(results["float32"] - expected).max() <= 1e-5 * np.abs(expected).max()
    assert np.mean(results["int8"].argmax(1) == expected.argmax(1)) >= 0.99


def test_host_writers_of_a_new_version_rewrite_the_carried_file(bundle_copy, test_images, tmp_path):
    """merge-deltas and incremental training write new bundles whose carried .eah holds the new head."""
    from edgeadapt.bundles.deltas import merge_deltas
    from edgeadapt.device import HeadUpdater
    from edgeadapt.bundles.version_writing import write_version

    carry_head_file(bundle_copy, int8=True)
    base = Bundle.open(bundle_copy)
    renamed = [dict(entry) for entry in base.manifest.data["classes"]]
    renamed[0]["name"] = "first"
    write_version(base, base.load_head(), base.load_class_stats(), renamed, tmp_path / "renamed.eab",
                  {"action": "rename-class"})
    written = Bundle.open(tmp_path / "renamed.eab")
    carried = load_carried_head_file(written)
    assert carried.class_names[0] == "first" and carried.is_int8
    assert written.manifest.data["head"]["head_file"]["file"] == f"heads/v{written.manifest.version}/head.eah"

    images, labels = test_images
    device = tmp_path / "device.eab"
    shutil.copytree(bundle_copy, device)
    with Runtime.open(device) as runtime:
        updater = HeadUpdater(runtime)
        updater.add_class_embeddings("extra", runtime.embed(images[labels == 1][:4]), force=True)
        delta = updater.export_delta(tmp_path / "device.eadelta", source="device")
    merge_deltas(bundle_copy, [delta], tmp_path / "merged.eab")
    merged = Bundle.open(tmp_path / "merged.eab")
    carried = load_carried_head_file(merged)
    assert carried.class_names == merged.manifest.class_names and carried.class_names[-1] == "extra"
    assert [name for name in merged.manifest.files if name.endswith(".eah")] == [
        merged.manifest.data["head"]["head_file"]["file"]]
