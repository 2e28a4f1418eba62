"""The package's functions stay short enough to read: at most 50 lines of body each.

A function's body is counted from its first statement after the docstring to its
last line, blank and comment lines included; a long function is split into named
parts, as the fitting engine's are.
"""

from __future__ import annotations

import ast
from pathlib import Path

import geoconnect

MAX_BODY_LINES = 50


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body
    if (
        len(body) > 1
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        body = body[1:]  # the docstring is not code
    return node.end_lineno - body[0].lineno + 1  # type: ignore[operator]


def test_no_function_in_the_package_has_a_body_over_50_lines():
    package = Path(geoconnect.__file__).parent
    long = []
    for file in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = _body_lines(node)
                if lines > MAX_BODY_LINES:
                    long.append(f"{file.relative_to(package)}:{node.lineno} {node.name} ({lines})")
    assert not long, "functions over 50 lines of body: " + ", ".join(long)


def test_the_count_starts_after_the_docstring():
    tree = ast.parse('def f():\n    """Doc.\n\n    More.\n    """\n    x = 1\n\n    return x\n')
    assert _body_lines(tree.body[0]) == 3
