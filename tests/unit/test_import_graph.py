"""No import cycle between llmstack's top-level packages, read from the source with ``ast`` (nothing imported).

A node is a top-level package or module of ``src/llmstack`` (``models``, ``quantize``, ``config``, ``_ray``...).
Every ``import`` statement counts, at module level and inside functions and classes alike: a function-level
import still ties the two packages together, it only defers when. Not counted: imports under
``if TYPE_CHECKING:`` (annotations, never executed) and imports by name at run time (``importlib``), of which
there is one on purpose: ``llmstack.models`` imports the packages that register quantized loaders
(``QUANTIZED_LOADER_PACKAGES``) on the first quantized load. The root ``llmstack/__init__.py`` is the public
facade: it may import any package, and no package may import it (only its submodules).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "llmstack"
FACADE = "<llmstack facade>"


@dataclass(frozen=True)
class Edge:
    source: str  # importing top-level package
    target: str  # imported top-level package
    where: str  # path:line of the import statement


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of every node under an ``if TYPE_CHECKING:`` block."""
    hidden: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                hidden.update(id(n) for n in ast.walk(child))
    return hidden


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Absolute dotted names ``node`` imports (``from a import b`` gives ``a.b``: b may be a submodule)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: resolved against the importing module's package
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [f"{prefix}.{alias.name}" for alias in node.names]


def _node_of(dotted: str, rooms: set[str], package: str) -> str | None:
    """The room (subpackage or module) of ``package`` a dotted name is in; the facade for ``package`` itself;
    None outside ``package``."""
    parts, depth = dotted.split("."), len(package.split("."))
    if parts[:depth] != package.split("."):
        return None
    if len(parts) > depth and parts[depth] in rooms:
        return parts[depth]
    return FACADE


def import_edges(src: Path = SRC, package: str = PACKAGE) -> list[Edge]:
    """Every import from one room of ``package`` (a top-level subpackage or module) into another, with where it
    is written. ``package`` may be nested (``llmstack.serve``): its rooms are then its own subpackages."""
    root = src.joinpath(*package.split("."))
    depth = len(package.split("."))
    rooms = {p.stem if p.is_file() else p.name for p in root.iterdir()
             if (p.is_file() and p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    edges = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, src)
        parts = module.split(".")
        source = parts[depth] if len(parts) > depth else FACADE
        if source == FACADE:  # the facade may import anything
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        hidden = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in hidden:
                continue
            for dotted in _imported(node, module, path.name == "__init__.py"):
                target = _node_of(dotted, rooms, package)
                if target is not None and target != source:
                    edges.append(Edge(source, target, f"{path.relative_to(src)}:{node.lineno}"))
    return edges


def cycles(edges: list[Edge]) -> list[list[str]]:
    """The strongly connected groups of more than one package (each one holds an import cycle), sorted."""
    graph: dict[str, set[str]] = defaultdict(set)
    for edge in edges:
        graph[edge.source].add(edge.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def _explain(group: list[str], edges: list[Edge]) -> str:
    inside = sorted({e for e in edges if e.source in group and e.target in group}, key=lambda e: (e.source, e.where))
    return f"{' <-> '.join(group)}:\n" + "\n".join(f"    {e.source} -> {e.target}  ({e.where})" for e in inside)


def test_no_import_cycle_between_llmstack_packages() -> None:
    edges = import_edges()
    assert {e.source for e in edges} >= {"models", "quantize", "data", "serve", "train"}  # the parse found them
    found = cycles(edges)
    assert not found, "import cycles between llmstack packages:\n" + "\n".join(_explain(g, edges) for g in found)


def test_no_import_cycle_between_the_rooms_of_serve() -> None:
    """Inside ``llmstack.serve`` too: engine, http, deployments, routing and the canary/regions faces."""
    edges = import_edges(package="llmstack.serve")
    assert {e.source for e in edges} >= {"engine", "http", "deployments", "routing", "canary"}
    found = cycles(edges)
    assert not found, "import cycles inside llmstack.serve:\n" + "\n".join(_explain(g, edges) for g in found)


@pytest.mark.parametrize("package", [PACKAGE, "llmstack.serve"])
def test_no_room_imports_its_facade(package: str) -> None:
    """A package's ``__init__`` imports its rooms; a room importing it back would close a cycle through it."""
    offending = [e for e in import_edges(package=package) if e.target == FACADE]
    assert not offending, "\n".join(f"{e.source} imports the {package} facade ({e.where})" for e in offending)


def test_the_checker_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    pkg = tmp_path / "llmstack"
    for name, text in {
        "__init__.py": "from llmstack.a import f\n",
        "a/__init__.py": "from llmstack.b.impl import g\n\ndef f():\n    return g()\n",
        "b/__init__.py": "",
        "b/impl.py": "def g():\n    from ..a import f  # deferred, still a cycle\n    return f\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from llmstack.a import f\n",
        "d.py": "import llmstack.c\n",
    }.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    edges = import_edges(tmp_path, "llmstack")
    assert cycles(edges) == [["a", "b"]]
    assert {(e.source, e.target, e.where) for e in edges} == {
        ("a", "b", "llmstack/a/__init__.py:1"), ("b", "a", "llmstack/b/impl.py:2"), ("d", "c", "llmstack/d.py:1")}
    assert "b -> a  (llmstack/b/impl.py:2)" in _explain(["a", "b"], edges)


def _declared_imports(package_dir: Path) -> set[str] | None:
    """The rooms a package's docstring allows it to import: the ``May import:`` sentence, names in double
    backticks (None when the docstring has no such sentence)."""
    doc = ast.get_docstring(ast.parse((package_dir / "__init__.py").read_text(encoding="utf-8"))) or ""
    if "May import:" not in doc:
        return None
    sentence = doc.split("May import:", 1)[1].split(".\n", 1)[0].split("(checked by", 1)[0]
    return {name.split(".")[-1] for name in re.findall(r"``([\w.]+)``", sentence)}


def test_every_package_imports_only_what_its_docstring_declares() -> None:
    root = SRC / PACKAGE
    packages = sorted(p for p in root.iterdir() if (p / "__init__.py").is_file())
    edges = import_edges()
    problems = []
    for package in packages:
        declared = _declared_imports(package)
        if declared is None:
            problems.append(f"{package.name}: its docstring has no `May import:` sentence")
            continue
        for edge in sorted((e for e in edges if e.source == package.name), key=lambda e: e.where):
            if edge.target not in declared:
                problems.append(f"{package.name} imports {edge.target} ({edge.where}); its docstring allows "
                                f"{', '.join(sorted(declared))}")
    assert not problems, "\n".join(problems)
