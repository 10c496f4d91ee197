"""Content-addressed artifact store: hashing, atomic directory commits, verified reuse.

Every stage writes its outputs into a directory named by a key (a hash of everything that
determines the content). A directory is written under a temporary name and renamed into place
only once complete, with a ``contents.json`` listing every file's size and hash; a directory is
reused only when it is present under its final name and every listed file still matches. A
process killed mid-write therefore leaves only a ``.tmp-*`` directory, which nothing reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

CONTENTS_FILE = "contents.json"
HASH_CHUNK_BYTES = 1 << 20
STALE_TMP_SECONDS = 24 * 3600


def hash_bytes(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def hash_file(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def hash_json(value: Any) -> str:
    """Hash of a JSON-serialisable value, independent of dict ordering."""
    return hash_bytes(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode())


def code_version(*modules: ModuleType) -> str:
    """Hash of the source files of ``modules``: a cache key part that changes when their code does."""
    digest = hashlib.blake2b(digest_size=16)
    for module in sorted(modules, key=lambda m: m.__name__):
        digest.update(module.__name__.encode())
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON so that readers see either the old file or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


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
    """True when ``directory`` was committed and no listed file was deleted or altered since.

    Size and mtime are the fast path; a file whose mtime moved is re-hashed, so touching a file
    does not invalidate it but changing its bytes does.
    """
    contents_path = directory / CONTENTS_FILE
    try:
        listed = json.loads(contents_path.read_text())["files"]
    except (OSError, ValueError, KeyError):
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


def read_contents_hash(directory: Path) -> str:
    """One hash standing for every file of a committed directory (for downstream cache keys)."""
    listed = json.loads((directory / CONTENTS_FILE).read_text())["files"]
    return hash_json({name: entry["hash"] for name, entry in listed.items()})


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it becomes ``final`` in one rename.

    If ``final`` already exists as a complete directory (a concurrent run committed the same key
    first), the new copy is discarded: keys are content addresses, so both are equivalent. An
    incomplete ``final`` (deleted or altered files) is replaced.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        yield tmp
        write_json_atomic(tmp / CONTENTS_FILE, {"files": _describe_files(tmp)})
        _commit(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _commit(tmp: Path, final: Path) -> None:
    if final.exists():
        if is_complete(final):
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
        if not is_complete(final):
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
