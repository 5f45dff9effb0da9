"""Arrows point one way (DESIGN.md section 1, STYLE.md rule 10): the import graph of fm and data_prep, read from the
code with ``ast``, has no cycle, whether or not the imports inside functions are counted; nothing in fm but the
command line imports data_prep, and data_prep never imports the command line.

    .venv/bin/python -m pytest -q tests/unit/test_imports.py
"""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fm", "data_prep")
COMMAND_LINE = {"fm.cli", "fm.demo"}  # the `fm` command and the pipeline it runs: above data_prep


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    where: str  # path:line
    top_level: bool  # False: inside a function, method or other block


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _runtime_imports(tree: ast.Module):
    """(import node, at module level?) for every import that runs: ``if TYPE_CHECKING:`` blocks are skipped."""

    def visit(node: ast.AST, top: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for grandchild in child.orelse:
                    yield from visit_one(grandchild, top)
                continue
            yield from visit_one(child, top)

    def visit_one(node: ast.AST, top: bool):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, top
        # statements nested in if/try/with at module level still run on import; a def or class body does not
        nested_top = top and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
        yield from visit(node, nested_top)

    yield from visit(tree, True)


def edges() -> list[Edge]:
    """Every import of a module of fm or data_prep by another; ``from pkg import sub`` points at ``pkg.sub``.

    A package's ``__init__`` importing its own submodules (``fm.load_pretrained``, loaded on first use) is a facade,
    not an arrow: any import of a submodule loads its package first, so such an edge would close a cycle with every
    module that reads ``fm.__version__``.
    """
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    out = []
    for source, path in mods.items():
        package = source if path.name == "__init__.py" else source.rpartition(".")[0]
        for node, top in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from .x import y
                    base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for name in names:
                target = resolve(name) if name.split(".")[0] in PACKAGES else None
                if target is None or target == source:
                    continue
                if path.name == "__init__.py" and target.startswith(source + "."):
                    continue  # the facade (see the docstring)
                out.append(Edge(source, target, f"{path.relative_to(ROOT)}:{node.lineno}", top))
    return list(dict.fromkeys(out))  # `from a import b, c` is one edge


def find_cycle(graph_edges: list[Edge]) -> list[Edge] | None:
    """The edges of one cycle of the graph, or None."""
    graph: dict[str, set[str]] = {}
    for e in graph_edges:
        graph.setdefault(e.source, set()).add(e.target)
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        cycle = err.args[1]  # [a, b, ..., a], each node depending on the next
        by_pair = {(e.source, e.target): e for e in graph_edges}
        return [by_pair[(a, b)] for a, b in zip(cycle, cycle[1:])]
    return None


def _describe(cycle: list[Edge]) -> str:
    return "; ".join(f"{e.source} -> {e.target} ({e.where}{'' if e.top_level else ', inside a function'})"
                     for e in cycle)


def test_the_graph_is_read_from_the_code():
    found = edges()
    assert {e.source for e in found} >= {"fm.cli", "fm.predict", "data_prep.convert"}
    assert any(e.source == "data_prep.convert" and e.target == "fm.data.schema" and e.top_level for e in found)
    assert any(e.source == "fm.cli" and not e.top_level for e in found)  # its subcommands load on use
    assert find_cycle([Edge("a", "b", "x:1", True), Edge("b", "a", "y:2", False)]) is not None


def test_no_import_cycle_at_module_level():
    cycle = find_cycle([e for e in edges() if e.top_level])
    assert cycle is None, f"import cycle: {_describe(cycle)}"


def test_no_import_cycle_counting_imports_inside_functions():
    """An import placed inside a function to dodge a cycle is still a cycle (STYLE.md rule 10)."""
    cycle = find_cycle(edges())
    assert cycle is None, f"import cycle: {_describe(cycle)}"


def test_fm_imports_data_prep_only_from_the_command_line():
    wrong = [e for e in edges() if e.target.split(".")[0] == "data_prep" and e.source.split(".")[0] == "fm"
             and e.source not in COMMAND_LINE]
    assert not wrong, "fm's library layers import data_prep: " + _describe(wrong)


def test_data_prep_never_imports_the_command_line():
    wrong = [e for e in edges() if e.source.split(".")[0] == "data_prep" and e.target in COMMAND_LINE]
    assert not wrong, "data_prep imports the command line: " + _describe(wrong)


@pytest.mark.parametrize("step", ["data_prep.validate", "data_prep.convert"])
def test_a_step_run_as_main_is_loaded_once(step, tmp_path):
    """``python -m data_prep.validate`` runs the module as __main__ and never imports it again under its name."""
    code = (f"import runpy, sys\nsys.argv = ['{step}', '--help']\n"
            f"try:\n    runpy.run_module('{step}', run_name='__main__', alter_sys=True)\n"
            f"except SystemExit as e:\n    print('exit', e.code)\n"
            f"print('loaded twice' if '{step}' in sys.modules else 'loaded once')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"usage: python -m {step}" in proc.stdout
    assert proc.stdout.strip().splitlines()[-2:] == ["exit 0", "loaded once"], proc.stdout[-2000:]


def test_no_private_name_is_imported_across_modules():
    """A name shared between modules is public (no ``from fm.data.tokenize import _empty``); dunders excepted."""
    wrong = []
    for path in modules().values():
        for node, _ in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
                wrong += [f"{path.relative_to(ROOT)}:{node.lineno} imports {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not wrong, "; ".join(wrong)


RELEASE = ("fm.checkpoint", "fm.predict")  # what loads and runs a release: no training code (DESIGN.md section 1)


def test_the_release_imports_no_training_code():
    """``fm.checkpoint`` and ``fm.predict`` import nothing from ``fm.tasks``: neither themselves (counting the imports
    inside their functions) nor through any module they load (its module-level imports)."""
    found = edges()
    reached, todo, via = set(), list(RELEASE), {}
    while todo:
        module = todo.pop()
        for e in found:
            if e.source == module and (e.top_level or module in RELEASE) and e.target not in reached:
                reached.add(e.target)
                via[e.target] = e
                todo.append(e.target)
    wrong = sorted(m for m in reached if m == "fm.tasks" or m.startswith("fm.tasks."))

    def path(module: str) -> str:
        chain = [via[module]]
        while chain[-1].source not in RELEASE:
            chain.append(via[chain[-1].source])
        return _describe(chain[::-1])

    assert not wrong, "the release imports training code: " + "; ".join(path(m) for m in wrong)
