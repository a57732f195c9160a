"""The whole pipeline through the command line: demo, inspect, device predict."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tensorflow")

from edgeadapt import cli  # noqa: E402
from edgeadapt.device import Bundle, Runtime  # noqa: E402
from edgeadapt.device import cli as device_cli  # noqa: E402


@pytest.mark.slow
def test_demo_trains_exports_and_runs_on_device(tmp_path, capsys):
    report_path = tmp_path / "report.json"
    status = cli.main(["demo", "--out", str(tmp_path / "out"), "--epochs", "10", "--json", str(report_path),
                       "--min-accuracy", "0.8"])
    output = capsys.readouterr().out
    assert status == 0, output
    assert "tflite" in output and "onnx" in output and "ms/image" in output
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


def test_help_texts_explain(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    assert "--data" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        device_cli.main(["predict", "--help"])
    assert "--top-k" in capsys.readouterr().out
