"""Fuzzing: symlinks planted anywhere in a bundle (listed files, folders, lock file, heads/, versions/,
temporary-file names), before opening or between opening and updating.

Readers and the updater must refuse with an EdgeAdaptError and never write, create or delete
anything outside the bundle (checked on a sentinel folder next to it).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fuzz_support as fz
from edgeadapt.device.bundle import pack_bundle
from edgeadapt.device.runtime import Runtime
from edgeadapt.device.updater import HeadUpdater
from edgeadapt.device.versions import VersionStore

ENTRIES = ["manifest.json", "backbone.int8.tflite", "heads", "heads/v1", "heads/v1/weights.npy", "heads/v1/gram.npy",
           "heads/v0", "heads/v2", "versions", "versions/v1.json", "versions/v2.json", ".edgeadapt.lock",
           ".manifest.json.tmp-1", "versions/.v2.json.tmp-1", "heads/v2/.weights.npy.tmp-1", "extra-link"]
TARGETS = ["outside-file", "outside-folder", "dangling-outside", "inside-file", "self"]
OPERATIONS = ["open", "update", "update-after-open", "rollback-after-open", "pack", "history"]


@pytest.fixture(scope="module")
def workspace(fixture_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_symlinks")
    base = root / "base.eab"
    shutil.copytree(fixture_dir / "tiny.eab", base)
    with Runtime.open(base) as runtime:  # a bundle with history: versions/ and a lock file exist
        HeadUpdater(runtime).rename_class(runtime.class_names[0], "renamed")
    yield {"root": root, "base": base, "sentinel": fz.Sentinel(root)}


def _plant(bundle, entry: str, target: str, sentinel: fz.Sentinel) -> None:
    link = bundle / entry
    destination = {"outside-file": sentinel.folder / "victim.bin", "outside-folder": sentinel.folder,
                   "dangling-outside": sentinel.folder / "created-by-the-updater",
                   "inside-file": bundle / "heads", "self": link}[target]
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    elif link.exists() or link.is_symlink():
        link.unlink()
    os.symlink(destination, link)


@fz.fuzz_settings(share=1.0)
@given(entry=st.sampled_from(ENTRIES), target=st.sampled_from(TARGETS), operation=st.sampled_from(OPERATIONS))
def test_symlinks_are_refused_and_nothing_outside_changes(workspace, entry, target, operation):
    sentinel = workspace["sentinel"]
    bundle = workspace["root"] / "case.eab"
    shutil.rmtree(bundle, ignore_errors=True)
    shutil.copytree(workspace["base"], bundle)
    runtime = None
    if operation.endswith("after-open"):
        runtime = Runtime.open(bundle)
    _plant(bundle, entry, target, sentinel)

    def run():
        if operation == "open":
            fz.open_fully(bundle)
        elif operation == "pack":
            pack_bundle(bundle, workspace["root"] / "case.zip")
        elif operation == "history":
            VersionStore(bundle).history()
        elif operation == "update":
            with Runtime.open(bundle) as opened:
                HeadUpdater(opened).add_class_embeddings("new", np.ones((2, opened.head.embedding_size), np.float32),
                                                        force=True)
        elif operation == "update-after-open":
            HeadUpdater(runtime).add_class_embeddings("new", np.ones((2, runtime.head.embedding_size), np.float32),
                                                      force=True)
        else:
            HeadUpdater(runtime).rollback(1)

    try:
        outcome = fz.run_case(f"symlink-{operation}", run)
    finally:
        if runtime is not None:
            runtime.close()
    if outcome == "opened" and entry != "extra-link" and operation != "history":
        raise fz.FuzzFailure(f"{operation} accepted a bundle with {entry} -> {target}")
    sentinel.check(f"symlink {entry} -> {target} ({operation})")
    (workspace["root"] / "case.zip").unlink(missing_ok=True)
