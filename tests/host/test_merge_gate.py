"""merge-deltas runs the device update gate on the merged head (issue 12): a malicious delta is refused."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeadapt.bundles.deltas import MergeDeltasOptions, merge_deltas
from edgeadapt.device.bundle import Bundle
from edgeadapt.device.runtime import Runtime
from edgeadapt.device import HeadUpdater, UpdateGateError


@pytest.fixture
def malicious_delta(fixture_dir, tmp_path) -> Path:
    """A device class learned from copies of an old class's references, with a device row that outscores
    everything (bias 100): recomputed rows take that class's predictions, device rows take all of them."""
    device = tmp_path / "device.eab"
    shutil.copytree(fixture_dir / "tiny.eab", device)
    references = Bundle.open(device).load_reference_embeddings()
    stolen = references.as_float32()[references.labels == 0]
    with Runtime.open(device) as runtime:
        updater = HeadUpdater(runtime)
        updater.add_class_embeddings("evil", np.repeat(stolen, 4, axis=0), force=True)
        path = updater.export_delta(tmp_path / "evil.eadelta", source="attacker")
    with zipfile.ZipFile(path) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    info = json.loads(members["delta.json"])
    bias = np.load(io.BytesIO(members["bias.npy"]))
    buffer = io.BytesIO()
    np.save(buffer, np.full_like(bias, 100.0))
    members["bias.npy"] = buffer.getvalue()
    info["files"]["bias.npy"] = {"sha256": hashlib.sha256(members["bias.npy"]).hexdigest(),
                                 "size": len(members["bias.npy"])}
    members["delta.json"] = json.dumps(info).encode()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


@pytest.mark.parametrize("use_device_rows", [False, True])
def test_merge_refuses_a_delta_that_takes_old_predictions(fixture_dir, malicious_delta, tmp_path, use_device_rows):
    """The delta's own device rows (bias 100) take every old prediction; recomputed with the default method,
    a class made of copies of class 0's references wins at its own mean, so it takes some of them: the
    gate refuses both merges."""
    output = tmp_path / "merged.eab"
    add_options = None
    with pytest.raises(UpdateGateError, match="merge refused by the update gate") as refused:
        merge_deltas(fixture_dir / "tiny.eab", [malicious_delta], output,
                     MergeDeltasOptions(use_device_rows=use_device_rows, add_options=add_options))
    report = refused.value.report
    assert not report.passed and report.disturbed > report.budget * report.checked
    assert {entry["class"] for entry in report.details} <= set(Bundle.open(fixture_dir / "tiny.eab").manifest.class_names)
    assert not output.exists()
    forced = merge_deltas(fixture_dir / "tiny.eab", [malicious_delta], output,
                          MergeDeltasOptions(use_device_rows=use_device_rows, add_options=add_options, force=True))
    assert forced.gate["forced"] and not forced.gate["passed"]
    assert Bundle.open(output).manifest.data["change"]["gate"]["disturbed"] == report.disturbed


def test_merge_deltas_cli_refuses_unless_forced(fixture_dir, malicious_delta, tmp_path):
    command = [sys.executable, "-c", "from edgeadapt.cli import main; raise SystemExit(main())", "merge-deltas",
               str(fixture_dir / "tiny.eab"), str(malicious_delta), "--out", str(tmp_path / "merged.eab"),
               "--use-device-rows"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    assert '"passed": false' in refused.stderr and "update gate" in refused.stderr
    assert not (tmp_path / "merged.eab").exists()
    forced = subprocess.run(command + ["--force", "--json"], capture_output=True, text=True, timeout=300)
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["gate"]["forced"] is True
