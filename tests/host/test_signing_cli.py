"""Host side of signing: ``edgeadapt keys generate`` / ``sign`` / ``verify`` / ``inspect``, and fleet
enrolment: ``merge-deltas --trust-devices DIR`` merges only deltas signed by enrolled device keys.

Skipped when ``cryptography`` (the ``signing`` extra) is absent.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cryptography")

from edgeadapt.cli import main  # noqa: E402
from edgeadapt.bundles.deltas import MergeDeltasOptions, merge_deltas  # noqa: E402
from edgeadapt.device.errors import UnknownSignerError, UnsignedError  # noqa: E402
from edgeadapt.device.keys import load_public_key  # noqa: E402
from edgeadapt.device.runtime import Runtime  # noqa: E402
from edgeadapt.device.trust import load_trust_dir  # noqa: E402
from edgeadapt.device.updater import HeadUpdater  # noqa: E402


@pytest.fixture(scope="module")
def train_images(fixture_dir):
    return np.load(fixture_dir / "train_images.npy"), np.load(fixture_dir / "train_labels.npy")


def generate(folder: Path, name: str, capsys) -> tuple[Path, Path]:
    assert main(["keys", "generate", "--out", str(folder), "--name", name, "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    return Path(made["private_key"]), Path(made["public_key"])


def device_delta(base: Path, folder: Path, name: str, examples: np.ndarray, device_key: Path | None) -> Path:
    device = folder / f"{name}.eab"
    shutil.copytree(base, device)
    updater = HeadUpdater(Runtime.open(device), device_key=device_key)
    updater.remove_class("ring")
    updater.add_class(f"ring-{name}", list(examples), force=True)
    command = ["export-delta", str(device), str(folder / f"{name}.eadelta"), "--source", name]
    from edgeadapt.device.cli import main as device_main

    assert device_main(command + (["--device-key", str(device_key)] if device_key else [])) == 0
    return folder / f"{name}.eadelta"


def test_keys_sign_inspect_verify(bundle_copy, tmp_path, capsys):
    private, public = generate(tmp_path / "keys", "publisher", capsys)
    assert private.stat().st_mode & 0o777 == 0o600
    assert main(["inspect", str(bundle_copy)]) == 0
    assert "signature  unsigned" in capsys.readouterr().out
    assert main(["sign", str(bundle_copy), "--key", str(private)]) == 0
    capsys.readouterr()
    key_id = load_public_key(public).key_id
    assert main(["inspect", str(bundle_copy), "--trust", str(public)]) == 0
    assert f"signed by {key_id} (verified with a trusted key)" in capsys.readouterr().out
    assert main(["verify", str(bundle_copy), "--trust", str(public), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["signer"] == key_id
    # a public key given as the signing key, a private key given as a trusted key
    assert main(["sign", str(bundle_copy), "--key", str(public)]) == 1
    assert "is a public key" in capsys.readouterr().err
    assert main(["verify", str(bundle_copy), "--trust", str(private)]) == 1
    assert "is a private key" in capsys.readouterr().err


def test_merge_deltas_accepts_only_enrolled_devices_and_resigns(bundle_copy, train_images, tmp_path, capsys):
    images, labels = train_images
    publisher_key, publisher = generate(tmp_path / "publisher", "publisher", capsys)
    enrolled_key, enrolled = generate(tmp_path / "fleet", "dev1", capsys)
    stranger_key, _ = generate(tmp_path / "strangers", "dev9", capsys)
    assert main(["sign", str(bundle_copy), "--key", str(publisher_key)]) == 0
    capsys.readouterr()
    ring = images[labels == 4]
    good = device_delta(bundle_copy, tmp_path, "dev1", ring[:5], enrolled_key)
    rogue = device_delta(bundle_copy, tmp_path, "dev9", ring[5:10], stranger_key)
    unsigned = device_delta(bundle_copy, tmp_path, "dev5", ring[10:15], None)
    fleet = tmp_path / "fleet"

    out = tmp_path / "merged.eab"
    for bad in (rogue, unsigned):  # a delta signed by an unknown device, or not signed: nothing written
        assert main(["merge-deltas", str(bundle_copy), str(good), str(bad), "--out", str(out),
                     "--trust-devices", str(fleet)]) == 1
        assert not out.exists()
    errors = capsys.readouterr().err
    assert "not among the trusted keys" in errors and "not signed by a device key" in errors
    with pytest.raises(UnknownSignerError):
        merge_deltas(bundle_copy, [rogue], out, MergeDeltasOptions(trusted_devices=load_trust_dir(fleet)))
    with pytest.raises(UnsignedError):
        merge_deltas(bundle_copy, [unsigned], out, MergeDeltasOptions(trusted_devices=load_trust_dir(fleet)))
    assert not out.exists()

    # ring-dev1 is learned from ring's photos while the base still has ring: past the update gate with --force
    assert main(["merge-deltas", str(bundle_copy), str(good), "--out", str(out), "--trust-devices", str(fleet),
                 "--force", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    device_id = load_public_key(enrolled).key_id
    assert report["signers"] == {str(good): device_id}
    assert Runtime.open(out).manifest.data["change"]["deltas"][0]["signer"] == device_id
    # the merged bundle is new and unsigned until the publisher signs it again: one command
    with pytest.raises(UnsignedError):
        Runtime.open(out, trusted_keys=[publisher])
    assert main(["sign", str(out), "--key", str(publisher_key)]) == 0
    reopened = Runtime.open(out, trusted_keys=[publisher])
    assert reopened.bundle.signature.state == "signed" and "ring-dev1" in reopened.class_names


def test_sign_file_for_apps(tmp_path, capsys):
    private, public = generate(tmp_path / "keys", "publisher", capsys)
    model = tmp_path / "model.tflite"
    model.write_bytes(b"TFL3" + bytes(range(256)) * 8)
    assert main(["sign-file", str(model), "--key", str(private)]) == 0
    assert (tmp_path / "model.tflite.dsse.json").is_file()
    capsys.readouterr()
    assert main(["verify", str(model), "--trust", str(public)]) == 0
    assert "signed by" in capsys.readouterr().out
    model.write_bytes(model.read_bytes() + b"\0")
    assert main(["verify", str(model), "--trust", str(public)]) == 1
    assert "changed after signing" in capsys.readouterr().err


def test_export_fused_signs_the_app_file(bundle_copy, tmp_path, capsys):
    private, public = generate(tmp_path / "keys", "publisher", capsys)
    out = tmp_path / "app.onnx"
    assert main(["export-fused", str(bundle_copy), "--format", "onnx", "--out", str(out), "--probes", "4",
                 "--sign-key", str(private)]) == 0
    assert "signed:" in capsys.readouterr().out
    from edgeadapt.device.signing import verify_file

    assert verify_file(out, [public]) == load_public_key(public).key_id
    # a bad key is refused before anything is written
    never = tmp_path / "never.onnx"
    assert main(["export-fused", str(bundle_copy), "--format", "onnx", "--out", str(never),
                 "--sign-key", str(public)]) == 1
    assert not never.exists()
