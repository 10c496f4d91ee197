"""Atomic commits of store directories on this machine, and their verification.

Every stage writes its outputs into a directory named by a key (a hash of everything that
determines the content). A directory is written under a temporary name and renamed into place
only once complete, with a ``contents.json`` listing every file's size and hash; a directory is
reused only when it is present under its final name and every listed file still matches. A
process killed mid-write therefore leaves only a ``.tmp-*`` directory, which nothing reads.
Consumers that read every byte re-hash first (``verify_contents``) and discard what fails.
A write that runs out of space leaves nothing behind either, and is raised as one
``OutOfSpaceError`` naming what was written and the space left.

``is_complete`` is cheap (size and mtime; only a file whose mtime moved is re-hashed), so bytes
altered behind a restored mtime pass it. The consumers that read an artifact whole re-hash it
first, where that costs little beside reading it: the pretrain task every token shard its job
reads, once before training rather than in each torchrun rank
(``tasks.stages.training.pretrain_model_task``); ``model.checkpoint.load_model`` the weights and
config (evaluation, generation, a fine-tuning's base, the MLflow models); ``load_checkpoint`` the
checkpoint it resumes or continues from. Stages that read part of an artifact (the loss on a
budget of a split's tokens) do not. A failed check, like ``data.loader.TokenWindows`` finding a
token id beyond the vocabulary, raises ``CorruptArtifactError`` (a one-line user error) after
``discard_contents``: ``is_complete`` is false from then on, so the stage's cached record is
refused and the next run recomputes the directory.

These functions see only this machine's disk; ``data.store.ArtifactStore`` is what the pipeline
holds, and adds the object store of a mirrored workspace (``data.mirror``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from gptflow.data.disk_space import reporting_out_of_space
from gptflow.data.errors import UserError
from gptflow.data.hashing import hash_file, hash_json

CONTENTS_FILE = "contents.json"
REPORT_FILE = "report.json"
STALE_TMP_SECONDS = 24 * 3600


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON so that readers see either the old file or the complete new one."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=str))


def write_report(directory: Path, report: Any) -> None:
    """A stage's report (a dataclass) as ``report.json`` in the folder it describes, its
    ``directory`` field left out: the file lies there, and it names no path of the workspace."""
    value = {name: item for name, item in dataclasses.asdict(report).items() if name != "directory"}
    (directory / REPORT_FILE).write_text(json.dumps(value, indent=2))


def copy_file_atomic(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` so that readers see either the old file or the complete new one."""
    with atomic_file(Path(target)) as tmp:
        shutil.copyfile(source, tmp)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
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
    """True when ``directory`` was committed and no listed file was deleted or altered since.

    Size and mtime are the fast path; a file whose mtime moved is re-hashed, so touching a file
    does not invalidate it but changing its bytes does. Bytes changed behind a restored mtime pass;
    ``verify_contents`` catches them where a consumer reads the files whole.
    """
    return matches_listing(directory, read_listing(directory))


def read_committed_file(path: Path) -> bytes | None:
    """The bytes of ``path`` when the directory holding it is complete (``is_complete``) and lists
    it; None otherwise."""
    listed = read_listing(Path(path).parent)
    if listed is None or Path(path).name not in listed or not matches_listing(Path(path).parent, listed):
        return None
    return Path(path).read_bytes()


def read_listing(directory: Path) -> dict[str, dict[str, Any]] | None:
    """The files ``contents.json`` lists (name → size, mtime, hash); None when there is none to read."""
    try:
        return json.loads((directory / CONTENTS_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return None


def matches_listing(directory: Path, listed: dict[str, dict[str, Any]] | None) -> bool:
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
    listed = read_listing(directory)
    if listed is None:
        raise CorruptArtifactError(
            f"{directory} is not a complete store directory (no readable {CONTENTS_FILE}): it was altered or "
            "discarded after it was written; the next run recomputes it."
        )
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
            commit_directory(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def commit_directory(tmp: Path, final: Path) -> None:
    """Rename the filled ``tmp`` to ``final``, unless a complete ``final`` is there already."""
    if final.exists():
        if matches_listing(final, read_listing(final)):
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
        if not matches_listing(final, read_listing(final)):
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
