"""Every ```python block of README.md runs as written.

Each block runs in a new Python process in a fresh temporary folder (as a user pasting it
would). An HTML comment right before a block says what it needs (the convention is also
written, as a comment, at the end of README.md):

- ``<!-- readme-test: setup=bundle ... -->``: ``out/model.eab`` and ``out/samples/<class>/``
  exist, as ``edgeadapt demo --out out`` leaves them; here they are the test fixture's bundle
  and held-out images, written by the same code (``export_bundle``, ``write_image_folder``).
- ``<!-- readme-test: slow ... -->``: the block trains a model; it runs with ``pytest -m slow``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCK = re.compile(r"(?:<!--\s*readme-test:(?P<options>[^>]*?)-->\s*\n)?^```python\n(?P<code>.*?)^```\s*$",
                   re.MULTILINE | re.DOTALL)
SETUPS = ("bundle",)


def readme_blocks() -> list[tuple[int, set[str], str]]:
    """(line number, options, code) of every python block of README.md."""
    text = README.read_text()
    blocks = []
    for match in BLOCK.finditer(text):
        options = set((match.group("options") or "").split("(")[0].split())
        blocks.append((text.count("\n", 0, match.start("code")) + 1, options, match.group("code")))
    return blocks


def _params():
    params = []
    for line, options, code in readme_blocks():
        marks = [pytest.mark.slow] if "slow" in options else []
        params.append(pytest.param(options, code, id=f"README.md:{line}", marks=marks))
    return params


def test_the_readme_has_python_blocks_and_known_options():
    blocks = readme_blocks()
    assert len(blocks) >= 2, "README.md lost its python examples"
    assert len(blocks) == README.read_text().count("\n```python\n") + README.read_text().startswith("```python\n")
    for line, options, _ in blocks:
        unknown = {option for option in options if option != "slow" and option.split("=", 1)[-1] not in SETUPS}
        assert not unknown, f"README.md:{line}: unknown readme-test options {unknown}"


@pytest.mark.parametrize(("options", "code"), _params())
def test_readme_block_runs(options, code, tmp_path, request):
    if "setup=bundle" in options:
        fixture_dir = request.getfixturevalue("fixture_dir")
        shutil.copytree(fixture_dir / "tiny.eab", tmp_path / "out" / "model.eab")
        shutil.copytree(fixture_dir / "images", tmp_path / "out" / "samples")
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    completed = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                               timeout=900, env=environment)
    assert completed.returncode == 0, f"{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
