"""The package's structure: `align_losses` imports form no cycle, no module reaches into another's
private names, and importing the package stays torch only.

The import graph is read from the source with `ast` (every ``import`` and ``from ... import``,
relative or absolute, at module level or inside a function: a lazy import still ties two modules
together), so it holds for code paths the tests do not run. Each detector is first shown to fail on
a small synthetic package.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "align_losses"

#: Importing `align_losses` must not import these (the trainers' dependencies, and the optional
#: backends' packages, which load on first use).
HEAVY = ("trl", "transformers", "datasets", "triton", "liger_kernel", "cut_cross_entropy")


# ---------------------------------------------------------------------------------------------------------------------
# Reading the import graph


def modules(root: Path, package: str) -> dict[str, Path]:
    """Every module of ``package`` (a directory under ``root``) by dotted name; a package by its own name."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def _base(module: str, level: int, files: dict[str, Path]) -> str:
    """The package a relative import of ``level`` dots in ``module`` starts from."""
    parts = module.split(".")
    if not _is_package(module, files):
        parts = parts[:-1]
    return ".".join(parts[: len(parts) - (level - 1)])


def _source(module: str, node: ast.ImportFrom, files: dict[str, Path]) -> str:
    """The dotted module a ``from ... import`` in ``module`` reads from."""
    if not node.level:
        return node.module or ""
    base = _base(module, node.level, files)
    return f"{base}.{node.module}" if node.module else base


def _statements(module: str, files: dict[str, Path]) -> Iterator[tuple[str, Optional[str], str, int]]:
    """``(imported module, name taken from it or None, local name, line)`` for each import in
    ``module`` of a module of the same package. ``from .x import y`` gives ``(pkg.x.y, None)`` when
    ``y`` is a submodule, else ``(pkg.x, "y")``."""
    package = module.split(".")[0]
    tree = ast.parse(files[module].read_text(), str(files[module]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in files:
                    yield alias.name, None, alias.asname or alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            source = _source(module, node, files)
            if source.split(".")[0] != package or source not in files:
                continue
            for alias in node.names:
                local = alias.asname or alias.name
                if f"{source}.{alias.name}" in files:
                    yield f"{source}.{alias.name}", None, local, node.lineno
                else:
                    yield source, alias.name, local, node.lineno


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Each module's direct imports within the package (``from . import name`` in a module counts as
    importing its package's ``__init__``, where ``name`` is not a submodule)."""
    return {m: {target for target, _, _, _ in _statements(m, files) if target != m} for m in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def subpackage_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph between the package's direct children (``pkg.ops.x`` counts as ``pkg.ops``), without
    the imports within one child: `align_losses.backends` may import `align_losses.ops`, or the
    other way round, not both."""
    def child(name: str) -> str:
        return ".".join(name.split(".")[:2])

    merged: dict[str, set[str]] = {}
    for module, targets in graph.items():
        merged.setdefault(child(module), set()).update(child(t) for t in targets if child(t) != child(module))
    return merged


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(files: dict[str, Path]) -> list[str]:
    """``module:line: from x import _name``, or ``module:line: x._name`` for an attribute of an imported
    module of the package, for every private name one module takes from another."""
    found = []
    for module, path in files.items():
        modules_bound = {}  # local name -> the module of the package it is bound to
        for target, name, local, line in _statements(module, files):
            if name is None:
                modules_bound[local] = target
            elif _private(name) and target != module:
                found.append(f"{module}:{line}: from {target} import {name}")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr)
                    and modules_bound.get(node.value.id, module) != module):
                found.append(f"{module}:{node.lineno}: {modules_bound[node.value.id]}.{node.attr}")
    return found


def heavy_imports(root: Path, package: str, heavy: tuple) -> list[str]:
    """The modules of ``heavy`` (top-level names) that ``import package`` loads, in a fresh interpreter
    with ``root`` first on the path."""
    code = (f"import sys; import {package}; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(heavy)!r})))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------------
# The detectors fail where they should (a synthetic package)


def _write(root: Path, files: dict) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


@pytest.fixture
def synthetic(tmp_path) -> Path:
    """``pkg``: ``a`` <-> ``sub.b`` through a lazy relative import, ``c`` -> ``a`` only, ``d`` taking
    private names both ways, ``e`` importing a heavy module."""
    _write(tmp_path, {
        "pkg/__init__.py": "from . import c\n",
        "pkg/a.py": "from .sub.b import helper\n_x = 1\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "def helper():\n    from .. import a\n    return a\n",
        "pkg/c.py": "import pkg.a\n",
        "pkg/d.py": "from .a import _x\nfrom . import a as mod\nvalue = mod._x\n",
        "pkg/e.py": "import tomllib\n",
    })
    return tmp_path


def test_detectors_find_a_cycle(synthetic):
    files = modules(synthetic, "pkg")
    graph = import_graph(files)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"} and graph["pkg.c"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b"]]
    assert cycles(subpackage_graph(graph)) == [["pkg.a", "pkg.sub"]]
    graph["pkg.sub.b"] = set()
    assert cycles(graph) == [] and cycles(subpackage_graph(graph)) == []
    graph["pkg.sub.f"] = {"pkg.a"}  # no module cycle, but pkg.a and pkg.sub import each other
    assert cycles(graph) == [] and cycles(subpackage_graph(graph)) == [["pkg.a", "pkg.sub"]]


def test_detectors_find_private_imports(synthetic):
    found = private_imports(modules(synthetic, "pkg"))
    assert found == ["pkg.d:1: from pkg.a import _x", "pkg.d:3: pkg.a._x"]


def test_detectors_find_heavy_imports(synthetic):
    assert heavy_imports(synthetic, "pkg", ("tomllib",)) == []
    (synthetic / "pkg" / "__init__.py").write_text("from . import c, e\n")
    assert heavy_imports(synthetic, "pkg", ("tomllib",)) == ["tomllib"]


# ---------------------------------------------------------------------------------------------------------------------
# The package


def test_import_graph_has_no_cycle():
    files = modules(ROOT, PACKAGE)
    assert "align_losses.ops.triton_head" in files  # the walk found the package
    graph = import_graph(files)
    assert cycles(graph) == []
    # nor between subpackages: `backends` imports `ops`, and `ops` takes the contract from `problem`
    assert cycles(subpackage_graph(graph)) == []
    assert "align_losses.backends" not in subpackage_graph(graph)["align_losses.ops"]


def test_no_private_names_across_modules():
    assert private_imports(modules(ROOT, PACKAGE)) == []


def test_importing_the_package_is_torch_only():
    assert heavy_imports(ROOT, PACKAGE, HEAVY) == []
