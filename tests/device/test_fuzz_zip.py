"""Fuzzing: damaged and hostile packed bundles (bad CRC, encrypted or unknown-compression members,
over-long names, size lies, small zip bombs, duplicates, links, unlisted or missing members).

Opening must give a correct bundle or an EdgeAdaptError, leave no temporary copy behind, write
nothing outside, and stay within bounded memory; a failed unpack leaves no output folder.
"""

from __future__ import annotations

import shutil

import pytest
from hypothesis import given
from hypothesis import strategies as st

import fuzz_support as fz
from edgeadapt.device.bundle import pack_bundle, unpack_bundle


@pytest.fixture(scope="module")
def workspace(fixture_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_zip")
    packed = pack_bundle(fixture_dir / "tiny.eab", root / "tiny.zip")
    raw = packed.read_bytes()
    names = [name for name, _ in fz.read_members(raw)]
    previous = fz.tempfile.tempdir
    temporary = fz.scratch_tempdir(root)
    yield {"root": root, "raw": raw, "names": names, "sentinel": fz.Sentinel(root), "tmp": temporary}
    fz.tempfile.tempdir = previous


@fz.fuzz_settings(share=2.0)
@given(data=st.data())
def test_mutated_packed_bundles_open_correctly_or_raise_edgeadapt_errors(workspace, data):
    mutation = data.draw(fz.zip_mutation(workspace["names"]))
    case = workspace["root"] / "case.zip"
    case.write_bytes(fz.apply_zip_mutation(workspace["raw"], mutation))
    fz.run_case("zip-open", lambda: fz.open_fully(case), fz.check_open)
    fz.check_no_leftovers(workspace["tmp"], "zip-open")
    output = workspace["root"] / "unpacked.eab"
    outcome = fz.run_case("zip-unpack", lambda: unpack_bundle(case, output))
    if outcome == "opened":
        fz.run_case("zip-unpacked-open", lambda: fz.open_fully(output), fz.check_open)
        shutil.rmtree(output)
    elif output.exists():
        raise fz.FuzzFailure(f"a refused unpack left {output} behind")
    left = [entry.name for entry in workspace["root"].iterdir() if entry.name.startswith(".unpacked")]
    if left:
        raise fz.FuzzFailure(f"a refused unpack left staging folders {left}")
    workspace["sentinel"].check("zip")
