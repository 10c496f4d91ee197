"""Code versions: the part of a stage's cache key that changes when the code computing the stage does.

A stage's code version covers the modules that compute it and every gptflow module they import,
directly or through one another, found from the imports (never listed by hand), with two rules:

- Each module counts by its code, not its bytes: its syntax tree with docstrings, comments and
  formatting left out (``normalised_source``). Editing documentation reruns nothing.
- Code that only reports, tracks, launches, locks or moves bytes between machines is left out,
  and so is everything it imports: the packages in ``OUTSIDE_CODE_VERSIONS``. Editing MLflow
  logging, the outbox, progress lines, the CLI, torchrun launching, the artifact store's checks and
  fetches or the object-store mirror reruns nothing. Code that decides what bytes a stage writes belongs anywhere else.

The versions of the ``OUTPUT_LIBRARIES`` the covered modules import are part of it too.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from importlib import metadata
from pathlib import Path

from gptflow.data.hashing import hash_bytes, hash_json

PACKAGE = __name__.partition(".")[0]
OUTPUT_LIBRARIES = ("numpy", "pyarrow", "safetensors", "tokenizers", "torch")
"""Libraries whose version can change what a stage computes: in the code version of every stage
whose modules import them."""
OUTSIDE_CODE_VERSIONS = (
    f"{PACKAGE}.flows",           # the CLI, the flows' composition and their summaries
    f"{PACKAGE}.tasks.tracking",  # MLflow runs, the outbox, the registry, progress, training reports
    f"{PACKAGE}.tasks.runtime",   # the stage cache and its records, locks, torchrun, rendezvous, Ray
    f"{PACKAGE}.data.mirror",     # uploads to and downloads from a workspace's object store
    f"{PACKAGE}.data.store",      # checks, commits and fetches of store directories, as stages call them
)
"""The modules and packages no code version covers: what they do never changes a stage's output."""


def code_version(*module_names: str) -> str:
    """Hash of ``code_closure(*module_names)``: a cache key part that changes when the code that
    computes a stage does, or a library that shapes its output is upgraded."""
    return hash_json(code_closure(*module_names))


def code_closure(*module_names: str) -> dict[str, dict[str, str]]:
    """``modules``: the hash of the normalised source of ``module_names`` and of every gptflow
    module they import outside ``OUTSIDE_CODE_VERSIONS``, directly or through one another (imports
    inside functions too, not those only for type checking); ``libraries``: the versions of the
    ``OUTPUT_LIBRARIES`` any of those modules imports. A helper module added later, however deep,
    is in it without anyone listing it."""
    sources: dict[str, str] = {}
    libraries: set[str] = set()
    pending = list(module_names)
    while pending:
        name = pending.pop()
        if name in sources:
            continue
        path = module_file(name)
        code_hash, imported_modules, imported_libraries = _read_module(path, path.stat().st_mtime_ns)
        sources[name] = code_hash
        pending.extend(module for module in imported_modules if not is_outside_code_versions(module))
        libraries.update(imported_libraries)
    return {"modules": sources, "libraries": {name: _library_version(name) for name in sorted(libraries)}}


def is_outside_code_versions(module_name: str) -> bool:
    return any(module_name == outside or module_name.startswith(outside + ".") for outside in OUTSIDE_CODE_VERSIONS)


def normalised_source(tree: ast.Module) -> str:
    """The code of a parsed module without its docstrings (every statement that is only a string:
    module, class and function docstrings, and those documenting attributes), as ``ast.unparse``
    writes it: comments and formatting are gone too."""
    tree = _WithoutDocstrings().visit(tree)
    return ast.unparse(tree)


class _WithoutDocstrings(ast.NodeTransformer):
    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        for field in ("body", "orelse", "finalbody"):
            statements = getattr(node, field, None)
            if isinstance(statements, list) and statements and isinstance(statements[0], ast.stmt):
                kept = [statement for statement in statements if not _is_string_statement(statement)]
                setattr(node, field, kept or ([ast.Pass()] if field == "body" else []))
        return node


def _is_string_statement(statement: ast.stmt) -> bool:
    return (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
            and isinstance(statement.value.value, str))


def module_file(name: str) -> Path:
    """The source file of the gptflow module ``name``, found without running it."""
    path = _find_module_file(name)
    if path is None:
        raise ImportError(f"{name} is not a gptflow source module")
    return path


def _find_module_file(name: str) -> Path | None:
    """The source file of the gptflow module or package ``name``, found without running it (only
    the layers' empty ``__init__`` files are imported); None when ``name`` is not one."""
    parent, _, leaf = name.rpartition(".")
    if parent == PACKAGE:
        spec = importlib.util.find_spec(name)
        return Path(spec.origin) if spec is not None and spec.origin else None
    parent_file = _find_module_file(parent) if parent.startswith(PACKAGE + ".") else None
    if parent_file is None or parent_file.name != "__init__.py":
        return None  # the parent is a module: ``leaf`` is one of its attributes
    for candidate in (parent_file.parent / f"{leaf}.py", parent_file.parent / leaf / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@functools.cache
def _read_module(path: Path, mtime_ns: int) -> tuple[str, tuple[str, ...], frozenset[str]]:
    """The hash of a source file's normalised code, the gptflow modules it imports and the
    ``OUTPUT_LIBRARIES`` it imports (cached per version of the file: ``mtime_ns`` is part of the
    key, so a flow's stages read each file once)."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    modules: list[str] = []
    libraries: set[str] = set()
    for imported in _imported_names(tree):
        parts = imported.split(".")
        if parts[0] == PACKAGE:
            # `from gptflow.data.store import LOCAL_STORE` names gptflow.data.store.LOCAL_STORE: take
            # the prefixes that are modules (the package gptflow.data, the module gptflow.data.store).
            prefixes = (".".join(parts[:length]) for length in range(2, len(parts) + 1))
            modules.extend(prefix for prefix in prefixes if _find_module_file(prefix) is not None)
        elif parts[0] in OUTPUT_LIBRARIES:
            libraries.add(parts[0])
    return hash_bytes(normalised_source(tree).encode()), tuple(modules), frozenset(libraries)


@functools.cache
def _library_version(name: str) -> str:
    """The installed version of ``name``, read once: a process keeps running the version it imported."""
    return metadata.version(name)


def _imported_names(tree: ast.Module) -> list[str]:
    """Every absolute name a module imports, with ``from a import b`` as ``a.b``; imports under
    ``if TYPE_CHECKING:`` are left out, since they never run."""
    names = []
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
        pending.extend(ast.iter_child_nodes(node))
    return names


def _is_type_checking(test: ast.expr) -> bool:
    """``TYPE_CHECKING`` or ``typing.TYPE_CHECKING``."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
