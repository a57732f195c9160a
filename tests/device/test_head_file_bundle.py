"""A bundle that carries its head as a .eah file: listed and checksummed, kept in step by every new version."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from edgeadapt.device import Bundle, BundleError, HeadUpdater, InputError, Runtime, pack_bundle
from edgeadapt.device.head_file import (
    HEAD_FILE_NAME,
    carry_head_file,
    head_from_bytes,
    load_carried_head_file,
    read_head_file,
    write_head_file,
)


def carried_path(bundle: Bundle) -> str:
    return bundle.manifest.data["head"]["head_file"]["file"]


@pytest.mark.parametrize("int8", [False, True])
def test_carried_head_file_is_listed_checksummed_and_matches_the_head(bundle_copy, tmp_path, int8):
    before = Bundle.open(bundle_copy)
    committed = carry_head_file(bundle_copy, int8=int8)
    assert committed.version == before.manifest.version + 1
    bundle = Bundle.open(bundle_copy)  # schema + every listed file's size and sha256
    path = carried_path(bundle)
    assert path == f"heads/v{committed.version}/{HEAD_FILE_NAME}"
    assert bundle.manifest.data["head"]["head_file"]["weights"] == ("int8" if int8 else "float32")
    entry = bundle.manifest.files[path]
    assert entry["size"] == (bundle_copy / path).stat().st_size and len(entry["sha256"]) == 64
    carried = load_carried_head_file(bundle)
    assert carried.class_names == bundle.manifest.class_names and carried.is_int8 == int8
    head = bundle.load_head()
    if not int8:
        assert np.array_equal(carried.head.weights, head.weights) and np.array_equal(carried.head.bias, head.bias)
    # the head and every other file are shared with the previous version, not copied
    assert bundle.manifest.data["head"]["weights"] == before.manifest.data["head"]["weights"]
    # packing keeps it (a packed bundle lists every member) and the unpacked copy verifies
    packed = pack_bundle(bundle_copy, tmp_path / "carried.zip")
    with Bundle.open(packed) as unpacked:
        assert load_carried_head_file(unpacked).class_names == carried.class_names


def test_device_updates_rewrite_the_carried_file(bundle_copy, test_images):
    carry_head_file(bundle_copy)
    images, labels = test_images
    with Runtime.open(bundle_copy) as runtime:
        _check_updates(bundle_copy, runtime, runtime.embed(images[labels == 0][:4]))


def _check_updates(bundle_copy, runtime, embeddings):
    updater = HeadUpdater(runtime)
    carried_version = Bundle.open(bundle_copy).manifest.version
    updater.add_class_embeddings("extra", embeddings, force=True)
    bundle = Bundle.open(bundle_copy)
    path = carried_path(bundle)
    assert path == f"heads/v{bundle.manifest.version}/{HEAD_FILE_NAME}"
    assert [name for name in bundle.manifest.files if name.endswith(".eah")] == [path]
    carried = load_carried_head_file(bundle)
    assert carried.class_names[-1] == "extra"
    assert np.array_equal(carried.head.weights, bundle.load_head().weights)
    updater.rename_class("extra", "renamed")
    assert load_carried_head_file(Bundle.open(bundle_copy)).class_names[-1] == "renamed"
    updater.rollback(carried_version)
    restored = load_carried_head_file(Bundle.open(bundle_copy))
    assert "extra" not in restored.class_names and "renamed" not in restored.class_names


def test_a_tampered_or_unlisted_carried_file_is_refused(bundle_copy):
    carry_head_file(bundle_copy)
    bundle = Bundle.open(bundle_copy)
    path = bundle_copy / carried_path(bundle)
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        Bundle.open(bundle_copy)
    # a manifest that names a head file it does not list fails the schema
    manifest_path = bundle_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["files"][carried_path(bundle)]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not listed in files"):
        Bundle.open(bundle_copy)
    manifest["head"]["head_file"] = {"file": manifest["head"]["weights"], "weights": "float32"}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"\.eah"):
        Bundle.open(bundle_copy)


def test_a_carried_file_of_another_head_is_refused(bundle_copy):
    carry_head_file(bundle_copy)
    bundle = Bundle.open(bundle_copy)
    path = carried_path(bundle)
    other = read_head_file(bundle_copy / path)
    names = [f"other {name}" for name in other.class_names]
    (bundle_copy / path).unlink()
    write_head_file(bundle_copy / path, other.head, names)
    manifest_path = bundle_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    data = (bundle_copy / path).read_bytes()
    manifest["files"][path] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="does not hold the bundle's head"):
        load_carried_head_file(Bundle.open(bundle_copy))


def test_head_file_writes_never_follow_links(tmp_path, bundle_copy):
    head = Bundle.open(bundle_copy).load_head()
    names = Bundle.open(bundle_copy).manifest.class_names
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    link = tmp_path / "head.eah"
    os.symlink(victim, link)
    with pytest.raises(BundleError, match="symbolic link"):
        read_head_file(link)
    write_head_file(link, head, names)  # replaces the link itself
    assert victim.read_bytes() == b"keep me" and not link.is_symlink()
    assert head_from_bytes(link.read_bytes()).class_names == names
    with pytest.raises(InputError, match="already exists"):
        write_head_file(link, head, names, overwrite=False)
