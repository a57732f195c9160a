"""Fuzzing: hostile delta files (zip damage, delta.json mutations, .npy header mutations with matching checksums)."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fuzz_support as fz
from edgeadapt.device.delta import read_delta
from edgeadapt.device.runtime import Runtime
from edgeadapt.device.updater import HeadUpdater


@pytest.fixture(scope="module")
def workspace(fixture_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_delta")
    device = root / "device.eab"
    shutil.copytree(fixture_dir / "tiny.eab", device)
    with Runtime.open(device) as runtime:
        updater = HeadUpdater(runtime)
        size = runtime.head.embedding_size
        updater.add_class_embeddings("fuzzed", np.random.default_rng(0).normal(size=(6, size)).astype(np.float32),
                                     force=True)
        delta = updater.export_delta(root / "good.eadelta", source="fuzz")
    raw = delta.read_bytes()
    members = fz.read_members(raw)
    info = json.loads(dict(members)["delta.json"])
    yield {"root": root, "raw": raw, "members": members, "info": info, "paths": fz.json_paths(info),
           "sentinel": fz.Sentinel(root)}


def _rebuild(members: list[tuple[str, bytes]], info: dict | bytes, replace: dict[str, bytes] | None = None) -> bytes:
    document = info if isinstance(info, bytes) else json.dumps(info).encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, document if name == "delta.json" else (replace or {}).get(name, data))
    return buffer.getvalue()


def _check_delta(delta) -> None:
    if delta.head.num_classes != len(delta.classes) or not np.isfinite(delta.example_embeddings).all():
        raise fz.FuzzFailure("read an inconsistent delta")


@fz.fuzz_settings(share=2.0)
@given(data=st.data())
def test_mutated_deltas_read_correctly_or_raise_edgeadapt_errors(workspace, data):
    layer = data.draw(st.sampled_from(["zip", "json", "npy"]))
    if layer == "zip":
        mutated = fz.apply_zip_mutation(workspace["raw"], data.draw(fz.zip_mutation([n for n, _ in workspace["members"]])))
    elif layer == "json":
        document = fz.apply_json_mutation(workspace["info"], data.draw(fz.json_mutation(workspace["paths"])))
        mutated = _rebuild(workspace["members"], document)
    else:
        arrays = [name for name, _ in workspace["members"] if name.endswith(".npy")]
        name = data.draw(st.sampled_from(arrays))
        content = fz.apply_npy_mutation(dict(workspace["members"])[name], data.draw(fz.npy_mutation()))
        info = json.loads(json.dumps(workspace["info"]))
        info["files"][name] = {"sha256": hashlib.sha256(content).hexdigest(), "size": len(content)}
        mutated = _rebuild(workspace["members"], info, {name: content})
    case = workspace["root"] / "case.eadelta"
    case.write_bytes(mutated)
    fz.run_case(f"delta-{layer}", lambda: read_delta(case), _check_delta)
    workspace["sentinel"].check("delta")
