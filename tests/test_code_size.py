"""No source file of the four layers is over 450 lines and no function over 100: a newcomer can
hold each in mind. A failure lists the largest, so the next split is plain."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("flows", "tasks", "model", "data")
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 100


def _sources() -> list[Path]:
    return sorted(path for layer in LAYERS for path in (ROOT / layer).rglob("*.py"))


def _function_lengths(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    return [(node.end_lineno - node.lineno + 1, f"{path.relative_to(root)}:{node.lineno} {node.name}")
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_source_file_is_over_450_lines():
    sizes = sorted(((len(path.read_text().splitlines()), str(path.relative_to(ROOT))) for path in _sources()),
                   reverse=True)
    assert sizes, "no source files found"
    too_long = [f"{name}: {lines} lines" for lines, name in sizes if lines > MAX_FILE_LINES]
    largest = ", ".join(f"{name} ({lines})" for lines, name in sizes[:5])
    assert not too_long, f"over {MAX_FILE_LINES} lines: {too_long}; the largest: {largest}"


def test_no_function_is_over_100_lines():
    lengths = sorted((length for path in _sources() for length in _function_lengths(path)), reverse=True)
    too_long = [f"{name}: {lines} lines" for lines, name in lengths if lines > MAX_FUNCTION_LINES]
    largest = ", ".join(f"{name} ({lines})" for lines, name in lengths[:5])
    assert not too_long, f"over {MAX_FUNCTION_LINES} lines: {too_long}; the largest: {largest}"


@pytest.mark.parametrize("source, expected", [
    ("def f():\n    return 1\n", [(2, "module.py:1 f")]),
    ("class C:\n    def m(self):\n        pass\n\n        return None\n", [(4, "module.py:2 m")]),
])
def test_a_function_counts_every_line_from_its_def_to_its_last(tmp_path, source, expected):
    (tmp_path / "module.py").write_text(source)
    assert _function_lengths(tmp_path / "module.py", tmp_path) == expected
