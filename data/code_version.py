"""Code versions: the part of a stage's cache key that changes when the code computing the stage does."""

from __future__ import annotations

import ast
import functools
import importlib.util
from importlib import metadata
from pathlib import Path

from gptflow.data.hashing import hash_file, hash_json

PACKAGE = __name__.partition(".")[0]
OUTPUT_LIBRARIES = ("numpy", "pyarrow", "safetensors", "tokenizers", "torch")
"""Libraries whose version can change what a stage computes: in the code version of every stage
whose modules import them."""


def code_version(*module_names: str) -> str:
    """Hash of ``code_closure(*module_names)``: a cache key part that changes when the code that
    computes a stage does, or a library that shapes its output is upgraded."""
    return hash_json(code_closure(*module_names))


def code_closure(*module_names: str) -> dict[str, dict[str, str]]:
    """``modules``: the content hash of ``module_names`` and of every gptflow module they import,
    directly or through one another (imports inside functions too); ``libraries``: the versions
    of the ``OUTPUT_LIBRARIES`` any of those modules imports. A helper module added later, however
    deep, is in it without anyone listing it."""
    sources: dict[str, str] = {}
    libraries: set[str] = set()
    pending = list(module_names)
    while pending:
        name = pending.pop()
        if name in sources:
            continue
        path = module_file(name)
        sources[name] = hash_file(path)
        imported_modules, imported_libraries = _imports(path, path.stat().st_mtime_ns)
        pending.extend(imported_modules)
        libraries.update(imported_libraries)
    return {"modules": sources, "libraries": {name: _library_version(name) for name in sorted(libraries)}}


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


@functools.lru_cache(maxsize=None)
def _imports(path: Path, mtime_ns: int) -> tuple[tuple[str, ...], frozenset[str]]:
    """The gptflow modules and the ``OUTPUT_LIBRARIES`` a source file imports (cached per version of
    the file: ``mtime_ns`` is part of the key, so a flow's stages walk each file once)."""
    modules: list[str] = []
    libraries: set[str] = set()
    for imported in _imported_names(path):
        parts = imported.split(".")
        if parts[0] == PACKAGE:
            # `from gptflow.data.store import hash_json` names gptflow.data.store.hash_json: take the
            # prefixes that are modules (the package gptflow.data, the module gptflow.data.store).
            prefixes = (".".join(parts[:length]) for length in range(2, len(parts) + 1))
            modules.extend(prefix for prefix in prefixes if _find_module_file(prefix) is not None)
        elif parts[0] in OUTPUT_LIBRARIES:
            libraries.add(parts[0])
    return tuple(modules), frozenset(libraries)


@functools.cache
def _library_version(name: str) -> str:
    """The installed version of ``name``, read once: a process keeps running the version it imported."""
    return metadata.version(name)


def _imported_names(path: Path) -> tuple[str, ...]:
    """Every absolute name a source file imports, with ``from a import b`` as ``a.b``."""
    names = []
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
    return tuple(names)
