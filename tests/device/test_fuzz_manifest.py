"""Fuzzing: mutated manifests (random types, deletions, truncations, byte flips, deep nesting, non-UTF-8).

Every outcome must be a correct open or an EdgeAdaptError; nothing outside the bundle changes; memory
stays bounded. Budget: EDGEADAPT_FUZZ_BUDGET (examples per test), fixed seed.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fuzz_support as fz
from edgeadapt.device.runtime import Runtime


@pytest.fixture(scope="module")
def workspace(fixture_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_manifest")
    bundle = root / "bundle.eab"
    shutil.copytree(fixture_dir / "tiny.eab", bundle)
    document = json.loads((bundle / "manifest.json").read_text())
    others = fz.Sentinel(root)
    files = {path: path.stat().st_mtime_ns for path in bundle.rglob("*") if path.name != "manifest.json"}
    yield {"root": root, "bundle": bundle, "document": document, "paths": fz.json_paths(document),
           "sentinel": others, "files": files}


def _check_untouched(workspace) -> None:
    workspace["sentinel"].check("manifest")
    now = {path: path.stat().st_mtime_ns for path in workspace["bundle"].rglob("*") if path.name != "manifest.json"}
    if now != workspace["files"]:
        raise fz.FuzzFailure("opening a bundle changed its files")


@fz.fuzz_settings(share=3.0)
@given(data=st.data())
def test_mutated_manifests_open_correctly_or_raise_edgeadapt_errors(workspace, data):
    mutation = data.draw(fz.json_mutation(workspace["paths"]))
    (workspace["bundle"] / "manifest.json").write_bytes(fz.apply_json_mutation(workspace["document"], mutation))
    fz.run_case("manifest", lambda: fz.open_fully(workspace["bundle"]), fz.check_open)
    _check_untouched(workspace)


@fz.fuzz_settings(share=0.5)
@given(data=st.data())
def test_mutated_manifests_through_the_runtime(workspace, data):
    mutation = data.draw(fz.json_mutation([path for path in workspace["paths"]
                                           if path[:1] in (("input",), ("backbone",), ("head",), ("embedding_size",))]))
    (workspace["bundle"] / "manifest.json").write_bytes(fz.apply_json_mutation(workspace["document"], mutation))

    def run():
        with Runtime.open(workspace["bundle"]) as runtime:
            spec = runtime.input_spec
            scores = runtime.probabilities(np.zeros(spec.shape, np.uint8))
            if not np.isfinite(scores).all():
                raise fz.FuzzFailure("a runtime opened from a mutated manifest gives non-finite scores")

    fz.run_case("manifest-runtime", run)
    _check_untouched(workspace)
