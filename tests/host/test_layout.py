"""The source layout: host sub-packages depend on each other one way only (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: package -> the edgeadapt packages its modules may import (besides itself)
ALLOWED = {
    "device": set(),
    "converters": {"device"},
    "data": {"device"},
    "training": {"data", "converters", "device"},
    "bundles": {"training", "data", "converters", "device"},
    "detection": {"converters", "device"},
    "benchmarks": {"bundles", "training", "data", "detection", "converters", "device"},
}


def package_of(path: Path) -> str:
    relative = path.relative_to(ROOT)
    if relative.parts[0] == "sdk":
        return relative.parts[1] if len(relative.parts) > 2 else "top"
    return relative.parts[0]


def imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module + "." + alias.name for alias in node.names] if node.module == "edgeadapt" else [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "edgeadapt" and len(parts) > 1 and not parts[1].startswith("_"):
                found.add(parts[1])
    return found


def library_modules():
    for folder in ("sdk", "converters", "device", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.parent.name == "benchmarks" and path.name.startswith("bench_"):
                continue  # the scripts sit on top, like the CLI
            yield path


def test_host_packages_depend_one_way():
    wrong = []
    for path in library_modules():
        package = package_of(path)
        if package not in ALLOWED:
            continue  # cli, the top-level API and the demo may import anything
        extra = imported_packages(path) - ALLOWED[package] - {package}
        if extra:
            wrong.append(f"{path.relative_to(ROOT)} imports edgeadapt.{sorted(extra)}")
    assert wrong == []


def test_sdk_has_no_flat_modules_besides_the_api_and_the_demo():
    flat = sorted(path.name for path in (ROOT / "sdk").glob("*.py"))
    assert flat == ["__init__.py", "pipeline.py"]


def test_the_check_sees_a_wrong_way_import(tmp_path):
    module = tmp_path / "module.py"
    module.write_text("from edgeadapt.bundles.incremental import add_classes\nimport edgeadapt.cli\nfrom edgeadapt import __version__\n")
    assert imported_packages(module) == {"bundles", "cli"}
