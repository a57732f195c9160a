"""The whole pipeline through the command line: demo, inspect, device predict."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("tensorflow")

from edgeadapt import cli  # noqa: E402
from edgeadapt.device import Bundle, Runtime, cli as device_cli  # noqa: E402


@pytest.mark.slow
def test_demo_trains_exports_and_runs_on_device(tmp_path):
    """The real entry point, as a user runs it: the table on stdout, and nothing else by default."""
    report_path = tmp_path / "report.json"
    environment = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    completed = subprocess.run(
        [sys.executable, "-m", "edgeadapt.cli", "demo", "--out", str(tmp_path / "out"), "--epochs", "10",
         "--json-out", str(report_path), "--min-accuracy", "0.8"],
        capture_output=True, text=True, timeout=1200, env=environment)
    output = completed.stdout
    assert completed.returncode == 0, output + completed.stderr
    assert "tflite" in output and "onnx" in output and "ms/image" in output
    # quiet by default: no TensorFlow start-up logs, no INFO pages, no progress bars in a redirected log
    assert completed.stderr == "", completed.stderr[:3000]
    assert "\x1b[" not in output and "\r" not in output
    report = json.loads(report_path.read_text())
    assert {row["format"] for row in report["formats"]} == {"tflite", "onnx"}
    for row in report["formats"]:
        assert row["runtime_accuracy"] >= 0.8
        assert row["top1_agreement"] >= 0.95
        assert row["int8_size"] < 0.4 * row["float_size"]
    bundle = Bundle.open(tmp_path / "out" / "model.eab")
    assert bundle.manifest.class_names == report["class_names"]
    # Cached embeddings were written and a second export reuses them.
    assert list((tmp_path / "out" / "embedding-cache").glob("*.npy"))
    # held-out sample images to try the bundle on (the README's device example uses them)
    for name in report["class_names"]:
        assert (tmp_path / "out" / "samples" / name / "0000.png").is_file()


def test_a_domain_error_is_one_line_after_importing_tensorflow(tmp_path):
    """The command imports TensorFlow (loading the Keras file), then fails: stderr is the one error line.

    Without the import filter TensorFlow prints its absl start-up lines here (see ``edgeadapt -vv``).
    """
    environment = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    completed = subprocess.run(
        [sys.executable, "-m", "edgeadapt.cli", "adapt-input", str(tmp_path / "missing.keras"), "--image-size", "8",
         "--out", str(tmp_path / "x.keras")], capture_output=True, text=True, timeout=300, env=environment)
    assert completed.returncode == 1
    assert completed.stderr.splitlines() == [f"edgeadapt: error: model file {str(tmp_path / 'missing.keras')!r} "
                                             "does not exist"]


def test_inspect_and_device_predict(fixture_dir, fixture_info, capsys):
    assert cli.main(["inspect", str(fixture_dir / "tiny.eab")]) == 0
    text = capsys.readouterr().out
    assert "checksums OK" in text and "backbone.int8.tflite" in text and "parity" in text
    for name in fixture_info["class_names"]:
        assert name in text
    class_name = fixture_info["class_names"][1]
    image = sorted((fixture_dir / "images" / class_name).iterdir())[0]
    assert device_cli.main(["predict", str(fixture_dir / "tiny.eab"), str(image), "--top-k", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    predictions = result["results"][0]["predictions"]
    assert len(predictions) == 2
    expected = Runtime.open(fixture_dir / "tiny.eab").predict(image, top_k=1)[0].label
    assert predictions[0]["label"] == expected


def test_cli_errors_are_clear_and_typed(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "missing.eab")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert device_cli.main(["predict", str(tmp_path / "missing.eab"), "x.png"]) == 1
    assert "edgeadapt-device: error" in capsys.readouterr().err
