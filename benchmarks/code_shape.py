"""The shape of the code: lines of code per package, and each function's length and parameters.

    python benchmarks/code_shape.py [--top 10] [ROOT]

A line of code is a line holding code: blank lines, comments and docstrings do not count. A
function's parameters are all it takes, `self` and `cls` aside. Issue 26 bounds them: no
function in ddpm/, flows/ or settings/ takes more than 8 parameters or runs past 60 lines.
"""

from __future__ import annotations

import argparse
import ast
import io
import tokenize
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("ddpm", "flows", "settings")
MAX_PARAMETERS = 8
MAX_LINES = 60


@dataclass(frozen=True)
class Function:
    """One function or method: where it is, its lines of code and its parameters."""

    path: str
    name: str
    line: int
    lines: int
    parameters: int


def code_lines(source: str) -> set[int]:
    """The numbers of the lines of `source` that hold code (not comments, docstrings, blanks)."""
    docstrings: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docstrings.update(range(value.lineno, value.end_lineno + 1))
    lines: set[int] = set()
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in skip and token.type != tokenize.ENDMARKER:
            lines.update(range(token.start[0], token.end[0] + 1))
    return lines - docstrings


def functions(path: Path, root: Path) -> list[Function]:
    """Every function and method defined in the file at path."""
    source = path.read_text()
    code = code_lines(source)
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
            names += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
            count = len([n for n in names if n not in ("self", "cls")])
            span = range(node.lineno, node.end_lineno + 1)
            lines = len(code.intersection(span))
            where = str(path.relative_to(root))
            found.append(Function(where, node.name, node.lineno, lines, count))
    return found


def package_lines(root: Path, package: str) -> int:
    """Lines of code in a package's Python files."""
    return sum(len(code_lines(p.read_text())) for p in sorted((root / package).rglob("*.py")))


def shape(root: Path) -> tuple[dict[str, int], list[Function]]:
    """Lines of code per package, and every function of the packages."""
    lines = {package: package_lines(root, package) for package in PACKAGES}
    found = [f for package in PACKAGES for p in sorted((root / package).rglob("*.py"))
             for f in functions(p, root)]  # fmt: skip
    return lines, found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", default=".", type=Path)
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args(argv)
    lines, found = shape(args.root)
    print("lines of code:", ", ".join(f"{k} {v}" for k, v in lines.items()))
    for key, label in (("lines", "longest"), ("parameters", "most parameters")):
        print(f"{label}:")
        for f in sorted(found, key=lambda f: -getattr(f, key))[: args.top]:
            print(f"  {getattr(f, key):4d}  {f.path}:{f.line} {f.name}")


if __name__ == "__main__":
    main()
