"""The docs point at things that exist: every ``service.x.y`` name in a docstring under ``service/``
or in README.md and docs/*.md imports (a module, or a module's attribute such as
``service.client.KVComposeClient``); every relative link and image in them resolves, anchors
included; every repository path they quote in backticks exists."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# service.a.b(.c...), not inside another name or a host name (kvcompose-serve.kvcompose.svc)
DOTTED = re.compile(r"(?<![\w.\-/])service(?:\.[A-Za-z_]\w*)+")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")
TOP_DIRS = ("service", "bench", "k8s", "tests", "docs", "proto", "workers", "examples", "scripts")
QUOTED_PATH = re.compile(r"`((?:" + "|".join(TOP_DIRS) + r")/[\w./\-]*)`")


def docstrings() -> list[tuple[str, str]]:
    """(where, text) of every module, class and function docstring under service/."""
    found = []
    for path in sorted((ROOT / "service").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node, clean=False)
                if text:
                    found.append((f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 1)}", text))
    return found


def named_modules() -> dict[str, list[str]]:
    """service.x.y name -> where it is named."""
    names: dict[str, list[str]] = {}
    sources = docstrings() + [(str(p.relative_to(ROOT)), p.read_text()) for p in DOCS]
    for where, text in sources:
        for name in DOTTED.findall(text):
            names.setdefault(name, []).append(where)
    return names


@cache
def resolves(name: str) -> bool:
    """``name`` is a module, or a module followed by attributes of it (each imported once)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module = ".".join(parts[:i])
        try:
            spec = importlib.util.find_spec(module)
        except ModuleNotFoundError:  # a parent is not a package
            spec = None
        if spec is None:
            continue
        obj = importlib.import_module(module)
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


NAMES = named_modules()


def test_docs_name_modules_at_all():
    assert len(NAMES) > 20, sorted(NAMES)  # the scan finds what it should


@pytest.mark.parametrize("name", sorted(NAMES))
def test_named_module_imports(name):
    assert resolves(name), f"{name} does not import (named in {', '.join(sorted(set(NAMES[name])))})"


def test_a_missing_module_is_caught():
    assert not resolves("service.engine.no_such_module")
    assert not resolves("service.client.NoSuchClient")
    assert resolves("service.client.KVComposeClient") and resolves("service.cache.ids")
    assert DOTTED.findall("see ``service.cache.ids``. And kvcompose-serve.kvcompose.svc") == ["service.cache.ids"]


def prose(text: str) -> str:
    """The text without its fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        out.append("" if fenced else line)
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@cache
def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(doc):
    broken = []
    for target in LINK.findall(prose(doc.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        if not resolved.exists():
            broken.append(f"{target}: no {path}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_quoted_paths_exist(doc):
    missing = sorted({p for p in QUOTED_PATH.findall(prose(doc.read_text()))
                      if not (ROOT / p.rstrip("/")).exists()})
    assert not missing, f"{doc.relative_to(ROOT)} quotes paths that do not exist: {missing}"


def layout_block() -> list[str]:
    """The lines of docs/architecture.md's package layout: the fenced block that starts with ``service/``."""
    lines = (ROOT / "docs" / "architecture.md").read_text().splitlines()
    start = lines.index("service/")
    assert FENCE.match(lines[start - 1]), "the layout is a fenced block starting with 'service/'"
    end = next(i for i in range(start, len(lines)) if FENCE.match(lines[i]))
    return lines[start + 1:end]


def listed_modules() -> set[str]:
    """service/-relative paths of the modules the layout lists: a line at the package's indentation
    that starts with a file lists top-level modules; ``folder/`` starts a folder, whose files go on
    on the more indented lines below it; comments (#) and the folders outside service/ are not read."""
    listed, folder = set(), None
    for line in layout_block():
        words = line.split("#")[0].split()
        indent = len(line) - len(line.lstrip())
        if not words or indent == 0:  # bench/, workers/, proto/: outside the package
            folder = None if indent == 0 else folder
            continue
        if indent == 2:
            folder = words[0] if words[0].endswith("/") else ""
        files = [w for w in words if w.endswith(".py")]
        assert folder is not None, line
        listed |= {folder + f for f in files}
    return listed


def test_architecture_lists_every_module_once():
    """docs/architecture.md holds the one copy of the layout: every module under service/ (but
    __init__.py), and nothing that is not there."""
    tree = {str(p.relative_to(ROOT / "service")) for p in (ROOT / "service").rglob("*.py") if p.name != "__init__.py"}
    listed = listed_modules()
    assert not tree - listed, f"modules missing from docs/architecture.md's layout: {sorted(tree - listed)}"
    assert not listed - tree, f"docs/architecture.md's layout lists modules that do not exist: {sorted(listed - tree)}"
    readme = (ROOT / "README.md").read_text()
    assert "\nservice/\n" not in readme, "the README links to the layout in docs/architecture.md, not a copy"
