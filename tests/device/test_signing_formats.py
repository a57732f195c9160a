"""Where signatures meet the hardened readers: packed bundles, deltas, the manifest schema, the
order of the checks, and the device commands that run single files (no TensorFlow).

The signature files are the only unlisted files a bundle, a packed bundle or a delta may hold,
they are size-capped before anything is inflated or parsed, and the manifest's ``derived_from``
is checked like every other field. Skipped when ``cryptography`` is absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cryptography")

from edgeadapt.device import dsse, signing  # noqa: E402
from edgeadapt.device.bundle import Bundle, pack_bundle  # noqa: E402
from edgeadapt.device.cli import main as device_main  # noqa: E402
from edgeadapt.device.delta import export_delta, read_delta  # noqa: E402
from edgeadapt.device.dsse import DEVICE_SIGNATURE_NAME, MAX_SIGNATURE_BYTES, SIGNATURE_NAME  # noqa: E402
from edgeadapt.device.errors import (  # noqa: E402
    BundleError,
    ChangedAfterSigningError,
    MalformedSignatureError,
    SignatureError,
    UnknownSignerError,
    UnsignedError,
)
from edgeadapt.device.keys import generate_keypair  # noqa: E402
from edgeadapt.device.manifest import Manifest  # noqa: E402
from edgeadapt.device.runtime import Runtime  # noqa: E402
from edgeadapt.device.updater import HeadUpdater  # noqa: E402


@pytest.fixture
def keys(tmp_path) -> dict[str, tuple[Path, Path]]:
    return {name: generate_keypair(tmp_path / "keys" / name, name) for name in ("publisher", "device")}


@pytest.fixture
def signed(bundle_copy, keys) -> Path:
    signing.sign_bundle(bundle_copy, keys["publisher"][0])
    return bundle_copy


@pytest.fixture
def delta_path(signed, keys, fixture_dir, tmp_path) -> Path:
    images, labels = np.load(fixture_dir / "train_images.npy"), np.load(fixture_dir / "train_labels.npy")
    HeadUpdater(Runtime.open(signed)).add_class("mug", list(images[labels == 0][:5]), force=True)
    return export_delta(signed, tmp_path / "d.eadelta", source="dev1", device_key=keys["device"][0])


def rewrite_zip(source: Path, target: Path, edit) -> Path:
    """Copy a zip member by member; ``edit(members)`` may change the dict of name -> bytes."""
    with zipfile.ZipFile(source) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    edit(members)
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return target


def snapshot(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


# ----------------------------------------------------------------------------- packed bundles
def test_packed_bundle_carries_both_signature_files_and_checks_them_with_keys(signed, keys, fixture_dir, tmp_path):
    images, labels = np.load(fixture_dir / "train_images.npy"), np.load(fixture_dir / "train_labels.npy")
    HeadUpdater(Runtime.open(signed), device_key=keys["device"][0]).add_class(
        "mug", list(images[labels == 0][:5]), force=True)
    assert (signed / DEVICE_SIGNATURE_NAME).is_file()
    packed = pack_bundle(signed, tmp_path / "device.zip")
    assert {SIGNATURE_NAME, DEVICE_SIGNATURE_NAME} <= set(zipfile.ZipFile(packed).namelist())
    from edgeadapt.device.trust import TrustedKeys

    strict = TrustedKeys.from_files([keys["publisher"][1], keys["device"][1]], require_device_signature=True)
    with Runtime.open(packed, trusted_keys=strict).bundle as bundle:
        assert bundle.signature.state == "derived" and bundle.signature.device_signer is not None


def test_packed_bundle_with_a_damaged_signature_is_refused_and_leaves_no_copy(signed, keys, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    packed = pack_bundle(signed, tmp_path / "signed.zip")

    def damage(members):
        members[SIGNATURE_NAME] = members[SIGNATURE_NAME][:50]

    damaged = rewrite_zip(packed, tmp_path / "damaged.zip", damage)
    with pytest.raises(MalformedSignatureError):
        Runtime.open(damaged, trusted_keys=[keys["publisher"][1]])
    assert list(scratch.iterdir()) == []
    with Bundle.open(damaged) as bundle:  # without keys the signature is not read: today's behaviour
        assert bundle.signature is None


def test_packing_carries_signatures_unchecked_whatever_the_environment(bundle_copy, keys, tmp_path, monkeypatch):
    from edgeadapt.device.trust import TRUST_DIR_ENV

    folder = tmp_path / "trust"
    folder.mkdir(mode=0o755)
    (folder / "publisher.pub").write_bytes(keys["publisher"][1].read_bytes())
    monkeypatch.setenv(TRUST_DIR_ENV, str(folder))
    with pytest.raises(UnsignedError):
        Bundle.open(bundle_copy)
    packed = pack_bundle(bundle_copy, tmp_path / "unsigned.zip")  # packing is copying: no check
    with pytest.raises(UnsignedError):
        Runtime.open(packed)
    assert Bundle.open(bundle_copy, trusted_keys=False).signature is None  # explicit opt-out wins over the folder


def test_a_manifest_may_not_list_a_signature_file(bundle_copy):
    data = json.loads((bundle_copy / "manifest.json").read_text())
    for name in (SIGNATURE_NAME, DEVICE_SIGNATURE_NAME):
        bad = json.loads(json.dumps(data))
        bad["files"][name] = {"sha256": "0" * 64, "size": 1}
        with pytest.raises(BundleError, match="reserved"):
            Manifest(bad).validate()


# ----------------------------------------------------------------------------- order of the checks
def test_signature_is_checked_before_any_listed_file_is_read(signed, keys):
    data = json.loads((signed / "manifest.json").read_text())
    data["classes"][0]["name"] = "tampered"
    (signed / "manifest.json").write_text(json.dumps(data))  # checksums untouched: files still match
    (signed / data["head"]["weights"]).unlink()  # would be "missing" if files were read first
    with pytest.raises(ChangedAfterSigningError, match="manifest.json changed after signing"):
        Runtime.open(signed, trusted_keys=[keys["publisher"][1]])
    with pytest.raises(BundleError, match="missing"):
        Runtime.open(signed)


def test_keys_make_the_file_check_mandatory(signed, keys):
    weights = signed / json.loads((signed / "manifest.json").read_text())["head"]["weights"]
    content = bytearray(weights.read_bytes())
    content[-1] ^= 0x01
    weights.write_bytes(bytes(content))
    Bundle.open(signed, verify=False)  # without keys, verify=False skips the checksums (today's behaviour)
    with pytest.raises(BundleError, match="sha256"):
        Bundle.open(signed, verify=False, trusted_keys=[keys["publisher"][1]])


def test_symlinked_or_oversized_signature_file_is_refused(signed, keys, tmp_path):
    outside = tmp_path / "elsewhere.json"
    (signed / SIGNATURE_NAME).rename(outside)
    os.symlink(outside, signed / SIGNATURE_NAME)
    with pytest.raises(BundleError, match="symbolic link"):
        Runtime.open(signed, trusted_keys=[keys["publisher"][1]])
    (signed / SIGNATURE_NAME).unlink()
    (signed / SIGNATURE_NAME).write_bytes(b" " * (MAX_SIGNATURE_BYTES + 1))
    with pytest.raises(MalformedSignatureError, match="allowed"):
        Runtime.open(signed, trusted_keys=[keys["publisher"][1]])


def test_signing_refuses_a_bundle_with_a_link_and_writes_nothing(bundle_copy, keys, tmp_path):
    (tmp_path / "outside.json").write_text("{}")
    os.symlink(tmp_path / "outside.json", bundle_copy / SIGNATURE_NAME)  # a planted link at the signature's name
    before = {path.name for path in bundle_copy.iterdir()}
    with pytest.raises(BundleError, match="symbolic link"):
        signing.sign_bundle(bundle_copy, keys["publisher"][0])
    assert {path.name for path in bundle_copy.iterdir()} == before
    assert (tmp_path / "outside.json").read_text() == "{}"


def test_signing_refuses_a_signature_larger_than_readers_accept(bundle_copy, keys, monkeypatch):
    before = snapshot(bundle_copy)
    monkeypatch.setattr(dsse, "MAX_SIGNATURE_BYTES", 512)
    with pytest.raises(SignatureError, match="more than the 512"):
        signing.sign_bundle(bundle_copy, keys["publisher"][0])
    assert snapshot(bundle_copy) == before


# ----------------------------------------------------------------------------- derived_from in the manifest
def test_device_version_records_a_valid_derived_from(delta_path, signed):
    derived = json.loads((signed / "manifest.json").read_text())["derived_from"]
    assert set(derived) == {"statement_sha256", "signed_version", "signer"}
    Bundle.open(signed)  # schema-checked on every open


@pytest.mark.parametrize(("value", "message"), [
    ([], "derived_from"),
    ({"signed_version": 1}, "statement_sha256"),
    ({"statement_sha256": "ABC"}, "statement_sha256"),
    ({"statement_sha256": "g" * 64}, "hexadecimal"),
    ({"statement_sha256": "0" * 64, "signed_version": "1"}, "signed_version"),
    ({"statement_sha256": "0" * 64, "signed_version": -1}, "signed_version"),
    ({"statement_sha256": "0" * 64, "signed_version": True}, "signed_version"),
    ({"statement_sha256": "0" * 64, "signer": 7}, "signer"),
    ({"statement_sha256": "0" * 64, "signer": "k" * 5000}, "signer"),
    ({"statement_sha256": "0" * 64, "chain": {"nested": 1}}, "chain"),
])
def test_malformed_derived_from_is_refused(bundle_copy, value, message):
    data = json.loads((bundle_copy / "manifest.json").read_text())
    data["derived_from"] = value
    (bundle_copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=message):
        Bundle.open(bundle_copy)


# ----------------------------------------------------------------------------- deltas
def test_delta_signature_member_is_the_one_unlisted_member(delta_path, keys, tmp_path):
    assert read_delta(delta_path).signer is None
    for name in ("signature", f"{SIGNATURE_NAME}.bak", DEVICE_SIGNATURE_NAME):
        extra = rewrite_zip(delta_path, tmp_path / "extra.eadelta", lambda members, name=name: members.update({name: b"x"}))
        with pytest.raises(BundleError, match="unexpected members"):
            read_delta(extra)


def test_oversized_delta_signature_is_refused_before_it_is_read(delta_path, keys, tmp_path):
    def inflate(members):
        members[SIGNATURE_NAME] = b" " * (MAX_SIGNATURE_BYTES + 1)

    big = rewrite_zip(delta_path, tmp_path / "big.eadelta", inflate)
    for trusted in (None, [keys["device"][1]]):  # refused whether or not a key checks it
        with pytest.raises(BundleError, match="more than"):
            read_delta(big, trusted_keys=trusted)


def test_duplicate_delta_signature_is_refused(delta_path, tmp_path):
    twice = tmp_path / "twice.eadelta"
    with zipfile.ZipFile(delta_path) as source, zipfile.ZipFile(twice, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in source.namelist():
            archive.writestr(name, source.read(name))
        archive.writestr(SIGNATURE_NAME, source.read(SIGNATURE_NAME))
    with pytest.raises(BundleError, match="twice"):
        read_delta(twice)


def test_delta_json_may_not_list_the_signature(delta_path, tmp_path):
    def list_signature(members):
        info = json.loads(members["delta.json"])
        data = members[SIGNATURE_NAME]
        info["files"][SIGNATURE_NAME] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        members["delta.json"] = json.dumps(info).encode()

    listed = rewrite_zip(delta_path, tmp_path / "listed.eadelta", list_signature)
    with pytest.raises(BundleError, match="may not hold"):
        read_delta(listed)


def test_delta_signature_moved_from_a_bundle_is_refused(delta_path, signed, keys, tmp_path):
    def swap(members):
        members[SIGNATURE_NAME] = (signed / SIGNATURE_NAME).read_bytes()  # a publisher signature of the bundle

    moved = rewrite_zip(delta_path, tmp_path / "moved.eadelta", swap)
    with pytest.raises(UnknownSignerError):
        read_delta(moved, trusted_keys=[keys["device"][1]])
    with pytest.raises(SignatureError, match="not a 'delta'"):
        read_delta(moved, trusted_keys=[keys["publisher"][1]])


def test_export_with_an_unusable_device_key_writes_nothing(delta_path, signed, keys, tmp_path):
    with pytest.raises(SignatureError, match="is a public key"):
        export_delta(signed, tmp_path / "never.eadelta", device_key=keys["device"][1])
    assert not (tmp_path / "never.eadelta").exists()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".never")]


# ----------------------------------------------------------------------------- single files on the device
def test_detect_with_trust_refuses_an_unsigned_or_changed_model(keys, tmp_path, capsys):
    model = tmp_path / "detector.tflite"
    model.write_bytes(b"TFL3" + os.urandom(512))
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    trust = ["--trust", str(keys["publisher"][1])]
    assert device_main(["detect", str(model), str(image), *trust]) == 1
    assert "has no signature" in capsys.readouterr().err
    signing.sign_file(model, keys["publisher"][0])
    model.write_bytes(model.read_bytes() + b"\0")
    assert device_main(["detect", str(model), str(image), *trust]) == 1
    assert "changed after signing" in capsys.readouterr().err


def test_verify_names_a_refused_delta_signer(delta_path, keys, capsys):
    assert device_main(["verify", str(delta_path), "--trust", str(keys["device"][1]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "delta"
    assert device_main(["verify", str(delta_path), "--trust", str(keys["publisher"][1])]) == 1
    assert "not among the trusted keys" in capsys.readouterr().err
