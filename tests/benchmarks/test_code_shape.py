"""The code keeps the shape issue 26 gave it: short functions with few parameters, and modules
that do not import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

from benchmarks.code_shape import MAX_LINES, MAX_PARAMETERS, PACKAGES, code_lines, shape

REPO = Path(__file__).resolve().parents[2]


def test_no_function_runs_past_60_lines_or_takes_more_than_8_parameters() -> None:
    """Every function and method of ddpm/, flows/ and settings/ has at most 60 lines of code
    (docstrings and comments aside) and at most 8 parameters (self aside)."""
    _, found = shape(REPO)
    long = [f"{f.path}:{f.line} {f.name} ({f.lines})" for f in found if f.lines > MAX_LINES]
    wide = [f"{f.path}:{f.line} {f.name} ({f.parameters})" for f in found
            if f.parameters > MAX_PARAMETERS]  # fmt: skip
    assert not long and not wide, (long, wide)


def test_code_lines_leave_out_docstrings_comments_and_blank_lines() -> None:
    """The measure counts code only: a function of one docstring, one comment, a blank line
    and two statements has 3 lines of code (its `def` and the two statements)."""
    source = 'def f(a, b):\n    """Doc.\n\n    More."""\n    # why\n\n    x = a\n    return x\n'
    assert sorted(code_lines(source)) == [1, 7, 8]


def _is_main_guard(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules a file imports anywhere (inside functions too, where the command
    line defers heavy imports), except under `if __name__ == "__main__":`, where a script
    starts."""
    found, todo = set(), [n for n in ast.parse(path.read_text()).body if not _is_main_guard(n)]
    while todo:
        node = todo.pop()
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        found |= {name for name in names if name in modules}
        todo.extend(ast.iter_child_nodes(node))
    return found


def test_no_module_imports_another_in_a_circle() -> None:
    """The imports between the project's modules form no cycle: flows/cli.py, which runs the
    flows, once was imported back by flows/train_flow.py and flows/sample_flow.py."""
    files = {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
        for package in PACKAGES
        for p in (REPO / package).rglob("*.py")
    }
    graph = {name: _imports(path, set(files)) - {name} for name, path in files.items()}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        assert name not in path, " -> ".join([*path[path.index(name) :], name])
        if name in done:
            return
        for other in graph[name]:
            visit(other, [*path, name])
        done.add(name)

    for name in graph:
        visit(name, [])
