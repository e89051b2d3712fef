"""The layout is the data path, and its import rules hold: the engine (torch) and the store (Redis)
never import each other, the cache's byte format is readable without torch, and the store server
process loads no model stack."""

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
