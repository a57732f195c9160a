"""Signed bundles, device versions and deltas on a real bundle (no TensorFlow).

Every bad input of issue 15 is refused with a typed error and nothing on disk changes; the
positive paths open, update and reopen. Skipped when ``cryptography`` (the ``signing`` extra)
is absent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("cryptography")

from edgeadapt.device import signing  # noqa: E402
from edgeadapt.device.bundle import Bundle, pack_bundle  # noqa: E402
from edgeadapt.device.cli import main as device_main  # noqa: E402
from edgeadapt.device.delta import export_delta, read_delta  # noqa: E402
from edgeadapt.device.versions import VersionStore  # noqa: E402
from edgeadapt.device.dsse import canonical_json  # noqa: E402
from edgeadapt.device.errors import (  # noqa: E402
    BadSignatureError,
    ChangedAfterSigningError,
    KeyFileError,
    MalformedSignatureError,
    SignatureError,
    UnknownSignerError,
    UnsignedError,
)
from edgeadapt.device.inspection import describe_bundle  # noqa: E402
from edgeadapt.device.keys import generate_keypair, load_public_key  # noqa: E402
from edgeadapt.device.runtime import Runtime  # noqa: E402
from edgeadapt.device.trust import TRUST_DIR_ENV, TrustedKeys  # noqa: E402
from edgeadapt.device.updater import HeadUpdater  # noqa: E402


@pytest.fixture
def keys(tmp_path) -> dict[str, tuple[Path, Path]]:
    """Publisher, another publisher and a device key pair (private, public)."""
    return {name: generate_keypair(tmp_path / "keys" / name, name) for name in ("publisher", "other", "device")}


@pytest.fixture
def signed(bundle_copy, keys) -> Path:
    signing.sign_bundle(bundle_copy, keys["publisher"][0])
    return bundle_copy


@pytest.fixture(scope="module")
def train_images(fixture_dir):
    return np.load(fixture_dir / "train_images.npy"), np.load(fixture_dir / "train_labels.npy")


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (to prove nothing was written)."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def rewrite_manifest(bundle: Path, edit) -> None:
    """Edit manifest.json the way an attacker would: change it, recompute every checksum."""
    data = json.loads((bundle / "manifest.json").read_text())
    edit(data)
    for name in data["files"]:
        content = (bundle / name).read_bytes()
        data["files"][name] = {"sha256": hashlib.sha256(content).hexdigest(), "size": len(content)}
    (bundle / "manifest.json").write_text(json.dumps(data, indent=2) + "\n")


# ----------------------------------------------------------------------------- positive paths
def test_signed_bundle_opens_with_its_key_and_predicts_like_unsigned(signed, keys, test_images):
    images, _ = test_images
    public = keys["publisher"][1]
    runtime = Runtime.open(signed, trusted_keys=[public])
    status = runtime.bundle.signature
    assert status.state == "signed" and status.verified
    assert status.signer == load_public_key(public).key_id
    assert np.array_equal(runtime.logits(images[:8]), Runtime.open(signed).logits(images[:8]))
    assert f"signed by {status.signer} (verified" in describe_bundle(runtime.bundle)
    # without keys inspect still names the (unchecked) signer
    assert "not checked" in describe_bundle(Bundle.open(signed))


def test_unsigned_bundle_opens_without_keys_and_inspect_says_unsigned(bundle_copy, keys):
    bundle = Bundle.open(bundle_copy)
    assert bundle.signature is None
    assert "signature  unsigned" in describe_bundle(bundle)
    before = snapshot(bundle_copy)
    with pytest.raises(UnsignedError, match="unsigned"):
        Runtime.open(bundle_copy, trusted_keys=[keys["publisher"][1]])
    with pytest.raises(UnsignedError):  # an empty trust list trusts nothing
        Bundle.open(bundle_copy, trusted_keys=[])
    assert snapshot(bundle_copy) == before


def test_trust_directory_from_the_environment(signed, bundle_copy, keys, tmp_path, monkeypatch):
    folder = tmp_path / "trust"
    folder.mkdir(mode=0o755)
    (folder / "publisher.pub").write_bytes(keys["publisher"][1].read_bytes())
    monkeypatch.setenv(TRUST_DIR_ENV, str(folder))
    assert Runtime.open(signed).bundle.signature.state == "signed"
    unsigned = tmp_path / "unsigned.eab"
    (signed / signing.SIGNATURE_NAME).rename(tmp_path / "moved.json")
    signed.rename(unsigned)
    with pytest.raises(UnsignedError):
        Runtime.open(unsigned)
    os.chmod(folder, 0o777)
    with pytest.raises(KeyFileError, match="writable by other users"):
        Runtime.open(unsigned)


def test_packed_signed_bundle_keeps_its_signature(signed, keys, tmp_path):
    packed = pack_bundle(signed, tmp_path / "signed.zip")
    assert signing.SIGNATURE_NAME in zipfile.ZipFile(packed).namelist()
    assert Runtime.open(packed, trusted_keys=[keys["publisher"][1]]).bundle.signature.state == "signed"


def test_device_update_keeps_the_chain_and_reopens(signed, keys, train_images):
    images, labels = train_images
    public = keys["publisher"][1]
    runtime = Runtime.open(signed, trusted_keys=[public])
    statement = runtime.bundle.signature.statement_sha256
    updater = HeadUpdater(runtime, trusted_keys=[public])
    updater.remove_class("ring")
    updater.add_class("ring again", list(images[labels == 4][:5]), force=True)
    reopened = Runtime.open(signed, trusted_keys=[public])
    status = reopened.bundle.signature
    assert status.state == "derived" and status.verified and status.signed_version == 1
    assert reopened.manifest.data["derived_from"]["statement_sha256"] == statement
    assert reopened.class_names[-1] == "ring again"
    assert "derived on the device from version 1" in describe_bundle(reopened.bundle)
    # a rollback to the signed version is a derived version too, and still opens
    HeadUpdater(reopened, trusted_keys=[public]).rollback(1)
    again = Runtime.open(signed, trusted_keys=[public])
    assert again.bundle.signature.state == "derived" and again.manifest.version == 4
    # device signatures: optional by default, required on request
    with pytest.raises(UnsignedError, match="no trusted device key signed it"):
        Runtime.open(signed, trusted_keys=TrustedKeys.from_files([public], require_device_signature=True))


def test_device_commit_leaves_the_publisher_signed_files_untouched(signed, keys, train_images):
    images, labels = train_images
    public = keys["publisher"][1]
    signed_files = json.loads((signed / "manifest.json").read_text())["files"]
    before = {name: (signed / name).read_bytes() for name in signed_files}
    runtime = Runtime.open(signed, trusted_keys=[public])
    HeadUpdater(runtime, trusted_keys=[public]).add_class("extra", list(images[labels == 4][:5]), force=True)
    manifest = VersionStore(signed).read_manifest().data  # tables assembled from their segments
    assert manifest["head"]["parts"]  # the new class is a part on top of the signed base files
    for name, data in before.items():
        assert name in manifest["files"] and (signed / name).read_bytes() == data
    reopened = Runtime.open(signed, trusted_keys=[public])
    assert reopened.bundle.signature.verified and reopened.class_names[-1] == "extra"


def test_device_key_signs_device_versions(signed, keys, train_images):
    images, labels = train_images
    publisher, device = keys["publisher"][1], keys["device"][1]
    runtime = Runtime.open(signed, trusted_keys=[publisher])
    HeadUpdater(runtime, device_key=keys["device"][0]).add_class("mug", list(images[labels == 0][:5]), force=True)
    strict = TrustedKeys.from_files([publisher, device], require_device_signature=True)
    status = Runtime.open(signed, trusted_keys=strict).bundle.signature
    assert status.state == "derived" and status.device_signer == load_public_key(device).key_id
    # the device signature only counts while it covers the current version
    HeadUpdater(Runtime.open(signed)).rename_class("mug", "cup")  # committed without the device key
    with pytest.raises(ChangedAfterSigningError):
        Runtime.open(signed, trusted_keys=strict)


# ----------------------------------------------------------------------------- bad input
def test_tampered_manifest_label_with_recomputed_checksums_is_refused(signed, keys):
    def relabel(data):
        data["classes"][0]["name"] = "tampered"

    rewrite_manifest(signed, relabel)
    before = snapshot(signed)
    with pytest.raises(ChangedAfterSigningError, match="manifest.json changed after signing"):
        Runtime.open(signed, trusted_keys=[keys["publisher"][1]])
    assert snapshot(signed) == before
    # the relabelled bundle still opens without keys (today's behaviour): only signatures catch it
    assert Runtime.open(signed).class_names[0] == "tampered"


def test_forged_device_version_is_refused_when_device_signatures_are_required(signed, keys):
    statement = Bundle.open(signed, trusted_keys=[keys["publisher"][1]]).signature.statement_sha256

    def forge(data):
        data["classes"][0]["name"] = "tampered"
        data["version"] = 2
        data["derived_from"] = {"statement_sha256": statement, "signed_version": 1}

    rewrite_manifest(signed, forge)
    strict = TrustedKeys.from_files([keys["publisher"][1]], require_device_signature=True)
    with pytest.raises(UnsignedError):
        Runtime.open(signed, trusted_keys=strict)


@pytest.mark.parametrize("claim_device_version", [False, True])
def test_swapped_backbone_is_refused(signed, keys, claim_device_version):
    statement = Bundle.open(signed, trusted_keys=[keys["publisher"][1]]).signature.statement_sha256
    model = signed / "backbone.int8.tflite"
    content = bytearray(model.read_bytes())
    content[len(content) // 2] ^= 0xFF  # a different model of the same size
    model.write_bytes(bytes(content))

    def swap(data):
        if claim_device_version:  # pretend a device update made it
            data["version"] = 2
            data["derived_from"] = {"statement_sha256": statement, "signed_version": 1}

    rewrite_manifest(signed, swap)
    before = snapshot(signed)
    with pytest.raises(ChangedAfterSigningError, match="backbone.int8.tflite" if claim_device_version else "manifest"):
        Runtime.open(signed, trusted_keys=[keys["publisher"][1]])
    assert snapshot(signed) == before


def test_signature_from_another_key_is_refused(bundle_copy, keys):
    signing.sign_bundle(bundle_copy, keys["other"][0])
    with pytest.raises(UnknownSignerError, match="not among the trusted keys"):
        Runtime.open(bundle_copy, trusted_keys=[keys["publisher"][1]])
    # the same signature relabelled with the trusted key's id is a bad signature
    path = bundle_copy / signing.SIGNATURE_NAME
    envelope = json.loads(path.read_text())
    envelope["signatures"][0]["keyid"] = load_public_key(keys["publisher"][1]).key_id
    path.write_text(json.dumps(envelope))
    with pytest.raises(BadSignatureError):
        Runtime.open(bundle_copy, trusted_keys=[keys["publisher"][1]])


def test_statement_edited_inside_the_envelope_is_a_bad_signature(signed, keys):
    path = signed / signing.SIGNATURE_NAME
    envelope = json.loads(path.read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    statement["predicate"]["edgeadapt"]["version"] = 7
    envelope["payload"] = base64.b64encode(canonical_json(statement)).decode()
    path.write_text(json.dumps(envelope))
    with pytest.raises(BadSignatureError, match="does not verify"):
        Runtime.open(signed, trusted_keys=[keys["publisher"][1]])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "short-signature"])
def test_truncated_or_garbage_signature_file_is_refused(signed, keys, damage):
    path = signed / signing.SIGNATURE_NAME
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(300))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        envelope = json.loads(data)
        envelope["signatures"][0]["sig"] = base64.b64encode(b"\0" * 10).decode()
        path.write_text(json.dumps(envelope))
    before = snapshot(signed)
    with pytest.raises(MalformedSignatureError):
        Runtime.open(signed, trusted_keys=[keys["publisher"][1]])
    assert snapshot(signed) == before
    assert "unsigned" in describe_bundle(Bundle.open(signed))  # inspect without keys does not fail


def test_private_key_where_a_public_key_is_expected_is_refused(signed, keys):
    with pytest.raises(KeyFileError, match="is a private key"):
        Runtime.open(signed, trusted_keys=[keys["publisher"][0]])
    with pytest.raises(KeyFileError, match="is a public key"):
        signing.sign_bundle(signed, keys["publisher"][1])


def test_key_files_with_open_permissions_are_refused(bundle_copy, keys):
    private, public = keys["publisher"]
    before = snapshot(bundle_copy)
    os.chmod(private, 0o644)
    with pytest.raises(KeyFileError, match="open permissions"):
        signing.sign_bundle(bundle_copy, private)
    assert snapshot(bundle_copy) == before  # no signature written
    os.chmod(private, 0o600)
    signing.sign_bundle(bundle_copy, private)
    os.chmod(public, 0o666)
    with pytest.raises(KeyFileError, match="writable by other users"):
        Runtime.open(bundle_copy, trusted_keys=[public])


def test_generated_private_key_is_0600_and_never_overwritten(keys, tmp_path):
    private, public = keys["device"]
    assert private.stat().st_mode & 0o777 == 0o600
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    with pytest.raises(KeyFileError, match="exists"):
        generate_keypair(private.parent, "device")


def test_updater_refuses_an_untrusted_bundle_and_writes_nothing(bundle_copy, keys, train_images):
    images, labels = train_images
    signing.sign_bundle(bundle_copy, keys["other"][0])
    runtime = Runtime.open(bundle_copy)
    before = snapshot(bundle_copy)
    with pytest.raises(UnknownSignerError):
        HeadUpdater(runtime, trusted_keys=[keys["publisher"][1]]).add_class("mug", list(images[labels == 0][:5]))
    assert snapshot(bundle_copy) == before


# ----------------------------------------------------------------------------- deltas and files
@pytest.fixture
def device_bundle(signed, train_images) -> Path:
    images, labels = train_images
    updater = HeadUpdater(Runtime.open(signed))
    updater.remove_class("ring")
    updater.add_class("ring", list(images[labels == 4][:5]), force=True)
    return signed


def test_delta_signed_by_an_enrolled_device_names_its_signer(device_bundle, keys, tmp_path):
    path = export_delta(device_bundle, tmp_path / "d.eadelta", source="dev1", device_key=keys["device"][0])
    delta = read_delta(path, trusted_keys=[keys["device"][1]])
    assert delta.signer == load_public_key(keys["device"][1]).key_id
    assert read_delta(path).signer is None  # not checked without keys
    # an updater with a device key signs the deltas it exports
    updater = HeadUpdater(Runtime.open(device_bundle), device_key=keys["device"][0])
    again = read_delta(updater.export_delta(tmp_path / "e.eadelta"), trusted_keys=[keys["device"][1]])
    assert again.signer == delta.signer


def test_delta_signed_by_an_unknown_device_or_unsigned_is_refused(device_bundle, keys, tmp_path):
    signed_delta = export_delta(device_bundle, tmp_path / "d.eadelta", device_key=keys["other"][0])
    with pytest.raises(UnknownSignerError):
        read_delta(signed_delta, trusted_keys=[keys["device"][1]])
    unsigned = export_delta(device_bundle, tmp_path / "u.eadelta")
    with pytest.raises(UnsignedError, match="not signed by a device key"):
        read_delta(unsigned, trusted_keys=[keys["device"][1]])


@pytest.mark.parametrize("change", ["relabel", "swap-weights", "garbage-signature"])
def test_delta_changed_after_signing_is_refused(device_bundle, keys, tmp_path, change):
    path = export_delta(device_bundle, tmp_path / "d.eadelta", device_key=keys["device"][0])
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    info = json.loads(members["delta.json"])
    if change == "relabel":  # a label edit; member checksums stay consistent
        info["classes"][0]["name"] = "relabelled"
    elif change == "swap-weights":  # other head columns, with delta.json's checksums recomputed
        buffer = __import__("io").BytesIO()
        weights = np.load(__import__("io").BytesIO(members["weights.npy"]))
        np.save(buffer, weights * 2.0)
        members["weights.npy"] = buffer.getvalue()
        info["files"]["weights.npy"] = {"sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
                                        "size": len(buffer.getvalue())}
    else:
        members[signing.SIGNATURE_NAME] = members[signing.SIGNATURE_NAME][:40]
    members["delta.json"] = json.dumps(info).encode()
    tampered = tmp_path / "t.eadelta"
    with zipfile.ZipFile(tampered, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    expected = MalformedSignatureError if change == "garbage-signature" else ChangedAfterSigningError
    with pytest.raises(expected):
        read_delta(tampered, trusted_keys=[keys["device"][1]])
    if change != "garbage-signature":
        read_delta(tampered)  # consistent checksums: only the signature catches it


def test_single_file_signature_for_apps(keys, tmp_path):
    model = tmp_path / "fused.tflite"
    model.write_bytes(os.urandom(4096))
    signature = signing.sign_file(model, keys["publisher"][0])
    assert signature.name == "fused.tflite.dsse.json"
    assert signing.verify_file(model, [keys["publisher"][1]]) == load_public_key(keys["publisher"][1]).key_id
    with pytest.raises(UnknownSignerError):
        signing.verify_file(model, [keys["other"][1]])
    model.write_bytes(model.read_bytes()[:-1] + b"x")
    with pytest.raises(ChangedAfterSigningError):
        signing.verify_file(model, [keys["publisher"][1]])


def test_a_bundle_signature_is_not_accepted_for_another_kind(signed, keys, tmp_path):
    model = tmp_path / "manifest.json"
    model.write_bytes((signed / "manifest.json").read_bytes())
    (tmp_path / "manifest.json.dsse.json").write_bytes((signed / signing.SIGNATURE_NAME).read_bytes())
    with pytest.raises(SignatureError):
        signing.verify_file(model, [keys["publisher"][1]])


# ----------------------------------------------------------------------------- device CLI
def test_device_cli_trust_and_keys(signed, keys, tmp_path, capsys, fixture_dir):
    image = sorted((fixture_dir / "images").rglob("*.png"))[0]
    public = str(keys["publisher"][1])
    assert device_main(["predict", str(signed), str(image), "--trust", public]) == 0
    assert device_main(["predict", str(signed), str(image), "--trust", str(keys["other"][1])]) == 1
    assert "not among the trusted keys" in capsys.readouterr().err
    assert device_main(["inspect", str(signed), "--trust", public]) == 0
    assert "verified with a trusted key" in capsys.readouterr().out
    assert device_main(["keys", "generate", "--out", str(tmp_path / "dk"), "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert Path(made["private_key"]).stat().st_mode & 0o777 == 0o600
    assert device_main(["verify", str(signed), "--trust", public]) == 0
    assert device_main(["history", str(signed), "--trust", str(keys["other"][1])]) == 1


def test_without_cryptography_a_configured_check_says_what_to_install(signed, keys, monkeypatch):
    import sys

    from edgeadapt.device import keys as key_module

    key_module.crypto.cache_clear()
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.asymmetric", None)
    try:
        with pytest.raises(SignatureError, match=r"pip install 'edgeadapt\[signing\]'"):
            Runtime.open(signed, trusted_keys=[keys["publisher"][1]])
        assert Runtime.open(signed).bundle.signature is None  # no keys: no cryptography needed
    finally:
        key_module.crypto.cache_clear()
