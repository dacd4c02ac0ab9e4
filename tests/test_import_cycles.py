"""No import cycles among the modules of services/ and shared/ (pure Python: reads the sources with
``ast``, imports nothing). Every import counts, also one inside a function. An edge goes to the
module an import names: ``from a.b import c`` names ``a.b.c`` if that is a module, else ``a.b``;
the packages above it run first but are no edge, so a package's ``__init__`` may import its own
submodules as long as none of them imports the package back."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("services", "shared")


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module of the packages (a package is its __init__)."""
    names = {}
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names[".".join(parts)] = path
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = module_names(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:                                  # relative: from the module's package
                    anchor = name.split(".")[:len(name.split(".")) - node.level + is_package]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_no_import_cycles_in_services_and_shared():
    graph = import_graph(ROOT)
    assert "services.executor.attention.registry" in graph["services.executor.attention"]
    assert "shared.messages" in graph["services.executor.worker"]
    assert cycles(graph) == []


def test_the_check_finds_a_cycle_through_a_package_init(tmp_path):
    pkg = tmp_path / "services" / "pkg"
    pkg.mkdir(parents=True)
    (tmp_path / "shared").mkdir()
    (pkg / "__init__.py").write_text("from services.pkg.impl import run\n")
    (pkg / "impl.py").write_text("def run():\n    from . import CONSTANT\n")
    (pkg / "leaf.py").write_text("import os\n")
    (tmp_path / "shared" / "util.py").write_text("from services.pkg import leaf\n")
    graph = import_graph(tmp_path)
    assert graph["shared.util"] == {"services.pkg.leaf"}
    assert cycles(graph) == [["services.pkg", "services.pkg.impl"]]
    (pkg / "impl.py").write_text("def run():\n    from .leaf import os\n")
    assert cycles(import_graph(tmp_path)) == []
