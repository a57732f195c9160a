"""The three writers of a new bundle version (device updater, host add-classes, merge-deltas) build
the same manifest shape through one builder (edgeadapt.device.version_builder)."""

from __future__ import annotations

import re
import shutil

from edgeadapt.bundles.deltas import merge_deltas
from edgeadapt.device import Bundle, HeadUpdater, Runtime
from edgeadapt.device.version_builder import MANAGED_KEYS, ChangeAction
from edgeadapt.bundles.incremental import add_classes

#: What only a device version holds: the examples it learned (host versions learned none), and its
#: class and file tables as a shared segment (host versions keep them in the manifest).
DEVICE_ONLY = {"device_examples"}
DEVICE_ONLY_FILES = ("heads/vN/device_", "heads/vN/tables.json")


def _shape(path) -> dict:
    manifest = Bundle.open(path, trusted_keys=False).manifest
    head = manifest.data["head"]
    files = sorted({re.sub(r"^heads/v\d+/", "heads/vN/", name) for name in manifest.files if name.startswith("heads/")})
    return {
        "head": sorted(set(head) - DEVICE_ONLY),
        "statistics": sorted(head.get("statistics") or {}),
        "files": [name for name in files if not name.startswith(DEVICE_ONLY_FILES)],
        "provenance": sorted(key for key in ("version", "parent_version", "committed_at") if manifest.data.get(key)),
        "change": sorted({"action", "classes", "tool"} & set(manifest.data["change"])),
        "action": manifest.data["change"]["action"],
        "classes": manifest.class_names,
    }


def test_device_host_and_merge_paths_build_the_same_manifest_shape(bundle_copy, test_images, tmp_path):
    images, labels = test_images
    device = tmp_path / "device.eab"
    shutil.copytree(bundle_copy, device)
    with Runtime.open(device) as runtime:
        embeddings = runtime.embed(images[labels == 1][:4])
        updater = HeadUpdater(runtime, compact_fraction=0.0)  # full files, as the host writes them
        updater.add_class_embeddings("extra", embeddings, force=True)
        delta = updater.export_delta(tmp_path / "device.eadelta", source="device")
    add_classes(bundle_copy, {"extra": embeddings}, tmp_path / "host.eab")
    merge_deltas(bundle_copy, [delta], tmp_path / "merged.eab")
    shapes = {name: _shape(path) for name, path in
              (("device", device), ("host", tmp_path / "host.eab"), ("merged", tmp_path / "merged.eab"))}
    assert shapes["device"]["action"] == ChangeAction.ADD_CLASS
    assert shapes["host"]["action"] == ChangeAction.HOST_ADD_CLASSES
    assert shapes["merged"]["action"] == ChangeAction.MERGE_DELTAS
    for shape in shapes.values():
        del shape["action"]
        assert set(shape["head"]) <= MANAGED_KEYS
    assert shapes["device"] == shapes["host"] == shapes["merged"]
    assert "device_examples" in Bundle.open(device, trusted_keys=False).manifest.data["head"]
