"""The architecture of docs/architecture.md, checked: no import circle among spyke_lora's modules, no module taking
another's private name, and only the engine importing sd-scripts. The layers, the engine's monopoly on sd-scripts'
imports and the package face are also import-linter contracts (``[tool.importlinter]`` in pyproject.toml, run by
``make lint``); this file catches what no contract type does: a circle through a package's ``__init__``, and a
private name imported across modules."""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest

import spyke_lora

PACKAGE = Path(spyke_lora.__file__).parent


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("spyke_lora")


def strongly_connected(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every group of two or more modules that import each other, directly or not (Tarjan, without recursion)."""
    adjacency = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in sorted(graph.modules)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for root in adjacency:
        if root in index:
            continue
        work = [(root, iter(adjacency[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(adjacency[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def private_imports(text: str, module: str, *, is_package: bool, modules: set[str]) -> list[str]:
    """Each ``from X import _name`` in ``text`` (the source of ``module``) where ``X._name`` is not a module of
    ``modules``: importing a module object (``from . import _engine``) is fine, a private name is not."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.ImportFrom):
            continue
        base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        source = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
        for alias in node.names:
            name = alias.name
            if name.startswith("_") and not name.startswith("__") and f"{source}.{name}" not in modules:
                found.append(f"{module}:{node.lineno} from {source} import {name}")
    return found


def test_no_import_circle(graph):
    assert strongly_connected(graph) == []


def test_the_circle_finder_finds_a_circle():
    fake = grimp.ImportGraph()
    for name in ("p", "p.a", "p.b", "p.c", "p.d"):
        fake.add_module(name)
    fake.add_import(importer="p.a", imported="p.b")
    fake.add_import(importer="p.b", imported="p.c")
    fake.add_import(importer="p.c", imported="p.a")
    fake.add_import(importer="p.d", imported="p.a")
    assert strongly_connected(fake) == [["p.a", "p.b", "p.c"]]


def test_no_module_imports_another_modules_private_name(graph):
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        found += private_imports(text, module_name(path), is_package=path.name == "__init__.py", modules=graph.modules)
    assert found == []


def test_a_private_name_import_is_found_and_a_submodule_is_not(graph):
    text = "from ._rank import _order\nfrom .. import _engine\nfrom ._sample_checks import BROKEN\nfrom . import _x\n"
    found = private_imports(text, "spyke_lora._compare._review", is_package=False, modules=graph.modules)
    assert found == [
        "spyke_lora._compare._review:1 from spyke_lora._compare._rank import _order",
        "spyke_lora._compare._review:4 from spyke_lora._compare import _x",  # no module spyke_lora._compare._x
    ]
    inside = private_imports("from ._fit import _y\n", "spyke_lora._memory", is_package=True, modules=graph.modules)
    assert inside == ["spyke_lora._memory:1 from spyke_lora._memory._fit import _y"]


def test_only_the_engine_package_imports_sd_scripts():
    for path in PACKAGE.rglob("*.py"):
        if "_engine" in path.parts:
            continue
        text = path.read_text()
        for name in ("import library", "from library", "import train_network", "from networks", "import networks"):
            assert name not in text, f"{path.name} imports sd-scripts ({name})"
