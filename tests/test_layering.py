"""The package layering of lcgraph, checked over the AST of every module (no import runs).

app -> planner -> observability -> runtime -> graph, schedule -> ops (-> lcgraph.errors, which all may use): a module imports lcgraph modules
of its own package or of a lower layer only; no lcgraph import hides inside a function; no private name
(`_x`) is imported from another module. Each package's __init__ docstring says the same in words.
Every module is at most MAX_LINES lines: a feature that would grow one past it gets a module of its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lcgraph"
MAX_LINES = 600
LAYER = {"errors": -1, "ops": 0, "graph": 1, "schedule": 1, "runtime": 2, "observability": 3, "planner": 4, "app": 5}


def lcgraph_imports(tree: ast.Module) -> list[tuple[ast.stmt, str, list[str]]]:
    """(statement, imported module, imported names) for every `import lcgraph...` / `from lcgraph... import`."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lcgraph":
            for alias in node.names:  # `from lcgraph.graph import passes` imports the module lcgraph.graph.passes
                out.append((node, node.module, [alias.name]))
        elif isinstance(node, ast.Import):
            out += [(node, a.name, []) for a in node.names if a.name.split(".")[0] == "lcgraph"]
    return out


def package_of(module: str, names: list[str]) -> str | None:
    parts = module.split(".")
    if len(parts) == 1 and names:  # from lcgraph import graph
        return names[0]
    return parts[1] if len(parts) > 1 else None


def violations(root: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        here = rel.parts[0] if len(rel.parts) > 1 else None  # None: lcgraph/__main__.py and friends
        tree = ast.parse(path.read_text(), str(path))
        top = {id(n) for n in tree.body}
        for node, module, names in lcgraph_imports(tree):
            where = f"lcgraph/{rel}:{node.lineno}"
            if id(node) not in top:
                found.append(f"{where}: imports {module} inside a function or block")
            for name in names:
                if name.startswith("_"):
                    found.append(f"{where}: imports the private name {name} from {module}")
            there = package_of(module, names)
            if here is None or there is None or there == here:
                continue
            if there not in LAYER or here not in LAYER:
                found.append(f"{where}: {here} -> {there}: a package outside the layering")
            elif LAYER[there] >= LAYER[here]:
                found.append(f"{where}: {here} (layer {LAYER[here]}) imports {there} (layer {LAYER[there]})")
    return found


def test_imports_point_down_the_layers():
    assert violations() == []


def test_every_package_is_in_the_layering_and_says_what_it_owns():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages <= set(LAYER), packages - set(LAYER)
    for name in packages:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and "May import" in doc, f"lcgraph/{name}/__init__.py must say what it owns and may import"


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from lcgraph.app.cli import main\n", "runtime (layer 2) imports app (layer 5)"),
        ("def f():\n    from lcgraph.ops import fused\n", "inside a function"),
        ("from lcgraph.runtime.data import _private\n", "private name _private"),
    ],
)
def test_the_check_catches_an_upward_import(tmp_path, source, expected):
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "bad.py").write_text(source)
    assert any(expected in v for v in violations(tmp_path)), violations(tmp_path)


def too_long(root: Path = PACKAGE, limit: int = MAX_LINES) -> list[str]:
    """Every module under `root` longer than `limit` lines, with its line count."""
    found = []
    for path in sorted(root.rglob("*.py")):
        lines = len(path.read_text().splitlines())
        if lines > limit:
            found.append(f"lcgraph/{path.relative_to(root)}: {lines} lines (at most {limit})")
    return found


def test_every_module_is_at_most_600_lines():
    assert too_long() == []


def test_the_length_check_names_a_too_long_module(tmp_path):
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "short.py").write_text("x = 1\n" * MAX_LINES)
    (tmp_path / "runtime" / "long.py").write_text("x = 1\n" * (MAX_LINES + 1))
    assert too_long(tmp_path) == [f"lcgraph/runtime/long.py: {MAX_LINES + 1} lines (at most {MAX_LINES})"]
