"""Built-in fine-tuning data, extracted with ``ast`` from the built-in corpus (the interpreter's
standard library source), so ``gptflow finetune`` runs with no download.

- ``sft``: docstring → function. The prompt names a function and gives its docstring's summary;
  the response is the function's source with the docstring taken out.
- ``classification``: which top-level standard-library package a function comes from, over
  ``CLASSIFICATION_PACKAGES``, the same number of functions from each (so the majority baseline
  is 1 / number of packages).
- ``tagging``: functions of ``TAGGING_PACKAGES`` with spans of their Python tokens labelled by
  kind (``TAG_KINDS``), as Python's own ``tokenize`` module reads them: real labels, for free.

Functions are module-level functions and methods of module-level classes, taken in file order
and thinned deterministically by a hash of their location, so the data is the same on every run
of one interpreter. Test folders are left out, as in the built-in corpus.
"""

from __future__ import annotations

import ast
import io
import json
import keyword
import re
import textwrap
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gptflow.data.hashing import hash_json
from gptflow.data.sources import builtin_corpus_root

SFT_PACKAGES = ("asyncio", "collections", "concurrent", "email", "http", "importlib", "json", "logging",
                "unittest", "urllib", "xml")
CLASSIFICATION_PACKAGES = ("asyncio", "email", "logging", "unittest", "xml")
MAX_SFT_EXAMPLES = 2000
MAX_RESPONSE_CHARS = 800
"""Longer functions are left out of the sft demo: most of what remains fits 256 tokens."""
FUNCTIONS_PER_LABEL = 240
MAX_TEXT_CHARS = 1500
"""Classification texts longer than this are left out (the start of a function names it anyway)."""
EXCLUDED_FOLDERS = {"test", "tests", "idle_test", "__pycache__"}
TAGGING_PACKAGES = ("json", "logging", "email", "xml")
TAGGING_FUNCTIONS = 800
MAX_TAGGING_CHARS = 600
"""Tagged functions longer than this are left out: what remains fits a 256-token context."""
TAG_KINDS = ("comment", "keyword", "name", "number", "string")
"""The demo's span labels: names are identifiers (soft keywords such as ``match`` among them)."""


@dataclass(frozen=True)
class Function:
    package: str
    """Top-level package, e.g. ``email``."""
    module: str
    """Dotted module path, e.g. ``email.utils``."""
    name: str
    """``name`` or ``Class.name``."""
    location: str
    """``path:line``, relative to the standard library root."""
    source: str
    """Dedented source, decorators left out."""
    docstring: str | None
    body_without_docstring: str
    """``source`` without the docstring lines; empty when the docstring is the whole body."""


def write_demo(task: str, path: Path, root: Path | None = None) -> int:
    """Write the ``task`` demo (``sft`` or ``classification``) as JSONL to ``path``; returns the
    number of records. ``root`` defaults to the built-in corpus."""
    root = root or builtin_corpus_root()
    records = {"sft": sft_records, "classification": classification_records, "tagging": tagging_records}[task](root)
    with open(path, "w", encoding="utf-8") as out:
        out.writelines(json.dumps(record) + "\n" for record in records)
    return len(records)


def sft_records(root: Path, max_examples: int = MAX_SFT_EXAMPLES) -> list[dict[str, str]]:
    candidates = [
        function for package in SFT_PACKAGES for function in functions_of(root, package)
        if function.docstring and function.body_without_docstring and len(function.body_without_docstring) <= MAX_RESPONSE_CHARS
    ]
    chosen = _thinned(candidates, max_examples)
    return [
        {"prompt": f"Write the function `{function.name}` of Python's `{function.module}` module. "
                   f"Its docstring: {_summary(function.docstring)}",
         "response": function.body_without_docstring}
        for function in chosen
    ]


def classification_records(root: Path, per_label: int = FUNCTIONS_PER_LABEL) -> list[dict[str, str]]:
    by_package = {
        package: [function for function in functions_of(root, package) if len(function.source) <= MAX_TEXT_CHARS]
        for package in CLASSIFICATION_PACKAGES
    }
    count = min(per_label, *(len(functions) for functions in by_package.values()))
    records = [{"text": function.source, "label": package}
               for package, functions in by_package.items() for function in _thinned(functions, count)]
    # Interleaved by hash, so a file read in order (and every split) mixes the labels.
    return sorted(records, key=hash_json)


def tagging_records(root: Path, count: int = TAGGING_FUNCTIONS) -> list[dict[str, object]]:
    """Functions of ``TAGGING_PACKAGES`` (docstrings kept: they are strings to find) with their
    token spans, ``count`` of them chosen by hash of their location."""
    candidates = [function for package in TAGGING_PACKAGES for function in functions_of(root, package)
                  if len(function.source) <= MAX_TAGGING_CHARS]
    records = []
    for function in _thinned(candidates, count):
        try:
            records.append({"text": function.source, "spans": python_token_spans(function.source)})
        except (tokenize.TokenError, SyntaxError):
            continue  # dedenting left a continuation line the tokenizer cannot place
    return records


def python_token_spans(source: str) -> list[list[object]]:
    """``[start, end, kind]`` of each comment, keyword, name, number and string of ``source``
    (character offsets), as ``tokenize`` reads it; an f-string (a token sequence from Python 3.12)
    is one string span."""
    line_starts = [0]
    for line in source.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    spans: list[list[object]] = []
    fstring_depth, fstring_start = 0, 0
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        start = line_starts[token.start[0] - 1] + token.start[1]
        end = line_starts[token.end[0] - 1] + token.end[1]
        name = tokenize.tok_name[token.type]
        if name == "FSTRING_START":
            fstring_depth += 1
            fstring_start = start if fstring_depth == 1 else fstring_start
        elif name == "FSTRING_END":
            fstring_depth -= 1
            if not fstring_depth:
                spans.append([fstring_start, end, "string"])
        elif fstring_depth:
            continue
        elif token.type == tokenize.NAME:
            spans.append([start, end, "keyword" if keyword.iskeyword(token.string) else "name"])
        elif token.type in (tokenize.STRING, tokenize.NUMBER, tokenize.COMMENT):
            spans.append([start, end, tokenize.tok_name[token.type].lower()])
    return spans


def functions_of(root: Path, package: str) -> Iterator[Function]:
    """Module-level functions and methods of module-level classes of ``package``, in file order."""
    for path in sorted((root / package).rglob("*.py")):
        if EXCLUDED_FOLDERS & set(path.relative_to(root).parts):
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately broken or not UTF-8
        lines = source.splitlines()
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for node, owner in _functions(tree):
            yield _function(package, module, owner, node, lines, f"{path.relative_to(root)}:{node.lineno}")


def _functions(tree: ast.Module) -> Iterator[tuple[ast.FunctionDef | ast.AsyncFunctionDef, str | None]]:
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node, None
        elif isinstance(node, ast.ClassDef):
            for member in node.body:
                if isinstance(member, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield member, node.name


def _function(
    package: str, module: str, owner: str | None, node: ast.FunctionDef | ast.AsyncFunctionDef,
    lines: list[str], location: str,
) -> Function:
    own_lines = lines[node.lineno - 1 : node.end_lineno]  # from `def`, decorators left out
    docstring = ast.get_docstring(node)
    body = own_lines
    if docstring is not None:
        first = node.body[0]
        body = own_lines[: first.lineno - node.lineno] + own_lines[first.end_lineno - node.lineno + 1 :]
        if len(node.body) == 1:
            body = []
    return Function(
        package=package,
        module=module,
        name=f"{owner}.{node.name}" if owner else node.name,
        location=location,
        source=textwrap.dedent("\n".join(own_lines)),
        docstring=docstring,
        body_without_docstring=textwrap.dedent("\n".join(body)),
    )


def _summary(docstring: str) -> str:
    """The docstring's first paragraph on one line."""
    return re.sub(r"\s+", " ", docstring.strip().split("\n\n")[0])


def _thinned(functions: list[Function], count: int) -> list[Function]:
    """``count`` of ``functions``, chosen by a hash of their location, kept in file order."""
    if len(functions) <= count:
        return functions
    chosen = set(sorted(range(len(functions)), key=lambda index: hash_json(functions[index].location))[:count])
    return [function for index, function in enumerate(functions) if index in chosen]
