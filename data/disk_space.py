"""Writes that run out of space (disk full, quota used up, file size limit): recognised whatever
library raised them, and reported in one message naming what was written and the space left.

ENOSPC, EDQUOT and EFBIG are recognised as an ``OSError``, and as the errors safetensors and
tokenizers (Rust's ``(os error 28)``) and SQLite (the MLflow store) raise for them. A write
through ``data.commits`` first removes its ``.tmp-*`` file or directory, so nothing partial stays
to fill the disk, then raises ``OutOfSpaceError`` naming what was being written (the store
directory, an MLflow artifact under ``mlartifacts/``), the free space on that filesystem and the
fix; ``tasks.runtime.caching.run_stage`` adds the stage's name, and the command line prints it as
one line (exit status 2). Freeing space, or pointing ``--workspace`` / ``GPTFLOW_HOME``
elsewhere, and rerunning the same command reuses every stage that completed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

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
