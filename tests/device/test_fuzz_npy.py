"""Fuzzing: mutated ``.npy`` head files (dtypes, shapes, header bytes, truncation, NaN) with matching checksums.

The checksums in the manifest are updated to the mutated bytes (most of the time), so the
array reader itself meets the hostile header, not only the sha256 check.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from hypothesis import given
from hypothesis import strategies as st

import fuzz_support as fz


@pytest.fixture(scope="module")
def workspace(fixture_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_npy")
    bundle = root / "bundle.eab"
    shutil.copytree(fixture_dir / "tiny.eab", bundle)
    manifest_bytes = (bundle / "manifest.json").read_bytes()
    document = json.loads(manifest_bytes)
    arrays = sorted(name for name in document["files"] if name.endswith(".npy"))
    originals = {name: (bundle / name).read_bytes() for name in arrays}
    yield {"root": root, "bundle": bundle, "document": document, "manifest": manifest_bytes, "arrays": arrays,
           "originals": originals, "sentinel": fz.Sentinel(root)}


@fz.fuzz_settings(share=3.0)
@given(data=st.data())
def test_mutated_npy_files_open_correctly_or_raise_edgeadapt_errors(workspace, data):
    name = data.draw(st.sampled_from(workspace["arrays"]))
    mutation = data.draw(fz.npy_mutation())
    relist = data.draw(st.sampled_from([True, True, True, False]))  # mostly: the checksum matches the mutation
    bundle = workspace["bundle"]
    mutated = fz.apply_npy_mutation(workspace["originals"][name], mutation)
    document = json.loads(json.dumps(workspace["document"]))
    if relist:
        document["files"][name] = {"sha256": hashlib.sha256(mutated).hexdigest(), "size": len(mutated)}
    try:
        (bundle / name).write_bytes(mutated)
        (bundle / "manifest.json").write_text(json.dumps(document))
        fz.run_case("npy", lambda: fz.open_fully(bundle), fz.check_open)
    finally:
        (bundle / name).write_bytes(workspace["originals"][name])
        (bundle / "manifest.json").write_bytes(workspace["manifest"])
    workspace["sentinel"].check("npy")
