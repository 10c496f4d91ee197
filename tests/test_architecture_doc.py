"""docs/ARCHITECTURE.md stays a short map whose every named module, path and symbol exists.

The checker reads the code with ``ast`` and never imports it, so this runs in a moment without
torch, Prefect or MLflow.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "ARCHITECTURE.md"
MAX_LINES = 300
MAX_PARAGRAPH_LINES = 15

LAYERS = ("flows", "tasks", "model", "data")
REPO_FOLDERS = (*LAYERS, "tests", "bench", "examples", "docs")
"""A backticked name starting ``<one of these>/`` is a path in the repository."""
SETTING_SECTIONS = {"data": ("data/config.py", "IngestConfig"), "model": ("model/config.py", "ModelConfig")}
"""Settings sections named like a layer: ``data.segment_chars`` is a field of ``IngestConfig``,
not a module of ``data/``."""

FILE_SUFFIXES = {"arrow", "csv", "json", "jsonl", "md", "parquet", "png", "pt", "py", "safetensors", "toml", "txt",
                 "yaml"}
"""A dotted name ending in one of these is a file's name (``model.safetensors``), not a symbol."""

INLINE_CODE = re.compile(r"`([^`]+)`")
PATH = re.compile(rf"^(?:{'|'.join(REPO_FOLDERS)})/[\w./*-]*$")
DOTTED = re.compile(rf"^(?:gptflow\.)?(?:{'|'.join(LAYERS)})(?:\.\w+)+(?:\(.*\))?$")
LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+\.)\s")
SECTION_REFERENCE = re.compile(r'docs/ARCHITECTURE\.md, "([^"]+)"')


@dataclass(frozen=True)
class Stale:
    name: str
    line: int
    problem: str

    def __str__(self) -> str:
        return f"docs/ARCHITECTURE.md:{self.line}: `{self.name}` {self.problem}"


def prose_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, line)`` of the lines outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append((number, line))
    return lines


def named_references(text: str) -> list[tuple[int, str]]:
    """``(line, name)`` of each backticked name outside code blocks that looks like a repository path
    or a dotted gptflow name. Code spans may run over a line end, as in markdown."""
    kept = dict(prose_lines(text))
    prose = "\n".join(kept.get(number, "") for number in range(1, len(text.splitlines()) + 1))
    found = []
    for match in INLINE_CODE.finditer(prose):
        name = " ".join(match.group(1).split())
        is_file_name = DOTTED.match(name) and name.rpartition(".")[2] in FILE_SUFFIXES
        if PATH.match(name) or (DOTTED.match(name) and not is_file_name):
            found.append((prose.count("\n", 0, match.start()) + 1, name))
    return found


def stale_references(text: str, repo: Path = REPO) -> list[Stale]:
    """Every backticked path or dotted name in ``text`` that does not exist in ``repo``."""
    stale = []
    for number, name in named_references(text):
        problem = _path_problem(name, repo) if PATH.match(name) else _symbol_problem(name, repo)
        if problem:
            stale.append(Stale(name, number, problem))
    return stale


def _path_problem(name: str, repo: Path) -> str | None:
    if any(character in name for character in "*?["):
        return None if any(repo.glob(name)) else "matches no file of the repository"
    path = repo / name.rstrip("/")
    if not path.exists():
        return "is no file or folder of the repository"
    if name.endswith("/") and not path.is_dir():
        return "is a file, not a folder"
    return None


def _symbol_problem(name: str, repo: Path) -> str | None:
    parts = re.sub(r"\(.*\)$", "", name).removeprefix("gptflow.").split(".")
    module_file, depth = None, 0
    for length in range(1, len(parts) + 1):
        base = repo.joinpath(*parts[:length])
        if base.with_suffix(".py").is_file():
            module_file, depth = base.with_suffix(".py"), length
            break  # a module: what follows are its attributes
        if base.is_dir():
            module_file, depth = base / "__init__.py", length
        else:
            break
    rest = parts[depth:]
    if not rest:
        return None
    if depth == 1 and parts[0] in SETTING_SECTIONS:
        setting_file, config_class = SETTING_SECTIONS[parts[0]]
        if len(rest) == 1 and rest[0] in _class_members(repo / setting_file).get(config_class, set()):
            return None
        return (f"is neither a module of {parts[0]}/ nor a setting of {config_class} "
                f"({parts[0]}/{rest[0]}.py does not exist)")
    if module_file is None or not module_file.is_file() or module_file.name == "__init__.py":
        folder = "/".join(parts[:depth])
        return f"names no module: {folder}/{rest[0]}.py does not exist"
    module = ".".join(parts[:depth])
    definitions = _top_level_names(module_file)
    members = _class_members(module_file)
    if rest[0] not in definitions:
        return f"is not defined in {module} ({module_file.relative_to(repo)}): moved, renamed or removed?"
    if len(rest) == 1:
        return None
    if len(rest) == 2 and rest[1] in members.get(rest[0], set()):
        return None
    return f"is not defined in {module}: {rest[0]} has no {'.'.join(rest[1:])}"


@functools.cache
def _parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _top_level_statements(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements of a body, with those of its top-level ``if`` / ``try`` blocks."""
    statements = []
    for statement in body:
        statements.append(statement)
        if isinstance(statement, ast.If):
            statements += _top_level_statements(statement.body + statement.orelse)
        elif isinstance(statement, ast.Try):
            statements += _top_level_statements(
                statement.body + statement.orelse + statement.finalbody
                + [node for handler in statement.handlers for node in handler.body])
    return statements


def _defined_names(body: list[ast.stmt]) -> set[str]:
    """Classes, functions and assigned names a body defines (not what it imports)."""
    names = set()
    for statement in _top_level_statements(body):
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(statement.name)
        elif isinstance(statement, ast.Assign):
            names.update(node.id for target in statement.targets for node in ast.walk(target)
                         if isinstance(node, ast.Name))
        elif isinstance(statement, (ast.AnnAssign, ast.AugAssign)) and isinstance(statement.target, ast.Name):
            names.add(statement.target.id)
    return names


def _top_level_names(path: Path) -> set[str]:
    return _defined_names(_parsed(path).body)


def _class_members(path: Path) -> dict[str, set[str]]:
    """Each top-level class's methods and attributes (class-level, and ``self.x = ...`` in its methods)."""
    members = {}
    for statement in _top_level_statements(_parsed(path).body):
        if isinstance(statement, ast.ClassDef):
            names = _defined_names(statement.body)
            for node in ast.walk(statement):
                if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                        and isinstance(node.value, ast.Name) and node.value.id == "self"):
                    names.add(node.attr)
            members[statement.name] = names
    return members


def long_paragraphs(text: str, limit: int = MAX_PARAGRAPH_LINES) -> list[tuple[int, int]]:
    """``(first line, line count)`` of each paragraph or list item of prose longer than ``limit``
    lines; code blocks and tables are not prose."""
    found, start, count = [], None, 0

    def close() -> None:
        if start is not None and count > limit:
            found.append((start, count))

    for number, line in prose_lines(text) + [(0, "")]:
        prose = bool(line.strip()) and not line.lstrip().startswith(("|", "#"))
        if not prose or LIST_ITEM.match(line):
            close()
            start, count = (number, 1) if prose else (None, 0)
        elif start is None:
            start, count = number, 1
        else:
            count += 1
    return found


def headings(text: str) -> set[str]:
    return {line.lstrip("#").strip() for _, line in prose_lines(text) if line.startswith("#")}


def local_links(text: str) -> list[str]:
    """Targets of relative markdown links: ``[text](target)`` not naming a URL or an anchor."""
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [target.split("#")[0] for target in targets if not re.match(r"^[a-z]+:|^#", target)]


# The document.


def test_every_named_module_path_and_symbol_exists():
    stale = stale_references(DOC.read_text())
    assert not stale, "docs/ARCHITECTURE.md names what the code no longer has:\n" + "\n".join(map(str, stale))


def test_the_document_names_code_at_all():
    """A check that finds nothing to check would pass on any text."""
    names = {name for _, name in named_references(DOC.read_text())}
    assert {"data/store.py", "tasks.runtime.caching.run_stage", "data.code_version.OUTSIDE_CODE_VERSIONS"} <= names


def test_the_document_is_a_short_map():
    lines = DOC.read_text().splitlines()
    assert len(lines) <= MAX_LINES, f"docs/ARCHITECTURE.md has {len(lines)} lines, more than {MAX_LINES}: " \
                                    "move the detail into the docstring of the module that implements it"
    long = long_paragraphs(DOC.read_text())
    assert not long, "paragraphs longer than {} lines (first line, lines): {}; split them, or move the detail into " \
                     "a module docstring".format(MAX_PARAGRAPH_LINES, long)


def test_links_stay_inside_the_repository():
    for target in local_links(DOC.read_text()):
        path = (DOC.parent / target).resolve()
        assert path.is_relative_to(REPO), f"docs/ARCHITECTURE.md links {target}, outside the repository"
        assert path.exists(), f"docs/ARCHITECTURE.md links {target}, which does not exist"
    assert "../shared" not in DOC.read_text()


def test_sections_the_code_refers_to_exist():
    """Docstrings that send a reader to a section of the document name one it has."""
    titles = headings(DOC.read_text())
    missing = []
    for layer in LAYERS:
        for path in sorted((REPO / layer).rglob("*.py")):
            for title in SECTION_REFERENCE.findall(path.read_text()):
                if title not in titles:
                    missing.append(f"{path.relative_to(REPO)}: \"{title}\"")
    assert not missing, "docstrings refer to sections docs/ARCHITECTURE.md lacks: " + ", ".join(missing)


# The checker itself.


SAMPLE = """# Sample

Kept: `data/store.py`, `tasks/stages/`, `data.store.ArtifactStore`, `data.store.ArtifactStore.commit`,
`gptflow.data.store`, `tasks.runtime.caching.run_stage`, `model.train`, `model.train.train(objective)`,
`data.segment_chars`, `model.block_size`, `tasks.runtime.workspace.Workspace.url`, `train.nproc`,
`store/raw/<key>/`, `--set data.text_field=body`, `model.safetensors`, `gptflow pretrain --nnodes 2
--rdzv-endpoint node0:29500`, `data/shards.py`.
Stale: `data/no_such_module.py`, `tasks/no_such_folder/`, `data.store.code_version`,
`data.store.ArtifactStore.no_such_method`, `tasks.runtime.no_such_module.run_stage`,
`data.not_a_setting`, `model.nosuchmodule.x`, `data/store.py/`, `tasks.no_such_package`.

```
data/not_checked_in_code_blocks.py
```
"""


@pytest.mark.parametrize("name", [
    "data/no_such_module.py", "tasks/no_such_folder/", "data.store.code_version",
    "data.store.ArtifactStore.no_such_method", "tasks.runtime.no_such_module.run_stage", "data.not_a_setting",
    "model.nosuchmodule.x", "data/store.py/", "tasks.no_such_package",
])
def test_the_checker_catches_a_wrong_name(name):
    stale = {reference.name: reference for reference in stale_references(SAMPLE)}
    assert name in stale
    assert f"`{name}`" in str(stale[name]) and "docs/ARCHITECTURE.md:" in str(stale[name])


def test_the_checker_passes_names_that_exist_and_ignores_what_is_not_code():
    stale = {reference.name for reference in stale_references(SAMPLE)}
    assert stale == {"data/no_such_module.py", "tasks/no_such_folder/", "data.store.code_version",
                     "data.store.ArtifactStore.no_such_method", "tasks.runtime.no_such_module.run_stage",
                     "data.not_a_setting", "model.nosuchmodule.x", "data/store.py/", "tasks.no_such_package"}
    names = {name for _, name in named_references(SAMPLE)}
    assert "store/raw/<key>/" not in names and "train.nproc" not in names and "model.safetensors" not in names
    assert "data/not_checked_in_code_blocks.py" not in names
    assert "data/shards.py" in names  # found after a code span that runs over a line end


def test_the_checker_says_where_a_moved_symbol_is_missing():
    [stale] = stale_references("See `data.store.code_version`.")
    assert stale.line == 1
    assert "not defined in data.store (data/store.py)" in stale.problem


def test_long_paragraphs_are_found_but_not_code_blocks_or_tables():
    paragraph = "\n".join(["words"] * (MAX_PARAGRAPH_LINES + 1))
    code = "```\n" + "\n".join(["code"] * 40) + "\n```"
    table = "\n".join(["| a | b |"] * 40)
    items = "\n".join(f"- item {index}\n  more" for index in range(20))
    assert long_paragraphs(f"# T\n\n{paragraph}\n") == [(3, MAX_PARAGRAPH_LINES + 1)]
    assert long_paragraphs(f"# T\n\n{code}\n\n{table}\n\n{items}\n") == []
