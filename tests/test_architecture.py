"""The package's shape: no import circle (in storage, and in the whole package), no module grown too long."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "actcap"
MAX_LINES = 600
LONG_MODULES = {
    "lm_eval/model.py": "lm-eval's LM interface: three request kinds, each with capture and caching",
    "bench/verify.py": "actcap verify: re-runs each prompt alone and compares stored activations site by site",
}
"""Modules allowed over :data:`MAX_LINES`, each with the reason."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, package: str) -> set[str]:
    """Every module ``path`` imports, at any depth (function-level imports count too)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {  # `if TYPE_CHECKING:` imports never run
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING"
        for stmt in block.body
        for n in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph(package: str) -> dict[str, set[str]]:
    """``module -> modules of package it imports``, from the source, without importing anything."""
    folder = SRC.parent.joinpath(*package.split("."))
    modules = {_module_name(p): p for p in folder.rglob("*.py")}
    return {
        name: {m for m in _imports(path, name) if m in modules and m != name}
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (its modules in order), or None when it has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_circle_through_a_function_level_import(tmp_path: Path) -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from actcap.storage.run import open_run\n")
    assert "actcap.storage.run" in _imports(source, "actcap.storage.m")
    source.write_text("if TYPE_CHECKING:\n    from actcap.bench.runner import X\n")
    assert "actcap.bench.runner" not in _imports(source, "actcap.bench.m")


def test_storage_modules_import_no_circle() -> None:
    graph = import_graph("actcap.storage")
    graph.pop("actcap.storage", None)  # the package re-exports its modules' public names
    assert len(graph) > 10
    assert find_cycle(graph) is None


def test_no_module_imports_in_a_circle() -> None:
    """The whole package, beyond storage: no module imports one that imports it back (an import
    of a package's ``__init__``, which only re-exports its modules' public names, is no edge)."""
    graph = import_graph("actcap")
    packages = {n for n in graph if (SRC.parent.joinpath(*n.split(".")) / "__init__.py").exists()}
    graph = {n: {m for m in deps if m not in packages} for n, deps in graph.items()}
    assert len(graph) > 80
    assert find_cycle(graph) is None


def test_no_module_is_too_long() -> None:
    long = {
        str(p.relative_to(SRC)): n
        for p in SRC.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    unexplained = {p: n for p, n in long.items() if p not in LONG_MODULES}
    assert not unexplained, f"modules over {MAX_LINES} lines: {unexplained}"
