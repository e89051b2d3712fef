"""The layout is the data path, and its import rules hold: the engine (torch) and the store (Redis)
never import each other, the cache's byte format is readable without torch, the store server
process loads no model stack, and no module imports itself through others."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parents[1] / "service"
HEAVY = ("torch", "transformers", "kvpress", "triton")


def imports_of(package: str) -> dict[str, set[str]]:
    """Module file -> every ``service...`` module it imports, at any depth (lazy imports count)."""
    found = {}
    for path in sorted((SERVICE / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        found[str(path.relative_to(SERVICE.parent))] = {n for n in names if n.startswith("service")}
    return found


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{module} imports {name}" for module, names in imports_of(package).items() for name in sorted(names)
            if any(name == f or name.startswith(f + ".") for f in forbidden)]


@pytest.mark.parametrize("package, forbidden", [
    ("engine", ("service.store", "service.serve", "service.local", "service.bench", "service.cli")),
    ("store", ("service.engine", "service.serve", "service.bench", "service.cli",
               "service.cache.kvcache", "service.cache.codec",   # the format, not the tensors
               "service.local.stack", "service.local.run", "service.local.store_process")),  # processes only
    ("cache", ("service.engine", "service.store", "service.serve", "service.local", "service.bench")),
    ("local", ("service.bench", "service.cli")),
])
def test_packages_import_only_downstream_of_the_data_path(package, forbidden):
    assert offenders(package, forbidden) == []


def test_the_rule_check_sees_lazy_imports():
    """The checker itself: an import inside a function counts (the store once reached torch that way)."""
    assert any("service.cache.kvcache" in names for names in imports_of("cache").values())  # codec's
    assert "service.engine.selection" in imports_of("engine")["service/engine/prefill.py"]


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVICE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """The ``service`` modules a module imports as it loads: its module-level statements, including
    ``if TYPE_CHECKING:`` and ``try:`` blocks, but not function bodies. ``from p import m`` is the
    module ``p.m`` where that is one, else ``p``; a package's own ``__init__`` is not counted for its
    submodules (it is loaded first, and re-exporting them is no cycle)."""
    package = module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    found, todo = set(), list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                if node.level else node.module
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        elif isinstance(node, (ast.If, ast.Try, ast.With, ast.ClassDef)):
            todo += [n for field in ("body", "orelse", "finalbody") for n in getattr(node, field, [])]
            todo += [n for h in getattr(node, "handlers", []) for n in h.body]
    return found & modules


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a list of nodes, the first repeated at its end) per set of mutually importing
    nodes, found by depth-first search."""
    found, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycle = path[path.index(nxt):]
                if not any(set(cycle) <= set(c) for c in found):
                    found.append([*cycle, nxt])
            elif nxt not in done:
                visit(nxt, [*path, nxt])
        done.add(node)

    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    return found


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"b"}, "d": {"a"}}) == [["b", "c", "b"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_inside_any_package():
    """No ``service`` module imports, through others, a module that imports it: checked over every
    module-level import in the whole tree (so within ``service.engine``, ``service.store``,
    ``service.serve``, ... and across them). A ``TYPE_CHECKING`` import counts: it is still a
    dependency, and engine <-> batching once hid that way. An import inside a function does not:
    it runs after both modules have loaded, and it is how a module defers a heavy dependency
    (torch) to the call that needs it."""
    paths = sorted(SERVICE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    graph = {module_name(p): top_level_imports(p, modules) for p in paths}
    assert graph["service.engine.engine"] >= {"service.engine.batching", "service.engine.decode"}  # the check sees
    assert cycles(graph) == []


def loaded_after(module: str) -> list[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    return json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


@pytest.mark.parametrize("module", ["service.store.server", "service.store.client", "service.cache.format",
                                    "service.cache.ids", "service.local.processes"])
def test_the_store_and_the_byte_format_load_no_model_stack(module):
    """The store server process starts without torch: it checks caches with ``cache/format.py``."""
    assert loaded_after(module) == []


def test_a_model_module_does_load_the_model_stack():
    """The probe can fail: the codec (tensors) does bring torch in."""
    assert "torch" in loaded_after("service.cache.codec")
