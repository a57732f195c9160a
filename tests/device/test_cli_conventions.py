"""Both command lines follow the same conventions, on every sub-command (no TensorFlow needed).

Help texts explain every option and show defaults, ``-v/-q`` exist everywhere, ``--json`` is
a flag, ``--backend`` has the real list of interpreters, exit codes are 0/1/2 with one-line
errors, old option spellings still work but are hidden.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from edgeadapt.device.backends import AUTO_ORDER
from edgeadapt.device.cli_common import HelpFormatter, error_line
from edgeadapt.device.console import is_native_noise


def _parsers():
    from edgeadapt import cli as host_cli
    from edgeadapt.device import cli as device_cli

    return {"edgeadapt": host_cli.build_parser(), "edgeadapt-device": device_cli.build_parser()}


def _commands(parser: argparse.ArgumentParser, path=()):
    """(command path, parser) of every sub-command, recursively."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*path, name), child
                yield from _commands(child, (*path, name))


def _leaf_commands():
    for program, parser in _parsers().items():
        for path, child in _commands(parser):
            if not any(isinstance(action, argparse._SubParsersAction) for action in child._actions):
                yield program, path, child


LEAVES = list(_leaf_commands())
IDS = [f"{program} {' '.join(path)}" for program, path, _ in LEAVES]


def test_both_programs_have_their_commands():
    names = {(program, " ".join(path)) for program, path, _ in LEAVES}
    for expected in (("edgeadapt", "demo"), ("edgeadapt", "train"), ("edgeadapt", "bench incremental"),
                     ("edgeadapt", "inspect"), ("edgeadapt-device", "predict"), ("edgeadapt-device", "add-class")):
        assert expected in names


@pytest.mark.parametrize(("program", "path", "parser"), LEAVES, ids=IDS)
def test_help_texts_explain(program, path, parser):
    assert parser.formatter_class is HelpFormatter
    assert parser.description or any(action.help for action in parser._actions if action.dest == "help")
    text = parser.format_help()
    assert "%%" not in text and "issue" not in text.lower(), text
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and len(action.help) >= 8, f"{program} {' '.join(path)}: {name} has no help text"
        shown = HelpFormatter(parser.prog)._get_help_string(action)
        has_default = action.default not in (None, False, argparse.SUPPRESS, (), []) and not isinstance(
            action, argparse._CountAction)
        if has_default and action.option_strings:
            assert "default" in shown.lower(), f"{program} {' '.join(path)}: {name} does not show its default"


@pytest.mark.parametrize(("program", "path", "parser"), LEAVES, ids=IDS)
def test_common_options_are_consistent(program, path, parser):
    options = parser._option_string_actions
    assert "-v" in options and "-q" in options
    for flag in ("--size", "--input-size"):  # old spellings: hidden, replaced by --image-size
        if flag in options:
            assert options[flag].help == argparse.SUPPRESS
            assert "--image-size" in options
    if "--json" in options:
        assert options["--json"].nargs == 0, f"{program} {' '.join(path)}: --json must be a flag"
        assert "--json-out" in options, f"{program} {' '.join(path)}: --json without --json-out FILE"
    for flag in ("--backend", "--backbone-backend"):
        if flag in options:
            assert options[flag].choices[0] == "auto" and set(options[flag].choices) <= {"auto", *AUTO_ORDER}
    if "--method" in options and program == "edgeadapt":
        assert options["--method"].choices


def test_gate_budget_only_where_the_update_gate_runs():
    parser = _parsers()["edgeadapt-device"]
    commands = {" ".join(path): child for path, child in _commands(parser)}
    with_budget = {name for name, child in commands.items() if "--gate-budget" in child._option_string_actions}
    assert with_budget == {"add-class", "add-examples", "remove-class"}
    with_force = {name for name, child in commands.items() if "--force" in child._option_string_actions}
    assert with_budget == with_force  # the commands whose update the gate can refuse


def test_every_device_command_takes_repeatable_trust_keys():
    parser = _parsers()["edgeadapt-device"]
    leaves = {" ".join(path): child for path, child in _commands(parser)
              if not any(isinstance(action, argparse._SubParsersAction) for action in child._actions)}
    without = {name for name, child in leaves.items() if "--trust" not in child._option_string_actions}
    assert without == {"keys generate"}  # making a key trusts nothing
    for name, child in leaves.items():
        if name != "keys generate":
            action = child._option_string_actions["--trust"]
            assert isinstance(action, argparse._AppendAction), name
    parsed = parser.parse_args(["predict", "b.eab", "x.png", "--trust", "a.pub", "--trust", "keys/"])
    assert [str(path) for path in parsed.trust] == ["a.pub", "keys"]


def test_exit_codes_and_one_line_errors(tmp_path, capsys):
    from edgeadapt.device.cli import main

    missing = str(tmp_path / "missing.eab")
    assert main(["predict", missing, "x.png"]) == 1  # domain error
    error = capsys.readouterr().err
    assert error.startswith("edgeadapt-device: error: ") and error.count("\n") == 1 and "Traceback" not in error
    assert main(["-v", "predict", missing, "x.png"]) == 1  # -v adds the traceback
    assert "Traceback" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["predict", missing, "x.png", "--backend", "tensorflow"])
    assert usage.value.code == 2  # usage error
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["rename-class", missing, "a", "b", "--gate-budget", "0.2"])
    assert usage.value.code == 2
    with pytest.raises(SystemExit) as shown:
        main(["--help"])
    assert shown.value.code == 0
    assert "exit status: 0 success; 1 error" in capsys.readouterr().out


def test_deprecated_alias_still_works_with_a_warning(capsys):
    parser = _parsers()["edgeadapt"]
    arguments = parser.parse_args(["adapt-input", "m.keras", "--size", "48x40", "--out", "x.keras"])
    assert arguments.size == (48, 40)
    assert "--size is deprecated; use --image-size" in capsys.readouterr().err
    arguments = parser.parse_args(["adapt-input", "m.keras", "--image-size", "64", "--out", "x.keras"])
    assert arguments.size == (64, 64)
    arguments = parser.parse_args(["import", "m.tflite", "--labels", "l.txt", "--out", "o.eab", "--input-size", "9x7"])
    assert arguments.input_size == (9, 7)


def test_json_is_a_flag_and_json_out_a_file(fixture_dir, tmp_path, capsys):
    from edgeadapt.device.cli import main

    image = sorted((fixture_dir / "images").rglob("*.png"))[0]
    assert main(["predict", str(fixture_dir / "tiny.eab"), str(image), "--top-k", "1", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["results"][0]["image"] == str(image)
    report = tmp_path / "predictions.json"
    assert main(["predict", str(fixture_dir / "tiny.eab"), str(image), "--top-k", "1", "--json-out", str(report)]) == 0
    assert str(image) in capsys.readouterr().out  # the table on stdout, the JSON in the file
    assert json.loads(report.read_text()) == printed


def test_the_device_command_prints_no_native_noise(fixture_dir):
    """A real run of the installed entry point: results on stdout, nothing on stderr."""
    image = sorted((fixture_dir / "images").rglob("*.png"))[0]
    completed = subprocess.run([sys.executable, "-m", "edgeadapt.device.cli", "predict", str(fixture_dir / "tiny.eab"),
                                str(image), "--top-k", "1"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert str(image) in completed.stdout
    assert completed.stderr == ""


def test_native_start_up_lines_are_recognised_and_nothing_else():
    assert is_native_noise("I0000 00:00:1796104956.131802    7148 port.cc:153] oneDNN custom operations are on.")
    assert is_native_noise("W0000 00:00:1796104956.131802    7148 cuda_dnn.cc:8] could not open")
    assert is_native_noise("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR")
    assert not is_native_noise("E0000 00:00:1796104958.293140    7148 cuda_platform.cc:52] failed call to cuInit")
    assert not is_native_noise("Traceback (most recent call last):")
    assert not is_native_noise("edgeadapt: error: model file 'x.keras' does not exist")
    assert error_line("edgeadapt", ValueError("first\n  second\n")) == "edgeadapt: error: first; second"


@pytest.mark.parametrize(("argv", "verbose", "quiet"), [
    (["demo", "--out", "o"], 0, False),
    (["demo", "--out", "o", "-v"], 1, False),
    (["-vv", "demo", "--out", "o"], 2, False),
    (["demo", "--out", "o", "-q"], 0, True),
    (["-q", "demo", "--out", "o"], 0, True),
])
def test_verbosity_options_work_before_and_after_the_command(argv, verbose, quiet):
    arguments = _parsers()["edgeadapt"].parse_args(argv)
    assert (arguments.verbose, arguments.quiet) == (verbose, quiet)
