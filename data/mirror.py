"""A workspace on an object store, mirrored in a local folder (``--workspace s3://...``).

``ObjectStoreMirror`` is the one place the artifact store talks to an object store; the pipeline
reaches it only through the ``data.store.ArtifactStore`` it holds. The object store is the truth;
the folder is this machine's copy of what it has read or written. Object stores have no rename,
so a directory is published as its data objects first and its ``contents.json`` last: that object
is the directory's commit, and only a committed directory whose objects have the sizes it lists
is trusted. A copy is fetched into a temporary folder, each file checked against the commit's
hash, then renamed into place with the commit's mtimes (so the local fast path of
``data.commits.is_complete`` holds on every machine). A file that does not hash to its commit, or
an object the commit lists that is gone, makes the directory not exist: the stage computes and
publishes it again, and a warning names the object.

Each machine works in ``$GPTFLOW_CACHE/workspaces/<hash of the URL>/``, laid out as a local
workspace, with ``mirror.json`` naming the URL, so the data layer finds the mirror from any path
inside and needs no argument of its own. Shared single files (manifests, lineages, Prefect cache
records) are uploaded after they are written (``publish_file``) and read from the store before
use (``pull_file``). ``tasks.runtime.caching.run_stage`` waits for a stage's uploads before
sharing its record, so a record never names a unit not yet in the store. Checkpoints are listed
from the store too (``names_in``), so a run resumes on another machine. Locks between machines
are the workspace's (``tasks.runtime.workspace.ObjectStoreLease``); at the start of a run, local
copies beyond ``GPTFLOW_CACHE_GB`` are evicted (``evict_least_recently_used``).

Every request goes through the mirror's ``data.store_outage.StoreOutage``: while the store does not
answer, what is committed is kept locally and published once it answers again, reads use the local
copy, and the barriers wait for it a bounded time (see that module).

Cost: one request per directory checked (``data.store.CHECKS_AT_ONCE`` at once), and per new
source file its unit's lookup; uploads overlap computing (``bench/object_store.py`` measures it
against a local workspace). A data stage's cache check asks for commits only (``holds`` with
``fetch=False``), and each reader fetches what it reads: a directory whole (``holds``), one file of
it (``read_committed_file``: a unit's counts), or the record batches of token shards as byte ranges
(``read_range``), kept under ``RANGES_DIR`` (``data.streaming``). A reader that finds an object
gone or altered withdraws its directory's commit (``withdraw_commit``), so that every later check
computes it again, as a local store discards a directory found altered. Not built: ``gs://``
workspaces (the lease relies on S3's conditional writes; gcsfs's generation preconditions would do
the same), and a store-side garbage collector for units no manifest names.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Collection
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gptflow.data.commits import (
    CONTENTS_FILE,
    atomic_file,
    commit_directory,
    matches_listing,
    read_committed_file,
    read_listing,
    write_json_atomic,
)
from gptflow.data.hashing import hash_bytes, hash_file
from gptflow.data.store_outage import OUTBOX_DIR, ObjectStoreAwayError, StoreAway, StoreOutage, workspace_filesystem

MIRROR_FILE = "mirror.json"
"""In the root of a workspace's local folder that mirrors an object store: ``{"url": ...}``, the
workspace's URL. Whatever lies under such a folder is mirrored."""
RANGES_DIR = "ranges"
"""In the root of a workspace's local folder: byte ranges of committed files fetched alone (the record
batches of token shards, ``data.streaming``), each checked against its hash before it was kept."""
UPLOADS_AT_ONCE = 8

logger = logging.getLogger(__name__)


class ObjectStoreMirror:
    """The local folder ``local_root`` that caches the workspace at ``url`` (any fsspec URL:
    ``s3://`` through s3fs, ``gs://`` through gcsfs).

    Directories committed here are uploaded by background threads while the stage goes on
    computing (a unit's upload overlaps the next unit's work, a checkpoint's the next training
    steps); ``wait_for_uploads`` is the barrier: before a stage's record is shared (it names the
    units), when a worker's unit ends, and when the process exits."""

    def __init__(self, local_root: Path, url: str) -> None:
        self.local_root = Path(local_root)
        self.url = url
        self._uploads: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._lock = threading.Lock()
        self.outage = StoreOutage(endpoint_of(url), self.local_root, self._probe, self._put)
        self._stopped_the_run = False  # wait_for_uploads gave up: the run's last line said what is kept

    def __reduce__(self) -> tuple[Any, ...]:
        # What another process needs: its own uploads start empty.
        return ObjectStoreMirror, (self.local_root, self.url)

    @classmethod
    def attach(cls, local_root: Path, url: str) -> ObjectStoreMirror:
        """Make ``local_root`` the local copy of the workspace at ``url``."""
        local_root.mkdir(parents=True, exist_ok=True)
        marker = local_root / MIRROR_FILE
        if not marker.exists():
            write_json_atomic(marker, {"url": url})
        return cls(local_root, url)

    @staticmethod
    def url_of(local_root: Path) -> str | None:
        """The object store URL the folder ``local_root`` mirrors, if it mirrors one."""
        try:
            return json.loads((Path(local_root) / MIRROR_FILE).read_text())["url"]
        except FileNotFoundError:
            return None

    @property
    def fs(self) -> Any:
        return workspace_filesystem(self.url)[0]

    def remote(self, path: Path) -> str:
        """The object name of the local ``path``."""
        root = workspace_filesystem(self.url)[1].rstrip("/")
        return f"{root}/{Path(path).relative_to(self.local_root).as_posix()}"

    def holds(self, directory: Path, cap_bytes: int | None = None, keep: Collection[Path] = (),
              fetch: bool = True) -> bool:
        """Whether the object store holds ``directory`` committed and whole, with a local copy
        that matches it (fetched here when missing or stale). While the store is away: whether
        the local copy is whole. ``cap_bytes``: before a fetch, local copies are evicted (least
        recently used first, never those in ``keep``) until this one fits beside them in it.
        ``fetch=False``: whether the store holds its commit, with no local copy made (one
        request): for a check whose readers fetch what they read as they read it."""
        try:
            committed = self.committed_listing(directory)
        except StoreAway:
            return matches_listing(directory, read_listing(directory))
        if committed is None:
            if not matches_listing(directory, read_listing(directory)):
                return False
            # Committed here, and its upload cut short (the process was killed, the store went
            # away) or still under way: the copy is whole, so it is published rather than computed again.
            self._publish_or_keep(directory)
            return True
        if not fetch:
            return True
        if read_listing(directory) == committed and matches_listing(directory, committed):
            # One request per check: an object lost under its commit is found by the next machine
            # that fetches the directory, which then computes and publishes it again.
            os.utime(directory / CONTENTS_FILE)  # its last use, for evict_least_recently_used
            return True
        if cap_bytes is not None:
            self.evict_least_recently_used(cap_bytes - listing_bytes(committed), keep={*keep, Path(directory)})
        return self._fetch_directory(directory, committed)

    def evict_least_recently_used(self, limit_bytes: int, keep: Collection[Path] = ()) -> tuple[int, int]:
        """Delete local copies of committed directories and fetched ranges (``RANGES_DIR``) but those
        in ``keep``, least recently used first, until those left hold at most ``limit_bytes`` (their
        files and commits); the object store keeps them, and the next use fetches them again.
        Returns how many copies and bytes went."""
        copies = []
        # os.walk, not rglob: it passes over folders that another process removes meanwhile.
        for folder, subfolders, files in os.walk(self.local_root / "store"):
            subfolders[:] = [name for name in subfolders if not name.startswith(".tmp-")]
            contents = Path(folder) / CONTENTS_FILE
            if CONTENTS_FILE not in files:
                continue
            with contextlib.suppress(FileNotFoundError):  # evicted meanwhile by another process
                size = listing_bytes(read_listing(contents.parent) or {}) + contents.stat().st_size
                copies.append((contents.stat().st_mtime_ns, size, contents.parent))
        for folder, _, files in os.walk(self.local_root / RANGES_DIR):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    stat = (Path(folder) / name).stat()
                    copies.append((stat.st_mtime_ns, stat.st_size, Path(folder) / name))
        total = sum(size for _, size, _ in copies)
        evicted = evicted_bytes = 0
        for _, size, copy in sorted(copies, key=lambda copy: copy[0]):
            if total <= limit_bytes:
                break
            if copy in keep:
                continue
            if copy.is_relative_to(self.local_root / RANGES_DIR):  # fetched from the store, which holds it
                copy.unlink(missing_ok=True)
            elif self._is_published(copy):  # else this copy is the only one
                shutil.rmtree(copy, ignore_errors=True)
            else:
                continue
            total -= size
            evicted, evicted_bytes = evicted + 1, evicted_bytes + size
        return evicted, evicted_bytes

    def publish_in_background(self, directory: Path) -> None:
        """``publish_directory`` on one of the mirror's upload threads; while the store is away,
        the directory is kept until it answers."""
        if self.outage.keep_if_away(directory):
            return
        with self._lock:
            if self._uploads is None:
                self._uploads = ThreadPoolExecutor(UPLOADS_AT_ONCE, thread_name_prefix="gptflow-publish")
                atexit.register(self._publish_before_exit)
            self._pending.append(self._uploads.submit(self._publish_or_keep, directory))

    def publish_what_earlier_runs_kept(self) -> None:
        """Publish, in the background, what runs on this machine kept while the store was away and
        could not publish before they ended (their outbox lists, ``data.store_outage.OUTBOX_DIR``)."""
        for outbox in sorted(self.local_root.joinpath(OUTBOX_DIR).glob("*.json")):
            with contextlib.suppress(FileNotFoundError, ValueError):
                for name in json.loads(outbox.read_text()):
                    if self.local_root.joinpath(name).exists():  # else deleted since (a pruned checkpoint)
                        self.publish_in_background(self.local_root / name)
            outbox.unlink(missing_ok=True)

    def wait_for_uploads(self) -> None:
        """Return once every directory ``publish_in_background`` was given, and every file and
        directory kept while the store was away, is in the object store; raise the error of an
        upload that failed, in the stage that wrote it, and ``ObjectStoreAwayError`` once the store
        has been away longer than a run waits (``data.store_outage.wait_limit_s``)."""
        with self._lock:
            pending, self._pending = self._pending, []
        for upload in pending:
            upload.result()
        try:
            self.outage.wait_until_published()
        except ObjectStoreAwayError:
            self._stopped_the_run = True
            raise

    def _publish_before_exit(self) -> None:
        """At exit: uploads still running finish; what the store did not take is named in one
        line, never a traceback (a run that stopped for it said so already)."""
        if self._stopped_the_run:
            return
        try:
            with self._lock:
                pending, self._pending = self._pending, []
            for upload in pending:
                upload.result()
            if not self.outage.away:  # it is publishing what it kept: a bounded wait
                self.outage.wait_until_published()
        except ObjectStoreAwayError:
            pass  # named below
        except Exception as error:
            logger.warning(f"An upload to the object store at {self.outage.endpoint} failed at exit "
                           f"({type(error).__name__}: {error}); the next run that uses it publishes it.")
        kept = self.outage.kept_summary()
        if kept:
            logger.warning(f"The object store at {self.outage.endpoint} does not answer: {kept} stay unpublished. "
                           "Rerun the same command once it answers: it publishes them and continues from them.")

    def publish_directory(self, directory: Path) -> None:
        """Put the local committed ``directory`` in the object store: its files at once, then its
        ``contents.json``, the commit. A reader that finds an earlier commit meanwhile checks each
        file it fetches against it, so a mix of old and new objects is never taken for either."""
        names = list(read_listing(directory) or {})
        self.fs.put([str(directory / name) for name in names], [self.remote(directory / name) for name in names])
        self.fs.put_file(str(directory / CONTENTS_FILE), self.remote(directory / CONTENTS_FILE))

    def publish_file(self, path: Path) -> None:
        """Put the local file ``path`` (a manifest, a lineage, a cache record) in the object store;
        while the store is away, it is kept until it answers."""
        self._publish_or_keep(Path(path))

    def pull_file(self, path: Path) -> bool:
        """Make the local ``path`` the object store's copy of it; False (and no local copy) when
        the store has none, since a file the store lost must not live on in one machine's cache.
        While the store is away, or the local copy waits to be published, the local copy is it."""
        if self.outage.is_kept(Path(path)):
            return True
        try:
            data = self.outage.request(f"reading {self._name(path)}", lambda: self.fs.cat_file(self.remote(path)))
        except StoreAway:
            return Path(path).exists()
        except FileNotFoundError:
            Path(path).unlink(missing_ok=True)
            return False
        with atomic_file(Path(path)) as tmp:
            tmp.write_bytes(data)
        return True

    def read_range(self, path: Path, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of the object of the local ``path`` (all of it by default): one
        request; ``StoreAway`` while the store is away, ``FileNotFoundError`` when it has none."""
        return self.outage.request(f"reading {self._name(path)}",
                                   lambda: self.fs.cat_file(self.remote(path), start=start, end=end))

    def read_committed_file(self, path: Path, committed: dict[str, dict[str, Any]] | None = None) -> bytes | None:
        """The bytes of ``path``, one file of a committed directory, with nothing else of it fetched:
        this machine's copy when it hashes to the commit's, else its object's (one request), checked
        against it. ``committed``: the directory's commit listing, when the caller has it. None when
        the directory is not committed (nor, while the store is away, whole here), or its commit
        lists no such file; None too, with a warning naming the object, when the object is gone or
        altered, and then the commit is withdrawn (``withdraw_commit``)."""
        directory = Path(path).parent
        if committed is None:
            try:
                committed = self.committed_listing(directory)
            except StoreAway:
                return read_committed_file(path)
            if committed is None:
                found = read_committed_file(path)
                if found is not None:  # its upload was cut short: published, as ``holds`` does
                    self._publish_or_keep(directory)
                return found
        entry = committed.get(Path(path).name)
        if entry is None:
            return None
        with contextlib.suppress(FileNotFoundError):
            data = Path(path).read_bytes()
            if hash_bytes(data) == entry["hash"]:
                return data
        try:
            data = self.read_range(Path(path))
        except StoreAway:
            return None
        except FileNotFoundError:
            data = None
        if data is not None and hash_bytes(data) == entry["hash"]:
            return data
        problem = "is gone" if data is None else "does not hash to its commit (altered after it was published)"
        logger.warning(f"{self.url}/{self._name(path)} in the object store {problem}: {self._name(directory)} is "
                       "computed again.")
        self.withdraw_commit(directory, committed)
        return None

    def withdraw_commit(self, directory: Path, committed: dict[str, dict[str, Any]]) -> None:
        """Delete the commit of ``directory``, one of whose objects a reader found gone or altered,
        if it is still ``committed`` (a directory published anew since keeps its new commit): every
        check then finds it not there, and the next run that needs it computes and publishes it again."""
        with contextlib.suppress(StoreAway, FileNotFoundError):
            if self.committed_listing(directory) == committed:
                self.outage.request(f"withdrawing {self._name(directory / CONTENTS_FILE)}",
                                    lambda: self.fs.rm_file(self.remote(directory / CONTENTS_FILE)))

    def names_in(self, folder: Path) -> set[str]:
        """The names the object store holds directly under the local ``folder``."""
        try:
            listed = self.outage.request(f"listing {self._name(folder)}",
                                         lambda: self.fs.ls(self.remote(folder), detail=False))
        except (FileNotFoundError, StoreAway):
            return set()  # while the store is away, the local folder is all there is
        return {name.rsplit("/", 1)[-1] for name in listed}

    def remove_directory(self, directory: Path) -> None:
        """Delete ``directory`` from the object store, its commit first. While the store is away it
        stays there: the next prune, or whoever computes it again, replaces it."""
        def remove() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.remote(directory / CONTENTS_FILE))
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.remote(directory), recursive=True)

        with contextlib.suppress(StoreAway):
            self.outage.request(f"removing {self._name(directory)}", remove)

    def _name(self, path: Path) -> str:
        return Path(path).relative_to(self.local_root).as_posix()

    def _probe(self) -> None:
        """A request the store answers once it can take what was kept: its bucket's metadata (a
        store back without the bucket raises ``FileNotFoundError``, and is asked again)."""
        self.fs.info(workspace_filesystem(self.url)[1].split("/", 1)[0])

    def _put(self, path: Path) -> None:
        if path.is_dir():
            self.publish_directory(path)
        else:
            self.fs.put_file(str(path), self.remote(path))

    def _publish_or_keep(self, path: Path) -> None:
        """Publish the committed directory or shared file ``path`` now, or keep it until the store answers."""
        while not self.outage.keep_if_away(path):
            try:
                self.outage.request(f"publishing {self._name(path)}", lambda: self._put(path))
                return
            except StoreAway:
                pass  # away now: kept by the loop's test

    def _is_published(self, directory: Path) -> bool:
        """Whether the object store holds a commit of ``directory``; False while it is away, or
        when its publish failed."""
        try:
            return self.committed_listing(directory) is not None
        except StoreAway:
            return False

    def committed_listing(self, directory: Path) -> dict[str, dict[str, Any]] | None:
        """The files the object store's commit of ``directory`` lists; None if it has none;
        ``StoreAway`` while the store is away."""
        remote = self.remote(directory / CONTENTS_FILE)
        try:
            return json.loads(self.outage.request(f"reading {self._name(directory / CONTENTS_FILE)}",
                                                  lambda: self.fs.cat_file(remote)))["files"]
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
            self.outage.request(f"fetching {self._name(directory)}", lambda: self.fs.get(
                [self.remote(directory / name) for name in names], [str(tmp / name) for name in names]))
            for name, entry in committed.items():
                if hash_file(tmp / name) != entry["hash"]:
                    logger.warning(f"{self.url}/{self._name(directory / name)} in the object store does not hash to its commit "
                                   f"(altered after it was published): {self._name(directory)} is computed again.")
                    self.withdraw_commit(directory, committed)
                    return False
                os.utime(tmp / name, ns=(entry["mtime_ns"], entry["mtime_ns"]))
            write_json_atomic(tmp / CONTENTS_FILE, {"files": committed})
            commit_directory(tmp, directory)
            return True
        except FileNotFoundError:
            logger.warning(f"An object that {self.url}/{self._name(directory / CONTENTS_FILE)} lists is gone from the "
                           f"object store: {self._name(directory)} is computed again.")
            self.withdraw_commit(directory, committed)
            return False
        except StoreAway:
            return False  # only the store holds it, and it is away: computed again here
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def listing_bytes(listed: dict[str, dict[str, Any]]) -> int:
    """The bytes of the files a commit lists."""
    return sum(entry["size"] for entry in listed.values())


def endpoint_of(url: str) -> str:
    """The object store of the workspace ``url`` as messages name it: its endpoint, when one is set, and the URL."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f"{endpoint} ({url})" if endpoint else url
