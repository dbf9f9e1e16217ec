"""The house's figures: module line counts, the longest functions, import circles, private-name imports."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1] / "spyke_lora"


def functions(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def private_imports(path: Path, module: str):
    """``from X import _name`` where ``X._name`` is not a submodule (``from . import _engine`` imports a module
    object, which is fine)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            source = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            folder = ROOT.parent.joinpath(*source.split("."))
            for alias in node.names:
                name = alias.name
                submodule = (folder / f"{name}.py").is_file() or (folder / name / "__init__.py").is_file()
                if name.startswith("_") and not name.startswith("__") and not submodule:
                    yield node.lineno, "." * node.level + (node.module or ""), alias.name


def circles(package: str) -> list[list[str]]:
    graph = grimp.build_graph(package)
    adj = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(10000)

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in adj[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for m in sorted(adj):
        if m not in index:
            connect(m)
    return found


def main() -> None:
    files = sorted(ROOT.rglob("*.py"))
    counts = [(len(p.read_text(encoding="utf-8").splitlines()), p.relative_to(ROOT.parent)) for p in files]
    print(f"modules: {len(files)}, lines: {sum(c for c, _ in counts)}")
    for c, p in sorted(counts, reverse=True)[:15]:
        print(f"  {c:5d} {p}")
    funcs = [(n, f"{p.relative_to(ROOT.parent)}:{line} {name}") for p in files for name, line, n in functions(p)]
    print("longest functions:")
    for n, where in sorted(funcs, reverse=True)[:15]:
        print(f"  {n:5d} {where}")
    print(f"functions over 80 lines: {sum(1 for n, _ in funcs if n > 80)}")
    print("private-name imports:")
    for p in files:
        mod = str(p.relative_to(ROOT.parent).with_suffix("")).replace("/", ".").removesuffix(".__init__")
        for line, src, name in private_imports(p, mod):
            print(f"  {p.relative_to(ROOT.parent)}:{line} from {src} import {name}")
    print("import circles (strongly connected groups of modules):")
    for comp in circles("spyke_lora"):
        print(f"  {len(comp)}: {', '.join(comp)}")
    skips = sum(p.read_text(encoding="utf-8").count("# fmt: skip") for p in files)
    print(f"'# fmt: skip' markers: {skips}")


if __name__ == "__main__":
    main()
