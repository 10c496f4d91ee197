"""The artifact store as the pipeline holds it: ``ArtifactStore``, and how paths inside it are written.

Every stage writes its outputs into store directories committed atomically (``data.commits``).
Code that checks, commits or reads those directories holds the workspace's ``ArtifactStore`` and
calls it: for a workspace on this machine every call stays on its disk; for a workspace on an
object store, the calls marked "mirrored" below also reach the object store through the store's
``ObjectStoreMirror`` (``data.mirror``). So a reader sees where network I/O can happen: wherever
an ``ArtifactStore`` is called.

A workspace is relocatable (``cp -a`` or ``mv`` it, and the copy runs on its own artifacts):
whatever names a path inside the store (manifests, Prefect cache records, lineages, outboxes)
writes it as a store reference, ``@store/<relative path>`` (``store_references``), and reads it
back against the store it lies in (``store_paths``); a stage's ``report.json`` leaves its own
folder out (``data.commits.write_report``). Only Prefect's record metadata names the file it
wrote, which nothing reads back. The MLflow store keeps absolute paths: see
``tasks.tracking.experiments`` for how a copied one is handled.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gptflow.data import commits
from gptflow.data.commits import CONTENTS_FILE, CorruptArtifactError
from gptflow.data.mirror import ObjectStoreMirror

CHECKS_AT_ONCE = 16
"""Directories ``are_complete`` checks at once: on an object store each check waits on requests."""
STORE_REFERENCE = "@store/"
"""How a path inside the store is written in anything the store keeps (manifests, cache records,
lineages): ``@store/<path relative to the store>``, so that a copied or moved workspace reads its
own artifacts, never the folder it was copied from."""


class ArtifactStore:
    """The store directories of one workspace, on this machine and, mirrored, on its object store.

    Get one with ``for_workspace``: one object per workspace and process, so every stage of a
    process waits on the same uploads. It pickles as its workspace's folder and URL, so a Ray
    worker or another process holds the same store."""

    def __init__(self, mirror: ObjectStoreMirror | None) -> None:
        self.mirror = mirror

    @staticmethod
    def for_workspace(root: Path | str, url: str | None = None) -> ArtifactStore:
        """The store of the workspace whose folder is ``root``; mirrored on ``url``, or on the URL
        the folder records when it mirrors an object store (``ObjectStoreMirror.attach``)."""
        return _store_for(str(root), url or ObjectStoreMirror.url_of(Path(root)))

    def __reduce__(self) -> tuple[Any, ...]:
        if self.mirror is None:
            return ArtifactStore, (None,)
        return _store_for, (str(self.mirror.local_root), self.mirror.url)

    def is_complete(self, directory: Path) -> bool:
        """Mirrored: whether ``directory`` was committed and is whole; in a mirrored workspace, when
        the object store holds its commit and this machine's copy matches it (fetched first when
        missing or stale). See ``data.commits.is_complete``."""
        if self.mirror is not None:
            return self.mirror.holds(Path(directory))
        return commits.is_complete(Path(directory))

    def are_complete(self, directories: Iterable[Path]) -> list[bool]:
        """Mirrored: ``is_complete`` of each directory, checked side by side."""
        return _side_by_side(self.is_complete, directories)

    def is_committed(self, directory: Path) -> bool:
        """Mirrored: whether ``directory`` was committed; in a mirrored workspace, when the object
        store holds its commit, with nothing fetched (one request). The check of a stage whose
        readers fetch what they read as they read it (``fetch_whole``, ``read_files``, streaming)."""
        if self.mirror is not None:
            return self.mirror.holds(Path(directory), fetch=False)
        return commits.is_complete(Path(directory))

    def are_committed(self, directories: Iterable[Path]) -> list[bool]:
        """Mirrored: ``is_committed`` of each directory, checked side by side."""
        return _side_by_side(self.is_committed, directories)

    def fetch_whole(self, directories: Iterable[Path], reader: str) -> None:
        """Mirrored: make each of ``directories`` whole on this machine (``is_complete``), before
        ``reader`` (what reads them, as an error names it) reads them; ``CorruptArtifactError``
        naming the first that is not."""
        directories = list(map(Path, directories))
        missing = [directory for directory, whole in zip(directories, self.are_complete(directories)) if not whole]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CorruptArtifactError(
                f"{missing[0]}{more}, which {reader} reads, is not in the store whole: it was "
                "altered or removed after it was committed (a warning above names the object). Run the command again: "
                "the stage that writes it computes it again.")

    def read_files(self, paths: Iterable[Path]) -> list[bytes | None]:
        """Mirrored: the bytes of each of ``paths``, each one file of a committed store directory,
        read side by side with nothing else of their directories fetched
        (``ObjectStoreMirror.read_committed_file``); None for one whose directory is not committed
        whole or lists no such file."""
        read = self.mirror.read_committed_file if self.mirror is not None else commits.read_committed_file
        return _side_by_side(read, map(Path, paths))

    @contextlib.contextmanager
    def commit(self, directory: Path) -> Iterator[Path]:
        """Mirrored: ``data.commits.atomic_directory`` of ``directory``, then, in a mirrored workspace,
        its upload on a background thread (``wait_for_uploads`` waits for it)."""
        with commits.atomic_directory(Path(directory)) as tmp:
            yield tmp
        if self.mirror is not None:
            self.mirror.publish_in_background(Path(directory))

    @contextlib.contextmanager
    def replace(self, directory: Path) -> Iterator[Path]:
        """Mirrored: ``commit``, replacing a complete ``directory`` (a retrained model's files must
        replace the old ones; ``commit`` keeps a complete directory, as keys are content addresses)."""
        commits.discard_contents(Path(directory))
        with self.commit(Path(directory)) as tmp:
            yield tmp

    def wait_for_uploads(self) -> None:
        """Return once every directory this store committed in this process is in its object store;
        raise the error of an upload that failed."""
        if self.mirror is not None:
            self.mirror.wait_for_uploads()

    def verify(self, directory: Path, names: Iterable[str] | None = None) -> None:
        """Mirrored: ``data.commits.verify_contents``, once a directory this machine lacks is fetched."""
        directory = Path(directory)
        if self.mirror is not None and not (directory / CONTENTS_FILE).exists():
            self.mirror.holds(directory)
        commits.verify_contents(directory, names)

    def verify_files(self, paths: Iterable[Path]) -> None:
        """Mirrored: ``verify`` of each file in ``paths``, each against the directory holding it."""
        by_directory: dict[Path, list[str]] = {}
        for path in map(Path, paths):
            by_directory.setdefault(path.parent, []).append(path.name)
        for directory, names in by_directory.items():
            self.verify(directory, names)

    def share(self, path: Path) -> None:
        """Mirrored: publish the file ``path`` that other runs read (a manifest, a lineage, a cache
        record); in a local workspace it is where they read it already."""
        if self.mirror is not None:
            self.mirror.publish_file(Path(path))

    def pull(self, path: Path) -> bool:
        """Mirrored: whether the shared file ``path`` exists, made the object store's copy first in
        a mirrored workspace."""
        if self.mirror is not None:
            return self.mirror.pull_file(Path(path))
        return Path(path).exists()

    def read_manifest(self, manifest_type: Any, path: Path | str) -> Any | None:
        """Mirrored: the ``manifest_type`` (a class with ``from_dict``) written at ``path`` in the
        store's ``manifests/`` folder, its store references made paths in that store; None when the
        store has no such file."""
        if not self.pull(Path(path)):
            return None
        return manifest_type.from_dict(store_paths(json.loads(Path(path).read_text()), Path(path).parent.parent))

    def list_folder(self, folder: Path) -> list[str]:
        """Mirrored: the names in ``folder``, sorted; in a mirrored workspace, with those only the
        object store holds (another machine's checkpoints, say)."""
        names = set(os.listdir(folder)) if Path(folder).is_dir() else set()
        if self.mirror is not None:
            names |= self.mirror.names_in(Path(folder))
        return sorted(names)

    def remove_directory(self, directory: Path) -> None:
        """Mirrored: delete a store directory here and from the object store (its commit object
        first, so no machine trusts what remains while the rest goes)."""
        if self.mirror is not None:
            self.mirror.remove_directory(Path(directory))
        shutil.rmtree(directory, ignore_errors=True)


LOCAL_STORE = ArtifactStore(None)
"""The store of a workspace on this machine's disk only (tests, benchmarks, a bare GPU box)."""


def _side_by_side(request: Any, items: Iterable[Any]) -> list[Any]:
    """``request`` of each of ``items``, ``CHECKS_AT_ONCE`` at once (on an object store each waits on requests)."""
    with ThreadPoolExecutor(CHECKS_AT_ONCE, thread_name_prefix="gptflow-check") as pool:
        return list(pool.map(request, items))


@functools.lru_cache(maxsize=64)
def _store_for(root: str, url: str | None) -> ArtifactStore:
    return LOCAL_STORE if url is None else ArtifactStore(ObjectStoreMirror(Path(root), url))


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
