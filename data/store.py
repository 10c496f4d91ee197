"""Content-addressed artifact store: hashing, atomic directory commits, verified reuse.

Every stage writes its outputs into a directory named by a key (a hash of everything that
determines the content). A directory is written under a temporary name and renamed into place
only once complete, with a ``contents.json`` listing every file's size and hash; a directory is
reused only when it is present under its final name and every listed file still matches. A
process killed mid-write therefore leaves only a ``.tmp-*`` directory, which nothing reads.
Consumers that read every byte re-hash first (``verify_contents``) and discard what fails.
A write that runs out of space leaves nothing behind either, and is raised as one
``OutOfSpaceError`` naming what was written and the space left.
"""

from __future__ import annotations

import ast
import atexit
import contextlib
import dataclasses
import errno
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO

from gptflow.data.errors import UserError
from gptflow.data.object_sources import object_store_filesystem

CONTENTS_FILE = "contents.json"
REPORT_FILE = "report.json"
HASH_CHUNK_BYTES = 1 << 20
STALE_TMP_SECONDS = 24 * 3600


def hash_bytes(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def hash_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hash_stream(f)


def hash_stream(stream: BinaryIO) -> str:
    """The hash of what is left to read of ``stream``: ``hash_file``'s of the same bytes."""
    digest = hashlib.blake2b(digest_size=16)
    while chunk := stream.read(HASH_CHUNK_BYTES):
        digest.update(chunk)
    return digest.hexdigest()


def hash_json(value: Any) -> str:
    """Hash of a JSON-serialisable value, independent of dict ordering."""
    return hash_bytes(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode())


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


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON so that readers see either the old file or the complete new one."""
    with _atomic_file(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str))


def write_report(directory: Path, report: Any) -> None:
    """A stage's report (a dataclass) as ``report.json`` in the folder it describes, its
    ``directory`` field left out: the file lies there, and it names no path of the workspace."""
    value = {name: item for name, item in dataclasses.asdict(report).items() if name != "directory"}
    (directory / REPORT_FILE).write_text(json.dumps(value, indent=2))


STORE_REFERENCE = "@store/"
"""How a path inside the store is written in anything the store keeps (manifests, cache records,
lineages): ``@store/<path relative to the store>``, so that a copied or moved workspace reads its
own artifacts, never the folder it was copied from."""


def store_references(value: Any, store: Path) -> Any:
    """``value`` (JSON data) with every string that is a path inside ``store`` written as a store
    reference; the inverse of ``store_paths``."""
    root = str(store)
    if isinstance(value, str):
        inside = value.startswith(root + os.sep) or value == root
        return STORE_REFERENCE + value[len(root) + 1:] if inside else value
    if isinstance(value, list):
        return [store_references(item, store) for item in value]
    if isinstance(value, dict):
        return {key: store_references(item, store) for key, item in value.items()}
    return value


def store_paths(value: Any, store: Path) -> Any:
    """``value`` (JSON data) with every store reference made a path inside ``store``."""
    if isinstance(value, str):
        return str(store / value.removeprefix(STORE_REFERENCE)) if value.startswith(STORE_REFERENCE) else value
    if isinstance(value, list):
        return [store_paths(item, store) for item in value]
    if isinstance(value, dict):
        return {key: store_paths(item, store) for key, item in value.items()}
    return value


def share_file(path: Path) -> None:
    """Publish the file ``path`` that other runs read (a manifest, a lineage, a cache record) when
    its workspace is mirrored on an object store; else it is where they read it already."""
    mirror = Mirror.of(path)
    if mirror is not None:
        mirror.publish_file(path)


def pull_shared_file(path: Path) -> bool:
    """Whether the shared file ``path`` exists, made the object store's copy first when its
    workspace is mirrored there."""
    mirror = Mirror.of(path)
    return mirror.pull_file(path) if mirror is not None else Path(path).exists()


def read_manifest(manifest_type: Any, path: Path | str) -> Any:
    """The ``manifest_type`` (a class with ``from_dict``) written at ``path`` in the store's
    ``manifests/`` folder, its store references made paths in that store."""
    pull_shared_file(Path(path))
    return manifest_type.from_dict(store_paths(json.loads(Path(path).read_text()), Path(path).parent.parent))


def copy_file_atomic(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` so that readers see either the old file or the complete new one."""
    with _atomic_file(Path(target)) as tmp:
        shutil.copyfile(source, tmp)


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary name beside ``path`` to write; it replaces ``path`` in one rename, or is
    removed when the write fails: running out of space keeps none of the partial bytes, and raises
    ``OutOfSpaceError`` naming ``path`` (an ``atomic_directory`` around it names its directory)."""
    with reporting_out_of_space(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex}")
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def _describe_files(directory: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != CONTENTS_FILE:
            stat = path.stat()
            files[path.relative_to(directory).as_posix()] = {
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "hash": hash_file(path),
            }
    return files


def is_complete(directory: Path) -> bool:
    """True when ``directory`` was committed and no listed file was deleted or altered since; in a
    mirrored workspace, when the object store holds its commit, and this machine's copy matches it
    (fetched first when missing or stale).

    Size and mtime are the fast path; a file whose mtime moved is re-hashed, so touching a file
    does not invalidate it but changing its bytes does. Bytes changed behind a restored mtime pass;
    ``verify_contents`` catches them where a consumer reads the files whole.
    """
    mirror = Mirror.of(directory)
    if mirror is not None:
        return mirror.holds(directory)
    return _matches_listing(directory, _read_listing(directory))


CHECKS_AT_ONCE = 16
"""Directories ``are_complete`` checks at once: on an object store each check waits on requests."""


def are_complete(directories: Iterable[Path]) -> list[bool]:
    """``is_complete`` of each directory, checked side by side."""
    with ThreadPoolExecutor(CHECKS_AT_ONCE, thread_name_prefix="gptflow-check") as pool:
        return list(pool.map(is_complete, directories))


def _read_listing(directory: Path) -> dict[str, dict[str, Any]] | None:
    try:
        return json.loads((directory / CONTENTS_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return None


def _matches_listing(directory: Path, listed: dict[str, dict[str, Any]] | None) -> bool:
    if listed is None:
        return False
    for name, expected in listed.items():
        path = directory / name
        try:
            stat = path.stat()
        except OSError:
            return False
        if stat.st_size != expected["size"]:
            return False
        if stat.st_mtime_ns != expected["mtime_ns"] and hash_file(path) != expected["hash"]:
            return False
    return True


class CorruptArtifactError(UserError):
    """A file of a committed store directory whose bytes are not the ones written there. The
    directory's record is discarded on detection, so the next run recomputes it."""


def verify_contents(directory: Path, names: Iterable[str] | None = None) -> None:
    """Re-hash the files ``contents.json`` lists (only ``names`` when given), whatever their mtime.

    ``is_complete`` trusts a file whose size and mtime are unchanged; a consumer that reads every
    byte anyway (training, loading weights) calls this first, since hashing costs little beside it.
    A missing, unlisted or altered file discards the directory (``discard_contents``) and raises
    ``CorruptArtifactError`` naming the file.
    """
    directory = Path(directory)
    if not (directory / CONTENTS_FILE).exists() and Mirror.of(directory) is not None:
        is_complete(directory)  # fetches the object store's copy: this machine has none yet
    try:
        listed = json.loads((directory / CONTENTS_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError):
        raise CorruptArtifactError(
            f"{directory} is not a complete store directory (no readable {CONTENTS_FILE}): it was altered or "
            "discarded after it was written; the next run recomputes it."
        ) from None
    for name in listed if names is None else names:
        path = directory / name
        expected = listed.get(name)
        if expected is None:
            problem = f"is not listed in {directory / CONTENTS_FILE}"
        elif not path.is_file():
            problem = "is missing"
        elif path.stat().st_size != expected["size"] or hash_file(path) != expected["hash"]:
            problem = f"does not hold the bytes written there (content hash {expected['hash']} expected)"
        else:
            continue
        raise corrupt_artifact(path, problem)


def verify_files(paths: Iterable[Path]) -> None:
    """``verify_contents`` of each file in ``paths``, each against the directory holding it."""
    by_directory: dict[Path, list[str]] = {}
    for path in map(Path, paths):
        by_directory.setdefault(path.parent, []).append(path.name)
    for directory, names in by_directory.items():
        verify_contents(directory, names)


def corrupt_artifact(path: Path, problem: str) -> CorruptArtifactError:
    """Discard the store directory holding ``path`` and return the error to raise for it."""
    discard_contents(Path(path).parent)
    return CorruptArtifactError(
        f"{path} {problem}: the artifact was altered after it was written. Its directory is no longer "
        "trusted; the next run recomputes it."
    )


def discard_contents(directory: Path) -> None:
    """Make ``is_complete(directory)`` false for good, so the stage that wrote it recomputes it. The
    files stay (a reader may hold them open) until a new commit of the same key replaces them."""
    with contextlib.suppress(FileNotFoundError):
        (Path(directory) / CONTENTS_FILE).unlink()


def list_folder(folder: Path) -> list[str]:
    """The names in ``folder``, sorted; in a mirrored workspace, with those only the object store
    holds (another machine's checkpoints, say)."""
    names = set(os.listdir(folder)) if Path(folder).is_dir() else set()
    mirror = Mirror.of(folder)
    if mirror is not None:
        names |= mirror.names_in(Path(folder))
    return sorted(names)


def remove_directory(directory: Path) -> None:
    """Delete a store directory here and, in a mirrored workspace, from the object store (its commit
    object first, so no machine trusts what remains while the rest goes)."""
    mirror = Mirror.of(directory)
    if mirror is not None:
        mirror.remove_directory(Path(directory))
    shutil.rmtree(directory, ignore_errors=True)


def read_contents_hash(directory: Path) -> str:
    """One hash standing for every file of a committed directory (for downstream cache keys)."""
    listed = json.loads((directory / CONTENTS_FILE).read_text())["files"]
    return hash_json({name: entry["hash"] for name, entry in listed.items()})


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it becomes ``final`` in one rename.

    If ``final`` already exists as a complete directory (a concurrent run committed the same key
    first), the new copy is discarded: keys are content addresses, so both are equivalent. An
    incomplete ``final`` (deleted or altered files) is replaced. A write that runs out of space
    removes the temporary directory and raises ``OutOfSpaceError`` naming ``final``.
    """
    # Outermost, so that the free space reported is counted once the partial bytes are gone.
    with reporting_out_of_space(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex}"
        try:
            tmp.mkdir()
            yield tmp
            write_json_atomic(tmp / CONTENTS_FILE, {"files": _describe_files(tmp)})
            _commit(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    mirror = Mirror.of(final)
    if mirror is not None:
        _PUBLISHING.submit(mirror, final)


def _commit(tmp: Path, final: Path) -> None:
    if final.exists():
        if _matches_listing(final, _read_listing(final)):
            return
        # Move the broken copy aside first so the rename below cannot hit a non-empty target.
        graveyard = final.parent / f".tmp-broken-{final.name}-{uuid.uuid4().hex}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(final, graveyard)
            shutil.rmtree(graveyard, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        # Lost a race with a concurrent commit of the same key after our existence check.
        if not _matches_listing(final, _read_listing(final)):
            raise


def remove_stale_temporaries(directory: Path, older_than_s: float = STALE_TMP_SECONDS) -> int:
    """Delete ``.tmp-*`` leftovers of killed runs; recent ones may belong to a live run."""
    if not directory.exists():
        return 0
    removed = 0
    cutoff = time.time() - older_than_s
    for path in directory.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < cutoff:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink()
                removed += 1
    return removed


OUT_OF_SPACE_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "a file reached the file size limit (ulimit -f) or the largest file the filesystem holds",
}
"""The errnos of a write that ran out of space, and what each means to a user."""
# How errors that are not OSError carry one: Rust's io::Error (safetensors, tokenizers) ends its
# message in "(os error 28)"; SQLite (the MLflow store) reports SQLITE_FULL in these words.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_SQLITE_FULL = "database or disk is full"


class OutOfSpaceError(OSError):
    """A write that ran out of space (disk full, quota used up, file size limit), in one message:
    what was being written, the space left on that filesystem and what to do."""

    def __init__(self, message: str, code: int = errno.ENOSPC) -> None:
        super().__init__(message)
        self.errno = code


def out_of_space_errno(error: BaseException | None) -> int | None:
    """ENOSPC, EDQUOT or EFBIG when ``error``, or an error it was raised from or while handling, is
    a write that ran out of space; else None."""
    for link in exception_chain(error):
        if isinstance(link, OSError):
            if link.errno in OUT_OF_SPACE_REASONS:
                return link.errno
            continue
        text = str(link)
        match = _RUST_OS_ERROR.search(text)
        if match and int(match[1]) in OUT_OF_SPACE_REASONS:
            return int(match[1])
        if _SQLITE_FULL in text:
            return errno.ENOSPC
    return None


def failed_write_path(error: BaseException) -> str | None:
    """The file that the first ``OSError`` in ``error``'s chain names, if any: the target of a copy
    or rename (``filename2``), else its one file."""
    for link in exception_chain(error):
        if isinstance(link, OSError) and (link.filename2 or link.filename) is not None:
            return str(link.filename2 or link.filename)
    return None


def exception_chain(error: BaseException | None) -> Iterator[BaseException]:
    """``error``, the error it was raised from or while handling, and so on."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def out_of_space_error(error: BaseException, path: Path | str) -> OutOfSpaceError | None:
    """The ``OutOfSpaceError`` to raise for ``error`` when it is a write of ``path`` that ran out of
    space, else None."""
    code = out_of_space_errno(error)
    if code is None:
        return None
    filesystem = mount_point(Path(path))
    free = shutil.disk_usage(filesystem).free
    fix = ("Raise the file size limit or point --workspace / GPTFLOW_HOME at another filesystem"
           if code == errno.EFBIG else f"Free space on {filesystem} or point --workspace / GPTFLOW_HOME elsewhere")
    return OutOfSpaceError(
        f"out of space writing {path}: {OUT_OF_SPACE_REASONS[code]} ({human_bytes(free)} free on the filesystem at "
        f"{filesystem}). {fix}, then rerun the same command: completed stages are reused.",
        code,
    )


@contextlib.contextmanager
def reporting_out_of_space(path: Path | str) -> Iterator[None]:
    """Re-raise a write inside the block that runs out of space as an ``OutOfSpaceError`` naming
    ``path`` (what the block writes, rather than a temporary file inside it)."""
    try:
        yield
    except Exception as error:
        out_of_space = out_of_space_error(error, path)
        if out_of_space is None:
            raise
        raise out_of_space from error


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem that holds ``path`` (or would, once created)."""
    path = Path(os.path.realpath(path))
    while not os.path.ismount(path):
        path = path.parent
    return path


def human_bytes(count: float) -> str:
    """``1.5 GiB``, ``12 KiB``, ``800 B``."""
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    while count >= 1024 and len(units) > 1:
        count /= 1024
        units.pop(0)
    return f"{count:.0f} {units[0]}" if units[0] == "B" or count >= 100 else f"{count:.1f} {units[0]}"


MIRROR_FILE = "mirror.json"
"""In the root of a workspace's local folder that mirrors an object store (``--workspace
s3://...``): ``{"url": ...}``, the workspace's URL. Whatever lies under such a folder is mirrored."""


class ObjectStoreError(UserError):
    """The object store of a workspace cannot be used; the message names the URL and the fix."""


@dataclasses.dataclass(frozen=True)
class Mirror:
    """A local folder that caches a workspace on an object store (any fsspec URL: ``s3://``
    through s3fs, ``gs://`` through gcsfs).

    The object store is the truth; the folder is this machine's copy of what it has read or
    written. Object stores have no rename, so a directory is published as its data objects first
    and its ``contents.json`` last: that object is the directory's commit, and only a committed
    directory whose objects have the sizes it lists is trusted. A copy is fetched into a temporary
    folder, each file checked against the commit's hash, then renamed into place with the
    commit's mtimes (so the local fast path of ``is_complete`` holds on every machine).
    """

    local_root: Path
    url: str

    @classmethod
    def attach(cls, local_root: Path, url: str) -> Mirror:
        """Make ``local_root`` the local copy of the workspace at ``url``."""
        local_root.mkdir(parents=True, exist_ok=True)
        marker = local_root / MIRROR_FILE
        if not marker.exists():
            write_json_atomic(marker, {"url": url})
        return cls(local_root, url)

    @classmethod
    def of(cls, path: Path | str) -> Mirror | None:
        """The mirror whose local folder holds ``path``, if any."""
        for folder in Path(path).parents:
            marker = folder / MIRROR_FILE
            if marker.exists():
                return _mirror_at(str(folder), marker.stat().st_mtime_ns)
        return None

    @property
    def fs(self) -> Any:
        return object_store_filesystem(self.url)[0]

    def remote(self, path: Path) -> str:
        """The object name of the local ``path``."""
        root = object_store_filesystem(self.url)[1].rstrip("/")
        return f"{root}/{Path(path).relative_to(self.local_root).as_posix()}"

    def holds(self, directory: Path) -> bool:
        """Whether the object store holds ``directory`` committed and whole, with a local copy
        that matches it (fetched here when missing or stale)."""
        committed = self._committed_listing(directory)
        if committed is None:
            if not _matches_listing(directory, _read_listing(directory)):
                return False
            # Committed here, and its upload cut short (the process was killed) or still under way:
            # the copy is whole, so it is published now rather than computed again.
            self.publish_directory(directory)
            return True
        if _read_listing(directory) == committed and _matches_listing(directory, committed):
            # One request per check: an object lost under its commit is found by the next machine
            # that fetches the directory, which then computes and publishes it again.
            os.utime(directory / CONTENTS_FILE)  # its last use, for evict_least_recently_used
            return True
        return self._fetch_directory(directory, committed)

    def evict_least_recently_used(self, limit_bytes: int) -> tuple[int, int]:
        """Delete local copies of committed directories, least recently used first, until those
        left hold at most ``limit_bytes``; the object store keeps them, and the next use fetches them
        again. Returns how many directories and bytes went."""
        copies = []
        for contents in self.local_root.joinpath("store").rglob(CONTENTS_FILE):
            if any(part.startswith(".tmp-") for part in contents.parts):
                continue
            listed = _read_listing(contents.parent) or {}
            copies.append((contents.stat().st_mtime_ns, sum(entry["size"] for entry in listed.values()), contents.parent))
        total = sum(size for _, size, _ in copies)
        evicted = evicted_bytes = 0
        for _, size, directory in sorted(copies, key=lambda copy: copy[0]):
            if total <= limit_bytes:
                break
            if self._committed_listing(directory) is None:
                continue  # never published (its publish failed): this copy is the only one
            shutil.rmtree(directory, ignore_errors=True)
            total -= size
            evicted, evicted_bytes = evicted + 1, evicted_bytes + size
        return evicted, evicted_bytes

    def publish_directory(self, directory: Path) -> None:
        """Put the local committed ``directory`` in the object store: its files at once, then its
        ``contents.json``, the commit. A reader that finds an earlier commit meanwhile checks each
        file it fetches against it, so a mix of old and new objects is never taken for either."""
        names = list(_read_listing(directory) or {})
        self.fs.put([str(directory / name) for name in names], [self.remote(directory / name) for name in names])
        self.fs.put_file(str(directory / CONTENTS_FILE), self.remote(directory / CONTENTS_FILE))

    def publish_file(self, path: Path) -> None:
        """Put the local file ``path`` (a manifest, a lineage, a cache record) in the object store."""
        self.fs.put_file(str(path), self.remote(path))

    def pull_file(self, path: Path) -> bool:
        """Make the local ``path`` the object store's copy of it; False (and no local copy) when
        the store has none, since a file the store lost must not live on in one machine's cache."""
        try:
            data = self.fs.cat_file(self.remote(path))
        except FileNotFoundError:
            Path(path).unlink(missing_ok=True)
            return False
        with _atomic_file(Path(path)) as tmp:
            tmp.write_bytes(data)
        return True

    def names_in(self, folder: Path) -> set[str]:
        """The names the object store holds directly under the local ``folder``."""
        try:
            return {name.rsplit("/", 1)[-1] for name in self.fs.ls(self.remote(folder), detail=False)}
        except FileNotFoundError:
            return set()

    def remove_directory(self, directory: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.remote(directory / CONTENTS_FILE))
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.remote(directory), recursive=True)

    def _committed_listing(self, directory: Path) -> dict[str, dict[str, Any]] | None:
        try:
            return json.loads(self.fs.cat_file(self.remote(directory / CONTENTS_FILE)))["files"]
        except FileNotFoundError:
            return None
        except (ValueError, KeyError):
            return None  # a damaged commit counts as none: the directory is recomputed

    def _fetch_directory(self, directory: Path, committed: dict[str, dict[str, Any]]) -> bool:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.parent / f".tmp-{directory.name}-{uuid.uuid4().hex}"
        try:
            names = list(committed)
            for name in names:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            self.fs.get([self.remote(directory / name) for name in names], [str(tmp / name) for name in names])
            for name, entry in committed.items():
                if hash_file(tmp / name) != entry["hash"]:
                    return False  # altered in the object store: the stage recomputes and publishes it again
                os.utime(tmp / name, ns=(entry["mtime_ns"], entry["mtime_ns"]))
            write_json_atomic(tmp / CONTENTS_FILE, {"files": committed})
            _commit(tmp, directory)
            return True
        except FileNotFoundError:
            return False  # an object the commit lists is gone
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class _Publishing:
    """Directories committed here, uploaded by background threads while the stage goes on computing
    (a unit's upload overlaps the next unit's work, a checkpoint's the next training steps).
    ``wait_for_publishing`` is the barrier: before a stage's record is shared (it names the units),
    when a worker's unit ends, and when the process exits."""

    UPLOADS_AT_ONCE = 8

    def __init__(self) -> None:
        self.pool: ThreadPoolExecutor | None = None
        self.pending: list[Future] = []
        self.lock = threading.Lock()

    def submit(self, mirror: Mirror, directory: Path) -> None:
        with self.lock:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(self.UPLOADS_AT_ONCE, thread_name_prefix="gptflow-publish")
                atexit.register(wait_for_publishing)
            self.pending.append(self.pool.submit(mirror.publish_directory, directory))

    def wait(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for upload in pending:
            upload.result()  # the first failed upload raises here, in the stage that wrote it


_PUBLISHING = _Publishing()


def wait_for_publishing() -> None:
    """Return once every directory this process committed to a mirrored workspace is in its object
    store; raise the error of an upload that failed."""
    _PUBLISHING.wait()


@functools.lru_cache(maxsize=64)
def _mirror_at(local_root: str, marker_mtime_ns: int) -> Mirror:
    """One ``Mirror`` (and one object-store client) per local folder and marker version."""
    return Mirror(Path(local_root), json.loads((Path(local_root) / MIRROR_FILE).read_text())["url"])
