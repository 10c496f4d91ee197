"""Token shards streamed from a workspace on an object store, within a disk cap.

Training on an ``s3://`` workspace needs no shard on this machine before its first step: the
loader (``data.loader.TokenWindows`` given a ``ShardCache``) knows each shard's token count from
the token manifest, and reads a shard only once a window it trains on lies in it. The shards are
fetched through the workspace's mirror (``data.mirror``), as the content-addressed local copies
every other stage uses, each checked against its commit.

The epoch's order bounds what a stretch of training reads: the shards of one shuffle buffer.
When training enters a buffer, the loader plans the shards of that buffer and of the next one,
in the order it will first read them; a background thread fetches them in that order, so the
next buffer's shards arrive while this one's train. Before each fetch, local copies are evicted,
least recently used first, until the new one fits in ``cap_bytes`` (``GPTFLOW_CACHE_GB``) beside
the rest; the planned shards are never evicted. The ranks of one machine share its copy of the
workspace, so each shard is fetched about once per machine and epoch: every rank reads from the
same buffers, and the first to plan a shard fetches it while the others find it whole.

A rank may find a shard it planned evicted by another rank (one a buffer ahead of it, at the
turn of a buffer): its content check fetches it again, one directory beside the cap, so the cost
is bytes, never a wrong window. Not guarded: an eviction between that check and the mapping of
the file, which stops training with an error naming the shard (no lock spans the two yet).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from gptflow.data.commits import CONTENTS_FILE, CorruptArtifactError, read_listing
from gptflow.data.mirror import listing_bytes
from gptflow.data.store import ArtifactStore

logger = logging.getLogger(__name__)
FETCH_LOCK = "locks/shard-fetch.lock"
"""In the workspace's local folder: held while one process of the machine evicts and fetches."""


class ShardCache:
    """This machine's copies of the shard directories of a workspace on an object store, held to
    ``cap_bytes`` together with everything else the workspace's local copy holds."""

    def __init__(self, store: ArtifactStore, cap_bytes: int) -> None:
        if store.mirror is None:
            raise ValueError("a ShardCache streams from a workspace on an object store; this one is local")
        if cap_bytes < 0:
            raise ValueError(f"the cache's cap must be a number of bytes, got {cap_bytes}")
        self.store = store
        self.cap_bytes = cap_bytes
        self.fetched_bytes = 0
        """Bytes this cache fetched from the object store (what a benchmark reports)."""
        self._fetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptflow-shard-fetch")
        self._fetches: dict[Path, Future] = {}
        self._plans: dict[int, frozenset[Path]] = {}  # by reader: the streams of a mixture plan apart
        self._planned: frozenset[Path] = frozenset()
        self._lock = threading.Lock()
        self._said_over_cap = False

    def __reduce__(self) -> tuple[object, ...]:
        return ShardCache, (self.store, self.cap_bytes)  # another process plans and fetches for itself

    def plan(self, reader: object, now: Sequence[Path], ahead: Sequence[Path]) -> None:
        """The shard directories ``reader`` reads now and next, each in the order it first reads
        them: fetch them in that order, and keep them from eviction until its next plan."""
        with self._lock:
            self._plans[id(reader)] = frozenset([*now, *ahead])
            self._planned = frozenset().union(*self._plans.values())
            # A copy outside the plan may be evicted: the next plan that needs it fetches it again.
            self._fetches = {directory: future for directory, future in self._fetches.items()
                             if directory in self._planned}
            for directory in [*now, *ahead]:
                if directory not in self._fetches:  # a directory two readers plan is fetched once
                    self._fetches[directory] = self._fetcher.submit(self._fetch, directory)
            if not self._said_over_cap:  # after the plan's fetches: the fetcher runs one task at a time
                self._fetcher.submit(self._check_cap, self._planned)

    def wait_for(self, directory: Path) -> None:
        """Return once ``directory``'s local copy is whole (fetched now if no plan named it)."""
        with self._lock:
            future = self._fetches.get(directory)
            if future is None:
                future = self._fetches[directory] = self._fetcher.submit(self._fetch, directory)
        future.result()

    def close(self) -> None:
        """Stop fetching ahead: fetches not yet started are dropped, the one under way finishes."""
        self._fetcher.shutdown(wait=True, cancel_futures=True)

    def _fetch(self, directory: Path) -> None:
        # One fetch at a time on the machine: two ranks fetching at once would each make room for
        # their own copy only, and both fetch a directory they both plan.
        with _machine_lock(self.store.mirror.local_root / FETCH_LOCK):
            already_here = (directory / CONTENTS_FILE).exists()
            whole = self.store.mirror.holds(directory, cap_bytes=self.cap_bytes, keep=self._planned)
        if not whole:
            raise CorruptArtifactError(
                f"{directory} could not be fetched whole from the object store at {self.store.mirror.url}: an object "
                "of it was altered or lost after it was published, or the store does not answer (a warning above says "
                "which). An altered or lost directory is computed again by the next run."
            )
        if not already_here:  # else another rank of this machine fetched it, or a plan before
            self.fetched_bytes += listing_bytes(read_listing(directory) or {})

    def _check_cap(self, planned: frozenset[Path]) -> None:
        planned_bytes = sum(listing_bytes(read_listing(directory) or {}) for directory in planned)
        if planned_bytes > self.cap_bytes and not self._said_over_cap:
            self._said_over_cap = True
            logger.warning(f"The shards training reads from its current and next shuffle buffer hold "
                           f"{planned_bytes / 2**30:.2f} GB, more than the cache's cap of {self.cap_bytes / 2**30:.2f} "
                           "GB: the cache goes over it by the difference. Raise GPTFLOW_CACHE_GB.")


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
