"""Token shards streamed from a workspace on an object store, within a disk cap.

Training on an ``s3://`` workspace needs no shard on this machine before its first step: the
loader (``data.loader.TokenWindows`` given a ``ShardCache``) knows each shard's token count from
the token manifest, and fetches only the record batches holding the windows it trains on. A token
shard's batch index (``data.token_shards.BatchIndex``, written beside it by tokenize) gives each batch's
byte range in the file and its content hash; the index is fetched once per process and checked
against the shard's commit, and each batch is fetched as one byte range of the shard's object
(``ObjectStoreMirror.read_range``; consecutive batches in one request), checked against the
index's hash, and only then kept, as one file per batch under the workspace's ``ranges/`` folder
that pyarrow reads as the IPC message it is. A batch whose bytes are not the index's is refused
with a warning naming the object and its byte range, and nothing of it is kept; the shard's
commit is withdrawn (``ObjectStoreMirror.withdraw_commit``), so the next run's tokenize stage,
which checks commits only, computes it again. A local copy altered since is fetched again. A
machine that holds a shard's directory whole, as committed (the one that tokenized it), reads the
shard's batches from it, each checked against the index's hash as it is read, and fetches none.
Shards tokenized before the index existed have none, and are fetched whole, as every other
stage's store directories (``data.mirror``), checked against their commit.

The epoch's order bounds what a stretch of training reads: the pieces of one shuffle buffer.
When training enters a buffer, the loader plans the token spans of that buffer's pieces and of
the next buffer's, in the order it will first read them; a background thread resolves them to
record batches and fetches them in that order, so the next buffer's batches arrive while this
one's train. Before a plan's fetches, local copies are evicted, least recently used first, until
the plan's missing bytes fit in ``cap_bytes`` (``GPTFLOW_CACHE_GB``) beside the rest; planned
copies are never evicted. Each byte of the corpus is thus fetched about once per epoch per
machine: a piece's batches once, plus at most the batch at either end that it shares with the
neighbouring pieces (``bench/streaming.py`` measures it). The ranks of one machine share its copy:
every rank reads from the same buffers, and the first to plan a batch fetches it while the others
find it.

A rank may find a batch it planned evicted by another rank (one a buffer ahead of it, at the
turn of a buffer): it fetches it again, beside the cap, so the cost is bytes, never a wrong window.
The cache maps each batch it reads, and unmaps it once no plan holds it (or beyond
``MAPPED_BATCHES``): an eviction before that frees its disk space only then. Not guarded, as
before: a shard fetched whole and evicted between its check and its mapping stops training with
an error naming the shard.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import logging
import os
import threading
from collections.abc import Hashable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

from gptflow.data.commits import CONTENTS_FILE, CorruptArtifactError, atomic_file, matches_listing, read_listing
from gptflow.data.disk_space import human_bytes
from gptflow.data.hashing import hash_bytes
from gptflow.data.mirror import RANGES_DIR, listing_bytes
from gptflow.data.store import ArtifactStore
from gptflow.data.store_outage import StoreAway
from gptflow.data.token_shards import BatchIndex, batch_index_path, batch_tokens, read_at

logger = logging.getLogger(__name__)
FETCH_LOCK = "locks/shard-fetch.lock"
"""In the workspace's local folder: held while one process of the machine evicts and fetches."""
MAPPED_BATCHES = 16384
"""Record batches a process keeps mapped, least recently read unmapped first: 1 GiB of uint16 ids,
about one default shuffle buffer's, and a quarter of Linux's default limit of mappings a process."""
INDEXES_AT_ONCE = 8
"""Batch indexes a plan fetches at once: its first fetch waits for those of every shard it reads."""
Span = tuple[Path, int, int]
"""A token shard, and the first and end token of what a reader reads of it."""


class ShardCache:
    """This machine's copies of the record batches (or, for shards without a batch index, the whole
    directories) of a workspace's token shards on an object store, held to ``cap_bytes`` together
    with everything else the workspace's local copy holds."""

    def __init__(self, store: ArtifactStore, cap_bytes: int) -> None:
        if store.mirror is None:
            raise ValueError("a ShardCache streams from a workspace on an object store; this one is local")
        if cap_bytes < 0:
            raise ValueError(f"the cache's cap must be a number of bytes, got {cap_bytes}")
        self.store = store
        self.mirror = store.mirror
        self.cap_bytes = cap_bytes
        self.fetched_bytes = 0
        """Bytes this cache fetched from the object store (what a benchmark reports)."""
        self._fetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptflow-shard-fetch")
        self._indexes: dict[Path, Future] = {}  # of each shard's BatchIndex, or None
        self._index_fetcher = ThreadPoolExecutor(max_workers=INDEXES_AT_ONCE, thread_name_prefix="gptflow-shard-index")
        self._listings: dict[Path, dict] = {}
        self._whole: dict[Path, bool] = {}  # of each shard: held whole here, its batches read from it
        # A copy is a directory (a shard fetched whole) or (shard, batch). By reader: the streams of
        # a mixture, and validation, plan apart.
        self._plans: dict[Hashable, frozenset[Hashable]] = {}
        self._resolving: list[Future] = []
        self._fetches: dict[Hashable, Future] = {}
        self._mapped: collections.OrderedDict[tuple[Path, int], np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._said_over_cap = False

    def __reduce__(self) -> tuple[object, ...]:
        return ShardCache, (self.store, self.cap_bytes)  # another process plans and fetches for itself

    def plan(self, reader: Hashable, now: Sequence[Span], ahead: Sequence[Span]) -> None:
        """The token spans ``reader`` reads now and next, each in the order it first reads them:
        fetch their batches in that order, and keep them from eviction until its next plan."""
        # Two steps, so that fetching the spans read now waits for no index of those read next.
        for spans, extends in ((now, False), (ahead, True)):
            resolved: Future = Future()
            with self._lock:
                self._resolving.append(resolved)
            self._fetcher.submit(self._fetch_plan, reader, list(spans), extends, resolved)

    def batch_index(self, shard: Path) -> BatchIndex | None:
        """``shard``'s batch index, fetched and checked against its commit when first asked for
        (once per process: a second caller waits for the first); None for a shard without one
        (tokenized before it existed), which is fetched whole."""
        with self._lock:
            loading, first = self._indexes.get(shard), shard not in self._indexes
            if first:
                loading = self._indexes[shard] = Future()
        if first:
            try:
                loading.set_result(self._fetch_index(shard))
            except BaseException as error:
                loading.set_exception(error)
        return loading.result()

    def read_batch(self, shard: Path, batch: int) -> np.ndarray:
        """The tokens of record batch ``batch`` of ``shard`` (a batch-indexed shard), mapped from
        its local copy (fetched first if need be) once its bytes match the index's hash, and kept
        mapped while planned, up to ``MAPPED_BATCHES``."""
        with self._lock:
            tokens = self._mapped.get((shard, batch))
            if tokens is not None:
                self._mapped.move_to_end((shard, batch))
                return tokens
        tokens = self._map_batch(shard, batch)
        with self._lock:
            self._mapped[(shard, batch)] = tokens
            while len(self._mapped) > MAPPED_BATCHES:
                self._mapped.popitem(last=False)
        return tokens

    def _map_batch(self, shard: Path, batch: int) -> np.ndarray:
        index = self.batch_index(shard)
        path = self.batch_path(shard, batch)
        for _ in range(2):  # a copy evicted or altered since its fetch is fetched once more
            self._wait_for((shard, batch))
            whole = self._whole_here(shard)
            try:
                message = _read_batch(shard, index, batch) if whole else _map(path)
            except FileNotFoundError:  # evicted since
                self._forget_copy(shard, batch, whole)
                continue
            if len(message) == index.lengths[batch] and hash_bytes(message) == index.hashes[batch]:
                return batch_tokens(message, index)
            if not whole:
                path.unlink(missing_ok=True)
            self._forget_copy(shard, batch, whole)
        raise CorruptArtifactError(f"{shard}: record batch {batch} was lost or altered on this machine as soon as it "
                                   f"was fetched again into {path}; check the disk and what else writes there.")

    def wait_for(self, directory: Path) -> None:
        """Return once ``directory``'s local copy is whole (fetched now if no plan named it): for
        shards without a batch index."""
        self._wait_for(directory)

    def batch_path(self, shard: Path, batch: int) -> Path:
        """Where this machine keeps its copy of record batch ``batch`` of ``shard``."""
        return self.mirror.local_root / RANGES_DIR / shard.relative_to(self.mirror.local_root) / f"{batch:06d}"

    def close(self) -> None:
        """Stop fetching ahead: fetches not yet started are dropped, the one under way finishes."""
        self._fetcher.shutdown(wait=True, cancel_futures=True)
        self._index_fetcher.shutdown(wait=True)

    def _fetch_plan(self, reader: Hashable, spans: list[Span], extends: bool, resolved: Future) -> None:
        """On the fetch thread: the copies ``spans`` read, planned for ``reader`` (added to its plan
        when ``extends``, else its plan anew), then fetched in order."""
        try:
            list(self._index_fetcher.map(self.batch_index, dict.fromkeys(shard for shard, _, _ in spans)))
            copies = list(dict.fromkeys(copy for span in spans for copy in self._copies(span)))
            with self._lock:
                self._plans[reader] = frozenset(copies) | (self._plans.get(reader, frozenset()) if extends else set())
                planned = frozenset().union(*self._plans.values())
                # A copy outside the plan may be evicted: the next plan that needs it fetches it again.
                self._fetches = {copy: future for copy, future in self._fetches.items() if copy in planned}
                # Unmapped, so that its disk space goes with it when it is evicted.
                self._mapped = collections.OrderedDict(
                    (copy, tokens) for copy, tokens in self._mapped.items() if copy in planned)
                new = [copy for copy in copies if copy not in self._fetches]
                for copy in new:
                    self._fetches[copy] = Future()
            resolved.set_result(None)
        except BaseException as error:
            resolved.set_exception(error)
            return
        finally:
            with self._lock:
                self._resolving.remove(resolved)
        self._warn_if_over_cap(planned)
        with _machine_lock(self.mirror.local_root / FETCH_LOCK):
            missing = [copy for copy in new if not self._is_here(copy)]
            self.mirror.evict_least_recently_used(self.cap_bytes - sum(map(self._bytes, missing)),
                                                  keep={self._local(copy) for copy in planned})
        for run in _runs(new):
            with self._lock:
                futures = [self._fetches.get(copy) or Future() for copy in run]
            try:
                self._fetch(run)
                for future in futures:
                    future.set_result(None)
            except BaseException as error:
                for future in futures:
                    future.set_exception(error)

    def _fetch_index(self, shard: Path) -> BatchIndex | None:
        listing = self._listing(shard.parent)
        name = batch_index_path(shard).name
        if name not in listing:
            return None
        data = self.mirror.read_committed_file(shard.with_name(name), listing)
        if data is None:
            raise CorruptArtifactError(
                f"{shard} could not be fetched from the object store at {self.mirror.url}: its batch index {name} was "
                "altered or lost after it was published, or the store does not answer (a warning above says which). "
                "An altered or lost directory is computed again by the next run.")
        self._count(len(data))
        return BatchIndex.from_json(json.loads(data))

    def _copies(self, span: Span) -> list[Hashable]:
        """The copies holding tokens ``[first, end)`` of a shard: its batches, or its directory."""
        shard, first, end = span
        index = self.batch_index(shard)
        if index is None:
            return [shard.parent]
        starts = index.token_starts
        low = int(np.searchsorted(starts, first, side="right")) - 1
        high = int(np.searchsorted(starts, end, side="left"))
        return [(shard, batch) for batch in range(max(low, 0), min(high, len(index.tokens)))]

    def _wait_for(self, copy: Hashable) -> None:
        with self._lock:
            future, resolving = self._fetches.get(copy), list(self._resolving)
        for plan in resolving:  # plans being resolved, in order: the first may name it
            if future is not None:
                break
            plan.result()
            with self._lock:
                future = self._fetches.get(copy)
        if future is None:
            future = Future()
            try:
                self._fetch([copy])
                future.set_result(None)
            except BaseException as error:
                future.set_exception(error)
            with self._lock:
                self._fetches.setdefault(copy, future)
        future.result()

    def _fetch(self, run: list[Hashable]) -> None:
        """Make the local copies ``run`` whole: a directory through the mirror, or consecutive
        batches of one shard, those missing as one byte range."""
        # One fetch at a time on the machine: two ranks fetching at once would each make room for
        # their own copy only, and both fetch a copy they both plan.
        with _machine_lock(self.mirror.local_root / FETCH_LOCK):
            if isinstance(run[0], Path):
                self._fetch_directory(run[0])
                return
            for local in {self._local(copy) for copy in filter(self._is_here, run)}:
                # Its last use, for evict_least_recently_used (a directory's is its commit's).
                with contextlib.suppress(FileNotFoundError):
                    os.utime(local / CONTENTS_FILE if local.is_dir() else local)
            for missing in _runs([copy for copy in run if not self._is_here(copy)]):
                self._fetch_batches(missing[0][0], [batch for _, batch in missing])

    def _fetch_directory(self, directory: Path) -> None:
        already_here = self._is_here(directory)
        keep = {self._local(copy) for copy in self._planned()}
        if not self.mirror.holds(directory, cap_bytes=self.cap_bytes, keep=keep):
            raise CorruptArtifactError(
                f"{directory} could not be fetched whole from the object store at {self.mirror.url}: an object "
                "of it was altered or lost after it was published, or the store does not answer (a warning above says "
                "which). An altered or lost directory is computed again by the next run."
            )
        if not already_here:  # else another rank of this machine fetched it, or a plan before
            self._count(self._bytes(directory))

    def _fetch_batches(self, shard: Path, batches: list[int]) -> None:
        """Fetch the consecutive ``batches`` of ``shard`` in one request; keep each that hashes to its index's."""
        index = self.batch_index(shard)
        start, end = index.offsets[batches[0]], index.offsets[batches[-1]] + index.lengths[batches[-1]]
        data = self._request(shard.parent, lambda: self.mirror.read_range(shard, start, end))
        self._count(len(data))
        for batch in batches:
            offset = index.offsets[batch] - start
            message = data[offset : offset + index.lengths[batch]]
            self._check(message, index.hashes[batch], f"{self.mirror.url}/{self._name(shard)} bytes "
                        f"{index.offsets[batch]}-{index.offsets[batch] + index.lengths[batch]} (record batch {batch} "
                        f"of {len(index.tokens)})", shard)
            with atomic_file(self.batch_path(shard, batch)) as tmp:  # nothing half-written is ever taken for whole
                tmp.write_bytes(message)

    def _check(self, data: bytes, expected: str, name: str, shard: Path) -> None:
        if hash_bytes(data) != expected:
            logger.warning(f"{name} in the object store does not hash to its commit (altered after it was "
                           f"published): {self._name(shard.parent)} is computed again.")
            self.mirror.withdraw_commit(shard.parent, self._listing(shard.parent))
            raise CorruptArtifactError(
                f"{shard} could not be fetched from the object store at {self.mirror.url}: {name} was altered after "
                "it was published, and nothing of it was kept or trained on. An altered directory is computed again "
                "by the next run.")

    def _request(self, directory: Path, read: object) -> bytes:
        try:
            return read()
        except (FileNotFoundError, StoreAway) as error:
            gone = isinstance(error, FileNotFoundError)
            if gone:
                self.mirror.withdraw_commit(directory, self._listing(directory))
            raise CorruptArtifactError(
                f"{directory} could not be fetched from the object store at {self.mirror.url}: "
                f"{'an object of it is gone' if gone else 'the store does not answer'}. An altered or lost directory "
                "is computed again by the next run.") from error

    def _listing(self, directory: Path) -> dict:
        """The files the commit of ``directory`` lists, asked once per process; {} when it has none."""
        with self._lock:
            if directory in self._listings:
                return self._listings[directory]
        try:
            listing = self.mirror.committed_listing(directory) or {}
        except StoreAway:
            listing = {}  # what the store lacks is fetched whole, from the local copy while it is away
        with self._lock:
            return self._listings.setdefault(directory, listing)

    def _whole_here(self, shard: Path) -> bool:
        """Whether this machine holds ``shard``'s directory whole, as committed (the machine that
        tokenized it, or one that fetched it whole): its batches are then read from the shard
        itself, never fetched. Asked once per process, until a read finds it evicted or altered."""
        with self._lock:
            if shard in self._whole:
                return self._whole[shard]
        listing = self._listing(shard.parent)
        whole = bool(listing) and read_listing(shard.parent) == listing and matches_listing(shard.parent, listing)
        with self._lock:
            return self._whole.setdefault(shard, whole)

    def _forget_copy(self, shard: Path, batch: int, whole: bool) -> None:
        """The copy of ``batch`` just read is gone or altered: fetch it again, as a byte range."""
        with self._lock:
            if whole:
                self._whole[shard] = False
            self._fetches.pop((shard, batch), None)

    def _local(self, copy: Hashable) -> Path:
        """What eviction knows ``copy`` by: a directory, or a fetched batch (or the shard's directory, held whole)."""
        if isinstance(copy, Path):
            return copy
        return copy[0].parent if self._whole_here(copy[0]) else self.batch_path(*copy)

    def _is_here(self, copy: Hashable) -> bool:
        if isinstance(copy, Path):
            return (copy / CONTENTS_FILE).exists()
        return self._whole_here(copy[0]) or self.batch_path(*copy).exists()

    def _bytes(self, copy: Hashable) -> int:
        if isinstance(copy, Path):
            return listing_bytes(self._listing(copy))
        shard, batch = copy
        return self.batch_index(shard).lengths[batch]

    def _planned(self) -> frozenset[Hashable]:
        with self._lock:
            return frozenset().union(*self._plans.values())

    def _count(self, n_bytes: int) -> None:
        with self._lock:
            self.fetched_bytes += n_bytes

    def _name(self, path: Path) -> str:
        return Path(path).relative_to(self.mirror.local_root).as_posix()

    def _warn_if_over_cap(self, planned: frozenset[Hashable]) -> None:
        planned_bytes = sum(map(self._bytes, planned))
        if planned_bytes > self.cap_bytes and not self._said_over_cap:
            self._said_over_cap = True
            logger.warning(f"What training reads from its current and next shuffle buffer holds "
                           f"{human_bytes(planned_bytes)}, more than the cache's cap of {human_bytes(self.cap_bytes)}: "
                           "the cache goes over it by the difference. Raise GPTFLOW_CACHE_GB.")


def _map(path: Path) -> pa.Buffer:
    """The bytes of the file ``path``, mapped."""
    with pa.memory_map(str(path)) as source:
        return source.read_buffer()


def _read_batch(shard: Path, index: BatchIndex, batch: int) -> pa.Buffer:
    """The bytes of record batch ``batch`` of the whole local ``shard``, read (a mapping of the
    whole shard per batch would hold one mapping of the file for each batch kept)."""
    with open(shard, "rb") as file:
        return pa.py_buffer(read_at(file, index.offsets[batch], index.lengths[batch]))


def _runs(copies: list[Hashable]) -> list[list[Hashable]]:
    """``copies`` cut into runs fetched together: consecutive batches of one shard; a directory alone."""
    runs: list[list[Hashable]] = []
    for copy in copies:
        previous = runs[-1][-1] if runs else None
        if (isinstance(copy, tuple) and isinstance(previous, tuple) and previous[0] == copy[0]
                and previous[1] + 1 == copy[1]):
            runs[-1].append(copy)
        else:
            runs.append([copy])
    return runs


@contextlib.contextmanager
def _machine_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``, which the kernel releases if the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
