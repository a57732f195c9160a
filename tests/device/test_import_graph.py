"""The device package's import graph: no cycles, no wrong-way imports.

Reads the sources (no imports executed): an edge ``a -> b`` is any import of
``edgeadapt.device.b`` in ``device/a.py``, at module level, inside a function or under
``TYPE_CHECKING`` alike, since each is a dependency a reader has to follow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import edgeadapt.device

DEVICE = Path(edgeadapt.device.__file__).parent

#: The only cycles left: function-level imports back into a lower layer, each for one call
#: (Bundle.open checks the signature; unpacking a zip re-opens the bundle to verify it; the
#: manifest validates its head section). The list may only shrink.
ALLOWED_BACK_EDGES = {("bundle", "signing"), ("packing", "bundle"), ("manifest", "manifest_schema")}

#: Imports that must never exist: the file format knows no solver, the delta format no
#: updater, the solvers not the module that calls them.
FORBIDDEN = {
    ("bundle", "ridge"), ("bundle", "incremental"), ("bundle", "fewshot"), ("bundle", "updater"),
    ("delta", "updater"), ("ridge", "incremental"), ("ridge", "fewshot"), ("fewshot", "incremental"),
    ("head_state", "updater"), ("update_gate", "updater"),
} | {  # the ridge method's parts, as the ridge module itself
    edge
    for part in ("ridge_model", "ridge_closed_forms", "ridge_calibration", "ridge_basis", "ridge_basis_columns")
    for edge in (("bundle", part), (part, "incremental"), (part, "fewshot"))
}


def _imports(path: Path) -> tuple[set[str], set[str], set[str]]:
    """(device modules imported anywhere, device modules imported at module level, host modules imported)."""
    modules = {p.stem for p in DEVICE.glob("*.py")}
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    anywhere, top, host = set(), set(), set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = "edgeadapt.device" + ("." + base if base else "")
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[:2] == ["edgeadapt", "device"] and len(parts) > 2 and parts[2] in modules:
                anywhere.add(parts[2])
                if id(node) in top_level:
                    top.add(parts[2])
            elif parts[0] == "edgeadapt" and len(parts) > 1 and parts[1] != "device":
                host.add(name)
    anywhere.discard(path.stem)
    top.discard(path.stem)
    return anywhere, top, host


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]], dict[str, set[str]]]:
    every, top, host = {}, {}, {}
    for path in sorted(DEVICE.glob("*.py")):
        every[path.stem], top[path.stem], host[path.stem] = _imports(path)
    return every, top, host


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (as a path a -> ... -> a), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles_between_device_modules():
    every, top, _ = _graph()
    assert _cycle(top) is None, "module-level import cycle"
    pruned = {module: targets - {b for a, b in ALLOWED_BACK_EDGES if a == module} for module, targets in every.items()}
    assert _cycle(pruned) is None, "import cycle (module-level, function-level or TYPE_CHECKING)"
    for source, target in ALLOWED_BACK_EDGES:  # an allowed back-edge stays a lazy import...
        assert target in every[source] and target not in top[source], (source, target)
    still_needed = {edge for edge in ALLOWED_BACK_EDGES if _cycle({**pruned, edge[0]: pruned[edge[0]] | {edge[1]}})}
    assert still_needed == ALLOWED_BACK_EDGES, "remove the edges that no longer close a cycle from the list"


def test_no_wrong_way_imports():
    every, _, host = _graph()
    wrong = sorted((source, target) for source, target in FORBIDDEN if target in every.get(source, ()))
    assert not wrong
    assert not {module: names for module, names in host.items() if names}, "the device imports the host package"
