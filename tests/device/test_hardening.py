"""Regression tests for the findings of issue 12 (hostile bundles, packs and deltas).

High: symlinked heads/v0 and lock file. Medium: symlinked versions/, planted temporary-file
symlinks, zip bomb and leftover unpacked copies. Low: malformed manifests, .npy headers,
non-finite arrays, empty images, damaged zips and deltas.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgeadapt.device import Bundle, Runtime, pack_bundle, unpack_bundle
from edgeadapt.device.bundle import npy_bytes
from edgeadapt.device.delta import read_delta
from edgeadapt.device.errors import BundleError, EdgeAdaptError, InputError, StorageError
from edgeadapt.device.updater import HeadUpdater


def tree(path: Path) -> dict[str, str]:
    return {str(file.relative_to(path)): hashlib.sha256(file.read_bytes()).hexdigest()
            for file in sorted(path.rglob("*")) if file.is_file() and not file.is_symlink()}


@pytest.fixture
def outside(tmp_path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    for name in ("a.txt", "b.bin", "c.npy"):
        (folder / name).write_bytes(os.urandom(32))
    return folder


def embeddings(runtime: Runtime, count: int = 3) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(count, runtime.head.embedding_size)).astype(np.float32)


def edit_manifest(bundle: Path, change) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# ----------------------------------------------------------------------------- High
@pytest.mark.parametrize("planted", ["before-open", "after-open"])
def test_symlinked_old_head_folder_never_deletes_outside_files(bundle_copy, outside, planted):
    before = tree(outside)
    runtime = None
    if planted == "after-open":
        runtime = Runtime.open(bundle_copy)
    os.symlink(outside, bundle_copy / "heads" / "v0")
    with pytest.raises(BundleError, match="symbolic link"):
        if runtime is None:
            runtime = Runtime.open(bundle_copy)
        HeadUpdater(runtime).add_class_embeddings("new", embeddings(runtime), force=True)
    assert tree(outside) == before
    assert (bundle_copy / "heads" / "v0").is_symlink()  # refused, not "cleaned up" through


def test_symlinked_lock_file_is_never_written_through(bundle_copy, outside):
    victim = outside / "a.txt"
    before = victim.read_bytes()
    runtime = Runtime.open(bundle_copy)
    os.symlink(victim, bundle_copy / ".edgeadapt.lock")
    with pytest.raises(BundleError, match="lock file .* symbolic link"):
        HeadUpdater(runtime).add_class_embeddings("new", embeddings(runtime), force=True)
    assert victim.read_bytes() == before
    version = json.loads((bundle_copy / "manifest.json").read_text())["version"]
    assert version == 1


def test_hard_linked_lock_file_is_refused(bundle_copy, outside):
    runtime = Runtime.open(bundle_copy)
    os.link(outside / "a.txt", bundle_copy / ".edgeadapt.lock")
    before = (outside / "a.txt").read_bytes()
    with pytest.raises(BundleError, match="hard link"):
        HeadUpdater(runtime).rename_class(runtime.class_names[0], "renamed")
    assert (outside / "a.txt").read_bytes() == before


# ----------------------------------------------------------------------------- Medium
def test_symlinked_versions_folder_is_refused(bundle_copy, outside):
    before = tree(outside)
    runtime = Runtime.open(bundle_copy)
    os.symlink(outside, bundle_copy / "versions")
    with pytest.raises(BundleError, match="symbolic link"):
        HeadUpdater(runtime).add_class_embeddings("new", embeddings(runtime), force=True)
    assert tree(outside) == before and not list(outside.glob("v*.json"))


@pytest.mark.parametrize("name", [".manifest.json.tmp-{pid}", "versions/.v2.json.tmp-{pid}",
                                  "heads/v2/.weights.npy.tmp-{pid}", "versions/.v1.json.tmp-{pid}"])
def test_planted_dangling_temporary_symlinks_create_nothing_outside(bundle_copy, outside, name):
    runtime = Runtime.open(bundle_copy)
    updater = HeadUpdater(runtime)
    target = outside / "created-by-attacker"
    planted = bundle_copy / name.format(pid=os.getpid())
    planted.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, planted)
    with pytest.raises(BundleError, match="symbolic link"):
        updater.add_class_embeddings("new", embeddings(runtime), force=True)
    assert not target.exists()
    assert not (bundle_copy / "manifest.json").is_symlink()


def test_temporary_files_are_created_exclusively_with_fresh_names(bundle_copy, monkeypatch):
    """Even without the tree check, a name already taken is never opened for writing (O_EXCL)."""
    from edgeadapt.device import commit_writes

    taken = bundle_copy / "taken"
    taken.write_bytes(b"old")
    monkeypatch.setattr(commit_writes, "temporary_name", lambda path, marker=".tmp-": taken)
    with pytest.raises(FileExistsError):
        commit_writes.write_files_durably([(bundle_copy / "x.bin", b"new")])
    assert taken.read_bytes() == b"old"


def _packed_with_unlisted_member(bundle: Path, tmp_path: Path, size: int) -> Path:
    packed = pack_bundle(bundle, tmp_path / "good.zip")
    bomb = tmp_path / "bomb.zip"
    shutil.copy(packed, bomb)
    with zipfile.ZipFile(bomb, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("heads/v1/zeros.bin", "w", force_zip64=True) as member:
            chunk = b"\0" * (1 << 20)
            for _ in range(size >> 20):
                member.write(chunk)
    return bomb


def test_zip_bomb_is_refused_before_inflating_and_leaves_nothing(fixture_dir, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    bomb = _packed_with_unlisted_member(fixture_dir / "tiny.eab", tmp_path, 64 << 20)
    assert bomb.stat().st_size < 1 << 20  # 64 MiB of zeros in well under 1 MiB
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match="does not list"):
            Bundle.open(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
    assert list(scratch.iterdir()) == []
    with pytest.raises(BundleError, match="does not list"):
        unpack_bundle(bomb, tmp_path / "out.eab")
    assert not (tmp_path / "out.eab").exists() and not list(tmp_path.glob(".out.eab*"))


def test_member_larger_than_listed_is_refused_before_inflating(fixture_dir, tmp_path):
    packed = pack_bundle(fixture_dir / "tiny.eab", tmp_path / "good.zip")
    members = {}
    with zipfile.ZipFile(packed) as archive:
        for info in archive.infolist():
            members[info.filename] = archive.read(info)
    members["heads/v1/bias.npy"] = members["heads/v1/bias.npy"] + b"\0" * (32 << 20)
    lying = tmp_path / "lying.zip"
    with zipfile.ZipFile(lying, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(BundleError, match="declares .* bytes, the manifest lists"):
        Bundle.open(lying)


def test_packed_opens_leave_no_copies(fixture_dir, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    packed = pack_bundle(fixture_dir / "tiny.eab", tmp_path / "tiny.zip")
    for _ in range(10):
        with Runtime.open(packed) as runtime:
            assert runtime.predict(np.zeros(runtime.input_spec.shape, np.uint8))[0].label
    runtime = Runtime.open(packed)
    copy = runtime.bundle.path
    assert copy.is_dir()
    runtime.close()
    assert not copy.exists()
    with Bundle.open(packed) as bundle:
        assert bundle.load_head().num_classes == 5
    broken = tmp_path / "broken.zip"  # fails after unpacking (head bound to another backbone)
    members = {}
    with zipfile.ZipFile(packed) as archive:
        for info in archive.infolist():
            members[info.filename] = archive.read(info)
    data = json.loads(members["manifest.json"])
    data["head"]["backbone_fingerprint"] = "sha256:" + "0" * 64
    members["manifest.json"] = json.dumps(data).encode()
    with zipfile.ZipFile(broken, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    for _ in range(3):
        with pytest.raises(EdgeAdaptError):
            Runtime.open(broken)
    assert list(scratch.iterdir()) == []


def test_unpacked_copy_is_removed_at_interpreter_exit(fixture_dir, tmp_path):
    packed = pack_bundle(fixture_dir / "tiny.eab", tmp_path / "tiny.zip")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    script = ("import sys, tempfile; tempfile.tempdir = sys.argv[2]\n"
              "from edgeadapt.device import Runtime\n"
              "runtime = Runtime.open(sys.argv[1])\n"
              "print(runtime.bundle.path)\n")
    result = subprocess.run([sys.executable, "-c", script, str(packed), str(scratch)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(scratch))
    assert list(scratch.iterdir()) == []


# ----------------------------------------------------------------------------- Low: manifests
@pytest.mark.parametrize("change, field", [
    (lambda d: d.update(classes={"a": 1}), "classes"),
    (lambda d: d.update(files=[]), "files"),
    (lambda d: d["input"].update(height="32"), "input.height"),
    (lambda d: d["input"].update(height=32.0), "input.height"),
    (lambda d: d["head"].update(l2_normalize="false"), "head.l2_normalize"),
    (lambda d: d["head"].update(temperature="hot"), "head.temperature"),
    (lambda d: d["input"].update(height=10**6, width=10**6), "input.height"),
    (lambda d: d.update(embedding_size=10**12), "embedding_size"),
    (lambda d: d["classes"][0].update(name=["x"]), "classes[0].name"),
    (lambda d: d["files"]["heads/v1/bias.npy"].update(size="148"), "size"),
    (lambda d: d["head"].update(weights="heads/v1/../../x.npy"), "escapes"),
    (lambda d: d["head"].update(statistics=7), "head.statistics"),
])
def test_malformed_manifest_fields_are_named(bundle_copy, change, field):
    edit_manifest(bundle_copy, change)
    with pytest.raises(BundleError, match=field.replace("[", r"\[").replace("]", r"\]")):
        Runtime.open(bundle_copy)


@pytest.mark.parametrize("raw, message", [
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON|levels deep"),
    (b'{"a": ' * 50 + b"1" + b"}" * 50, "levels deep"),
    (b'{"schema_version": NaN}', "not valid JSON|NaN"),
    (b'"\\ud800"', "surrogate"),
])
def test_malformed_manifest_bytes(bundle_copy, raw, message):
    (bundle_copy / "manifest.json").write_bytes(raw)
    with pytest.raises(BundleError, match=message):
        Bundle.open(bundle_copy)


def test_input_spec_must_match_the_backbone(bundle_copy):
    edit_manifest(bundle_copy, lambda d: d["input"].update(height=64, width=64))
    Bundle.open(bundle_copy)  # the manifest alone is consistent ...
    from edgeadapt.device.backends import available_backends

    tested = available_backends()
    assert tested, "no interpreter installed"
    for backend in tested:  # ... but the backbone takes 32x32
        with pytest.raises(BundleError, match="takes .* input but the manifest's input spec says 64x64x3"):
            Runtime.open(bundle_copy, backend=backend)


def test_empty_class_list_and_zero_columns_are_accepted(bundle_copy):
    """Headless bundles (C = 0) are legal: the schema accepts an empty class list and D x 0 weights."""
    def headless(data):
        data["classes"] = []
        data["head"]["statistics"] = None
        data["head"].pop("references", None)
        for name in ("weights", "bias"):
            content = npy_bytes(np.zeros((data["embedding_size"], 0) if name == "weights" else (0,), np.float32))
            (bundle_copy / data["head"][name]).write_bytes(content)
            data["files"][data["head"][name]] = {"sha256": hashlib.sha256(content).hexdigest(), "size": len(content)}
    edit_manifest(bundle_copy, headless)
    bundle = Bundle.open(bundle_copy)
    assert bundle.load_head().weights.shape == (64, 0)


# ----------------------------------------------------------------------------- Low: arrays
def _replace_array(bundle: Path, name: str, content: bytes) -> None:
    (bundle / name).write_bytes(content)
    edit_manifest(bundle, lambda d: d["files"].update({name: {"sha256": hashlib.sha256(content).hexdigest(),
                                                             "size": len(content)}}))


def _npy(header: str, data: bytes = b"") -> bytes:
    text = header.encode("latin1")
    text += b" " * ((64 - (11 + len(text)) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + data


@pytest.mark.parametrize("content, message", [
    (_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (64, 1000000000000), }"), "shape"),
    (_npy("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (5,), }", b"\0" * 20), "structured"),
    (_npy("{'descr': '|V4', 'fortran_order': False, 'shape': (5,), }", b"\0" * 20), "dtype"),
    (_npy("{'descr': '|O', 'fortran_order': False, 'shape': (5,), }", b"\0" * 40), "object|dtype"),
    (_npy("{'descr': '<c8', 'fortran_order': False, 'shape': (5,), }", b"\0" * 40), "dtype"),
    (_npy("{'descr': '<f4', 'fortran_order': False, 'shape': (5,), }", b"\0" * 12), "holds 12 bytes"),
    (npy_bytes(np.array([1, np.nan, 0, 0, 0], np.float32)), "NaN"),
    (npy_bytes(np.zeros(7, np.float32)), r"shape \(7,\), expected \(5\)"),
    (b"\x93NUMPY\x02\x00" + (2**31).to_bytes(4, "little") + b"{'descr'", "header"),  # numpy would read 2 GiB
    (b"\x93NUMPY\x03\x00\x10\x00{}", "version 3.0"),
])
def test_hostile_npy_headers_are_refused_before_allocation(bundle_copy, content, message):
    _replace_array(bundle_copy, "heads/v1/bias.npy", content)
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match=message):
            Bundle.open(bundle_copy).load_head()
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()


def test_nan_in_feature_mean_is_refused(bundle_copy):
    content = npy_bytes(np.full(64, np.nan, np.float32))
    (bundle_copy / "heads/v1/feature_mean.npy").write_bytes(content)

    def add(data):
        data["head"]["feature_mean"] = "heads/v1/feature_mean.npy"
        data["files"]["heads/v1/feature_mean.npy"] = {"sha256": hashlib.sha256(content).hexdigest(),
                                                      "size": len(content)}
    edit_manifest(bundle_copy, add)
    with pytest.raises(BundleError, match="NaN"):
        Runtime.open(bundle_copy)


def test_listed_files_behind_symlinks_are_refused(bundle_copy, outside):
    (outside / "weights.npy").write_bytes((bundle_copy / "heads/v1/weights.npy").read_bytes())
    (bundle_copy / "heads/v1/weights.npy").unlink()
    os.symlink(outside / "weights.npy", bundle_copy / "heads/v1/weights.npy")
    with pytest.raises(BundleError, match="symbolic link"):
        Bundle.open(bundle_copy)
    with pytest.raises(BundleError, match="symbolic link"):
        Bundle.open(bundle_copy, verify=False)


def test_fifo_in_a_bundle_is_refused(bundle_copy):
    os.mkfifo(bundle_copy / "heads" / "pipe")
    with pytest.raises(BundleError, match="not a regular file"):
        Bundle.open(bundle_copy)


# ----------------------------------------------------------------------------- Low: images
@pytest.mark.parametrize("image", [np.zeros((0, 0, 3), np.uint8), np.zeros((0, 32, 3), np.uint8),
                                   np.zeros((32, 0), np.uint8), np.zeros((0, 32, 32, 3), np.uint8)])
def test_empty_images_are_refused(bundle_copy, image):
    runtime = Runtime.open(bundle_copy)
    with pytest.raises(InputError, match="empty|no image"):
        runtime.predict(image)
    before = tree(bundle_copy)
    with pytest.raises(InputError, match="empty|no image"):
        HeadUpdater(runtime).add_class("blank", image if image.ndim == 4 else [np.zeros((8, 8, 3), np.uint8), image],
                                       force=True)
    assert tree(bundle_copy) == before


# ----------------------------------------------------------------------------- Low: zips and deltas
@pytest.fixture
def delta_file(bundle_copy, tmp_path) -> Path:
    runtime = Runtime.open(bundle_copy)
    updater = HeadUpdater(runtime)
    updater.add_class_embeddings("new", embeddings(runtime, 4), force=True)
    return updater.export_delta(tmp_path / "device.eadelta", source="test")


def _patch(raw: bytes, member: str, offset_central: int, offset_local: int, value: int, width: str = "<H") -> bytes:
    import struct

    data = bytearray(raw)
    start = 0
    while (start := data.find(b"PK\x01\x02", start)) >= 0:
        length = struct.unpack_from("<H", data, start + 28)[0]
        if data[start + 46: start + 46 + length] == member.encode():
            struct.pack_into(width, data, start + offset_central, value)
            local = struct.unpack_from("<I", data, start + 42)[0]
            struct.pack_into(width, data, local + offset_local, value)
        start += 4
    return bytes(data)


@pytest.mark.parametrize("damage, message", [
    (lambda raw, m: _patch(raw, m, 8, 6, 1), "encrypted"),
    (lambda raw, m: _patch(raw, m, 10, 8, 99), "compression method 99"),
    (lambda raw, m: _patch(raw, m, 10, 8, 12), "compression method 12"),
    (lambda raw, m: _patch(raw, m, 16, 14, 0x12345678, "<I"), "damaged|CRC"),
])
def test_damaged_zip_members_are_bundle_errors(fixture_dir, delta_file, tmp_path, damage, message):
    packed = pack_bundle(fixture_dir / "tiny.eab", tmp_path / "tiny.zip")
    broken = tmp_path / "broken.zip"
    broken.write_bytes(damage(packed.read_bytes(), "heads/v1/bias.npy"))
    with pytest.raises(BundleError, match=message):
        Bundle.open(broken)
    broken_delta = tmp_path / "broken.eadelta"
    broken_delta.write_bytes(damage(delta_file.read_bytes(), "weights.npy"))
    with pytest.raises(BundleError, match=message):
        read_delta(broken_delta)


def test_over_long_member_names_are_refused(fixture_dir, tmp_path):
    packed = pack_bundle(fixture_dir / "tiny.eab", tmp_path / "tiny.zip")
    with zipfile.ZipFile(packed, "a") as archive:
        archive.writestr("heads/" + "n" * 4000, b"x")
    with pytest.raises(BundleError, match="longer than"):
        Bundle.open(packed)


def _rewrite_delta(path: Path, change_info=None, replace: dict | None = None) -> None:
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    info = json.loads(members["delta.json"])
    for name, content in (replace or {}).items():
        members[name] = content
        info["files"][name] = {"sha256": hashlib.sha256(content).hexdigest(), "size": len(content)}
    if change_info:
        change_info(info)
    members["delta.json"] = json.dumps(info).encode()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)


def test_delta_declaring_a_huge_array_is_refused_with_bounded_memory(delta_file):
    header = _npy("{'descr': '<f4', 'fortran_order': False, 'shape': (4000000, 64), }", b"\0" * (1 << 20))
    _rewrite_delta(delta_file, replace={"example_embeddings.npy": header})
    assert delta_file.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match="declares"):
            read_delta(delta_file)
        assert tracemalloc.get_traced_memory()[1] < 8 << 20
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("change, message", [
    (lambda info: info.update(classes={"a": 1}), "classes"),
    (lambda info: info["head"].update(l2_normalize="false"), "head.l2_normalize"),
    (lambda info: info.update(embedding_size="64"), "embedding_size"),
    (lambda info: info["classes"][0].update(kind="stolen"), r"classes\[0\].kind"),
    (lambda info: info["files"]["weights.npy"].update(size=1 << 40), "size"),
])
def test_malformed_delta_json_is_named(delta_file, change, message):
    _rewrite_delta(delta_file, change)
    with pytest.raises(BundleError, match=message):
        read_delta(delta_file)


def test_delta_json_with_a_repeated_key_is_refused(delta_file):
    with zipfile.ZipFile(delta_file) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    members["delta.json"] = members["delta.json"].replace(b'"format":', b'"classes": [], "classes":', 1)
    with zipfile.ZipFile(delta_file, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    with pytest.raises(BundleError, match="appears twice"):
        read_delta(delta_file)


# ----------------------------------------------------------------------------- disk errors
_DISK_SCRIPT = """
import json, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from edgeadapt.device import pack_bundle, unpack_bundle
from edgeadapt.device.delta import export_delta
from edgeadapt.device.errors import EdgeAdaptError
operation, source, target, limit = sys.argv[1:5]
resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
try:
    {"pack": pack_bundle, "unpack": unpack_bundle, "export": export_delta}[operation](source, target)
except EdgeAdaptError as error:
    print(json.dumps({"type": type(error).__name__, "message": str(error)}))
else:
    print(json.dumps({"type": None}))
"""


@pytest.mark.parametrize("operation", ["pack", "unpack", "export"])
def test_full_disk_is_a_clear_error_and_nothing_is_half_written(fixture_dir, delta_file, tmp_path, operation):
    """RLIMIT_FSIZE makes every write beyond a few KiB fail with EFBIG, as a full disk does."""
    packed = pack_bundle(fixture_dir / "tiny.eab", tmp_path / "tiny.zip")
    device = delta_file.parent / "tiny.eab"
    source = {"pack": fixture_dir / "tiny.eab", "unpack": packed, "export": device}[operation]
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    target = output_dir / {"pack": "new.zip", "unpack": "new.eab", "export": "new.eadelta"}[operation]
    result = subprocess.run([sys.executable, "-c", _DISK_SCRIPT, operation, str(source), str(target), "2048"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["type"] == "StorageError", outcome
    assert "no space left" in outcome["message"] and "nothing was written" in outcome["message"]
    assert list(output_dir.iterdir()) == []


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_read_only_and_full_file_systems(fixture_dir, tmp_path):
    """A real tiny tmpfs (needs root; skipped otherwise): full, then remounted read-only."""
    mount = tmp_path / "tiny-fs"
    if not _tmpfs(mount, "64k"):
        pytest.skip("mounting a tmpfs needs root")
    try:
        with pytest.raises(StorageError, match="no space left"):
            pack_bundle(fixture_dir / "tiny.eab", mount / "tiny.zip")
        assert list(mount.iterdir()) == []
        packed = pack_bundle(fixture_dir / "tiny.eab", tmp_path / "tiny.zip")
        with pytest.raises(StorageError, match="no space left"):
            unpack_bundle(packed, mount / "tiny.eab")
        assert list(mount.iterdir()) == []
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        with pytest.raises(StorageError, match="read-only"):
            pack_bundle(fixture_dir / "tiny.eab", mount / "tiny.zip")
        with pytest.raises(StorageError, match="read-only"):
            unpack_bundle(packed, mount / "tiny.eab")
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_unlisted_signature_files_travel_in_packed_bundles(bundle_copy, tmp_path):
    """The two signature files (never listed in the manifest) are the only unlisted files a pack may carry."""
    from edgeadapt.device.dsse import DEVICE_SIGNATURE_NAME, MAX_SIGNATURE_BYTES, SIGNATURE_NAME

    (bundle_copy / SIGNATURE_NAME).write_bytes(b"sig" * 10)
    (bundle_copy / DEVICE_SIGNATURE_NAME).write_bytes(b"dev" * 10)
    (bundle_copy / "signature").write_bytes(b"old name")  # not a signature file: left behind by pack
    packed = pack_bundle(bundle_copy, tmp_path / "signed.zip")
    assert "signature" not in zipfile.ZipFile(packed).namelist()
    with Bundle.open(packed) as bundle:
        assert (bundle.path / SIGNATURE_NAME).read_bytes() == b"sig" * 10
        assert (bundle.path / DEVICE_SIGNATURE_NAME).read_bytes() == b"dev" * 10
    for other in ("signature", "signature2", f"{SIGNATURE_NAME}.bak", f"heads/{SIGNATURE_NAME}"):
        wrong = tmp_path / "wrong.zip"
        shutil.copy(packed, wrong)
        with zipfile.ZipFile(wrong, "a") as archive:
            archive.writestr(other, b"x")
        with pytest.raises(BundleError, match="does not list"):
            Bundle.open(wrong)
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with zipfile.ZipFile(packed) as source:
            for info in source.infolist():
                if info.filename != SIGNATURE_NAME:
                    archive.writestr(info.filename, source.read(info))
        archive.writestr(SIGNATURE_NAME, b" " * (MAX_SIGNATURE_BYTES + 1))  # compresses to a few KiB
    with pytest.raises(BundleError, match=f"{SIGNATURE_NAME}.*at most {MAX_SIGNATURE_BYTES}"):
        Bundle.open(big)
    with pytest.raises(BundleError, match="at most"):
        unpack_bundle(big, tmp_path / "big.eab")
    assert not (tmp_path / "big.eab").exists()
