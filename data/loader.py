"""Training windows over memory-mapped token shards, visited in shuffled epochs.

The shards of a split are read as one token stream, in the order given. Every stretch of
continuous text already ends with the end-of-text token, so a window that runs from the end of
one shard into the next is no different from one that runs from one document into the next; and
a corpus of many small files (shorter than a window each) still contributes every token.

Windows tile the stream: window ``i`` is tokens ``[i·T, i·T + T + 1)`` for ``T = block_size``
(the model reads the first ``T`` and predicts the last ``T``), so consecutive windows share one
token and every token but the first is a target in exactly one window. An epoch visits each of
the ``(num_tokens - 1) // T`` windows once.

The order of an epoch is shuffled at two levels, a pure function of ``(seed, epoch, position)``:
the windows are cut into pieces of ``piece_windows`` consecutive windows, the pieces are put in a
random order, and the windows of each run of ``buffer_pieces`` consecutive pieces of that order
(the shuffle buffer) are shuffled together. Any two windows of one buffer are equally likely
neighbours; windows of different buffers never are. Bounded pieces and buffers keep what a
stretch of training reads to the pieces of one buffer, which a loader could fetch alone.

Positions count windows from the start of training across epochs: position ``g`` is position
``g mod n`` of epoch ``g div n``. Training consumes them in order, ``global_batch_size`` per
step; rank ``r`` of ``W`` takes every ``W``-th position of each micro-step, starting at ``r``
(``rank_positions``). The global sequence of windows therefore depends on neither the world size
nor the loader's threads, and a run resumed at position ``g`` (its checkpoint records it)
continues it: no window repeated, none skipped.

Opening a split reads only each shard's Arrow footer, never its tokens; given the token manifest's
counts, not even that. Through a ``data.streaming.ShardCache``, a shard on an object store is read
by the record batches holding the windows of training's current and next buffer (of validation's
current and next batch), fetched as training nears them; a window that runs past a batch's or a
shard's end plans the next one's too. A shard's bytes are checked when first read: each streamed
batch against its shard's batch index, a whole shard against its commit's content hash when a
store is given (the training stage's case), and, for every read, each window's ids against the
vocabulary. The ids a shard holds are below its tokenizer's vocabulary by construction
(``data.tokenize``), so each check fails only for bytes altered after the shard was written; the
error names the shard.
"""

from __future__ import annotations

import collections
import functools
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from gptflow.data.commits import corrupt_artifact
from gptflow.data.errors import CorpusError
from gptflow.data.shard_reader import TokenShard
from gptflow.data.store import ArtifactStore
from gptflow.data.streaming import ShardCache

PIECE_TOKENS = 1 << 20
"""About how many tokens a piece of the first shuffle level holds (rounded to whole windows)."""
BUFFER_PIECES = 256
"""Pieces whose windows are shuffled together: 256 Mi tokens (512 MB of uint16 shards) by default.
The buffer holds window ids, not tokens; what it bounds is how many pieces a stretch of training
reads from (``bench/shuffle_quality.py`` measures what that costs the shuffle)."""
MIX_BLOCK = 4096
"""Positions of a mixture whose parts are dealt out at exactly the parts' weights."""
# Leading entropy words that keep the sampler's random streams apart.
PIECE_STREAM, BUFFER_STREAM, MIX_STREAM = 0x7069, 0x6275, 0x6D69


class TokenWindows:
    """The windows of ``block_size + 1`` tokens tiling the concatenation of token shards, whose ids
    must all be below ``vocab_size``. ``store``: the store the shards were committed to, whose
    content hashes each shard is checked against when first read. ``num_tokens``: each shard's
    token count (the token manifest's), so that no shard is opened before it is read. ``cache``:
    the shards stream from a workspace on an object store through it (``data.streaming``), and
    ``store`` is its store."""

    def __init__(self, paths: Sequence[Path], block_size: int, vocab_size: int, store: ArtifactStore | None = None,
                 piece_tokens: int = PIECE_TOKENS, buffer_pieces: int = BUFFER_PIECES,
                 num_tokens: Sequence[int] | None = None, cache: ShardCache | None = None) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if not paths:
            raise ValueError("TokenWindows needs at least one token shard, got none")
        self.block_size = block_size
        self.vocab_size = vocab_size
        if num_tokens is not None and len(num_tokens) != len(paths):
            raise ValueError(f"got {len(num_tokens)} token counts for {len(paths)} shards")
        self.store = cache.store if cache is not None else store
        self.cache = cache
        self.paths = [Path(path) for path in paths]
        counts = [None] * len(self.paths) if num_tokens is None else num_tokens
        self.shards = [TokenShard(path, count) for path, count in zip(self.paths, counts)]
        self.shard_starts = np.cumsum([0, *(shard.num_tokens for shard in self.shards)])
        self.num_tokens = int(self.shard_starts[-1])
        if self.num_tokens < block_size + 1:
            raise CorpusError(
                f"The token shards hold {self.num_tokens} tokens in all ({len(self.paths)} files, e.g. "
                f"{self.paths[0]}), fewer than one window of block_size + 1 = {block_size + 1}. "
                "Lower model.block_size or add more text to the corpus."
            )
        self.num_windows = (self.num_tokens - 1) // block_size
        self.piece_windows = max(1, piece_tokens // block_size)
        self.buffer_pieces = buffer_pieces
        self._opening = threading.Lock()
        self._buffer_read: tuple[int, ...] | None = None  # (seed, stream, epoch, buffer) last planned in the cache

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the stream, their ids checked against the vocabulary."""
        parts, shard_index = [], int(np.searchsorted(self.shard_starts, start, side="right")) - 1
        while length > 0:
            shard = self.shards[shard_index]
            offset = start - int(self.shard_starts[shard_index])
            if offset == shard.num_tokens:  # an empty shard
                shard_index += 1
                continue
            taken = self._read_shard(shard, offset, min(length, shard.num_tokens - offset))
            if len(taken) and int(taken.max()) >= self.vocab_size:
                raise corrupt_artifact(shard.path, f"holds token id {int(taken.max())}, beyond the vocabulary of "
                                                   f"{self.vocab_size} ids")
            parts.append(taken)
            start, length, shard_index = start + len(taken), length - len(taken), shard_index + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _read_shard(self, shard: TokenShard, offset: int, length: int) -> np.ndarray:
        index = self.cache.batch_index(shard.path) if self.cache is not None else None
        if index is not None:
            return shard.read_batches(self.cache, index, offset, length)
        if self.cache is not None and shard.chunks is None:
            self.cache.wait_for(shard.path.parent)
        with self._opening:
            shard.open(self.store)
        return shard.read(offset, length)

    def window_ids(self, seed: int, positions: np.ndarray, stream: int = 0) -> np.ndarray:
        """The window at each of ``positions`` (see the module docstring); ``stream`` tells apart
        the orders of streams that share a seed (a mixture's parts). With a cache, the shards of
        the buffer of the first position and of the next buffer are planned in it."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.cache is not None and len(positions):
            self._plan_buffers(seed, stream, int(positions.min()))
        return epoch_order(self.num_windows, self.piece_windows, self.buffer_pieces, seed, stream, positions)

    def _plan_buffers(self, seed: int, stream: int, position: int) -> None:
        """Plan the token spans of ``position``'s buffer and the next in the cache."""
        epoch, offset = divmod(position, self.num_windows)
        ends = _buffer_ends(self.num_windows, self.piece_windows, self.buffer_pieces, seed, stream, epoch)
        buffer = int(np.searchsorted(ends, offset, side="right"))
        if self._buffer_read == (seed, stream, epoch, buffer):
            return
        self._buffer_read = (seed, stream, epoch, buffer)
        following = (epoch, buffer + 1) if buffer + 1 < len(ends) else (epoch + 1, 0)
        self._plan(("train", stream), self._buffer_windows(seed, stream, epoch, buffer),
                   self._buffer_windows(seed, stream, *following))

    def _buffer_windows(self, seed: int, stream: int, epoch: int, buffer: int) -> list[tuple[int, int]]:
        """The windows of a buffer's pieces, as runs ``[first, end)`` of window ids, in the order
        the epoch first reads each piece."""
        windows = _buffer_windows(self.num_windows, self.piece_windows, self.buffer_pieces, seed, stream, epoch, buffer)
        pieces, first_visit = np.unique(windows // self.piece_windows, return_index=True)
        return [(int(piece) * self.piece_windows, min((int(piece) + 1) * self.piece_windows, self.num_windows))
                for piece in pieces[np.argsort(first_visit)]]

    def _plan(self, reader: object, now: Sequence[tuple[int, int]], ahead: Sequence[tuple[int, int]]) -> None:
        """Plan in the cache the token spans of the shards that the runs of windows ``now`` and
        ``ahead`` read, and unmap the shards read whole that neither reads (a mapping would keep an
        evicted copy's disk space; the cache unmaps the record batches it maps itself)."""
        now_spans, ahead_spans = self._token_spans(now), self._token_spans(ahead)
        read = {index for index, _, _ in [*now_spans, *ahead_spans]}
        with self._opening:
            for index, shard in enumerate(self.shards):
                if index not in read:
                    shard.chunks = None
        self.cache.plan((id(self), reader), [(self.paths[index], first, end) for index, first, end in now_spans],
                        [(self.paths[index], first, end) for index, first, end in ahead_spans])

    def _token_spans(self, runs: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
        """``(shard, first token, end token)`` of what the runs of windows ``[first, end)`` read, in order."""
        spans = []
        for first_window, end_window in runs:
            start, stop = first_window * self.block_size, end_window * self.block_size + 1
            shard = int(np.searchsorted(self.shard_starts, start, side="right")) - 1
            while start < stop and shard < len(self.shards):
                shard_end = int(self.shard_starts[shard + 1])
                if start < shard_end:
                    offset = int(self.shard_starts[shard])
                    spans.append((shard, start - offset, min(stop, shard_end) - offset))
                    start = min(stop, shard_end)
                shard += 1
        return spans

    def read_windows(self, ids: Iterable[int]) -> np.ndarray:
        """The windows ``ids`` of the tiling, as rows of ``block_size + 1`` tokens."""
        return np.stack([self.read(int(index) * self.block_size, self.block_size + 1) for index in ids])

    def window_sources(self, seed: int, positions: np.ndarray) -> np.ndarray:
        """``(part, window id)`` of each of ``positions``, as rows; a single stream is part 0."""
        ids = self.window_ids(seed, positions)
        return np.stack([np.zeros_like(ids), ids], axis=1)

    def batch(self, seed: int, positions: np.ndarray, pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, int64 of shape ``(len(positions), block_size)``, of the windows at
        ``positions``. ``pin_memory`` allocates page-locked tensors for an asynchronous copy to CUDA."""
        return _to_inputs_and_targets(self.read_windows(self.window_ids(seed, positions)), pin_memory)

    def evaluation_batches(
        self, batch_size: int, max_tokens: int, pin_memory: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Windows spread evenly over the whole stream, for evaluation: a pure function of the
        shards and ``max_tokens``, every target token scored at most once, reading only the
        shards that hold them.

        Of the tiling's windows, ``max_tokens // block_size`` (at least one, at most all) are
        scored: the middle window of each of as many equal runs, in stream order. Every budget thus
        samples the same windows evenly, and its mean loss estimates the whole stream's, not
        that of its start (a split's first source or documents, which may differ from the rest);
        a budget that covers the stream scores every window. The last batch may hold fewer than
        ``batch_size`` windows.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        n_windows = min(max(1, max_tokens // self.block_size), self.num_windows)
        # Run i spans windows [i, i + 1) · num_windows / n_windows; its middle is (i + 1/2) · num_windows / n_windows.
        ids = (2 * np.arange(n_windows) + 1) * self.num_windows // (2 * n_windows)
        for first in range(0, n_windows, batch_size):
            if self.cache is not None:  # the batches of this evaluation batch's windows and the next's
                self._plan("evaluation", [(int(i), int(i) + 1) for i in ids[first : first + batch_size]],
                           [(int(i), int(i) + 1) for i in ids[first + batch_size : first + 2 * batch_size]])
            yield _to_inputs_and_targets(self.read_windows(ids[first : first + batch_size]), pin_memory)


class MixedWindows:
    """Windows from several ``TokenWindows`` at fixed weights, e.g. new data at 50% and the data a
    model was already trained on at 50% when training continues on a grown corpus.

    Each part runs through epochs of its own, in its own shuffled order: a part's epoch is one
    visit of each of its windows, so a small part of a large weight repeats more often than a
    large one. Positions are dealt to parts in blocks of ``MIX_BLOCK`` (at least the square of the
    number of parts): the first ``b`` blocks hold ``floor(b · MIX_BLOCK · weight)`` positions of
    each part but the heaviest, which takes the rest, and each block's share is shuffled by
    ``(seed, block)``. Weights hold to within one window per part per block, and a part's own
    position at any global position is known without counting the ones before it."""

    def __init__(self, parts: Sequence[tuple[TokenWindows, float]]) -> None:
        parts = [(windows, weight) for windows, weight in parts if weight > 0]
        if not parts:
            raise ValueError("MixedWindows needs at least one part with a positive weight")
        if len({windows.block_size for windows, _ in parts}) != 1:
            raise ValueError("every part of a MixedWindows must have the same block_size")
        self.parts = [windows for windows, _ in parts]
        total = sum(weight for _, weight in parts)
        self.weights = tuple(weight / total for _, weight in parts)
        self.block_size = self.parts[0].block_size
        self.mix_block = max(MIX_BLOCK, len(self.parts) ** 2)

    def window_sources(self, seed: int, positions: np.ndarray) -> np.ndarray:
        """``(part, window id)`` of each of ``positions``, as rows (see the class docstring)."""
        positions = np.asarray(positions, dtype=np.int64)
        blocks, offsets = np.divmod(positions, self.mix_block)
        parts, local = np.empty_like(positions), np.empty_like(positions)
        for block in np.unique(blocks):
            in_block = blocks == block
            block_parts, block_local = _mix_block(self.weights, self.mix_block, seed, int(block))
            parts[in_block], local[in_block] = block_parts[offsets[in_block]], block_local[offsets[in_block]]
        ids = np.empty_like(positions)
        for part in np.unique(parts):
            ids[parts == part] = self.parts[part].window_ids(seed, local[parts == part], stream=int(part) + 1)
        return np.stack([parts, ids], axis=1)

    def batch(self, seed: int, positions: np.ndarray, pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``TokenWindows.batch``, each window from its part."""
        sources = self.window_sources(seed, positions)
        windows = np.stack([self.parts[part].read_windows([index])[0] for part, index in sources])
        return _to_inputs_and_targets(windows, pin_memory)


def epoch_order(num_windows: int, piece_windows: int, buffer_pieces: int, seed: int, stream: int,
                positions: np.ndarray) -> np.ndarray:
    """The window id at each of ``positions`` of the endless sequence of shuffled epochs over
    ``num_windows`` windows (see the module docstring): a pure function of its arguments."""
    positions = np.asarray(positions, dtype=np.int64)
    ids = np.empty_like(positions)
    epochs, offsets = np.divmod(positions, num_windows)
    for epoch in np.unique(epochs):
        in_epoch = epochs == epoch
        buffer_ends = _buffer_ends(num_windows, piece_windows, buffer_pieces, seed, stream, int(epoch))
        buffers = np.searchsorted(buffer_ends, offsets[in_epoch], side="right")
        found = np.empty(int(in_epoch.sum()), dtype=np.int64)
        for buffer in np.unique(buffers):
            mine = buffers == buffer
            windows = _buffer_windows(num_windows, piece_windows, buffer_pieces, seed, stream, int(epoch), int(buffer))
            first = int(buffer_ends[buffer - 1]) if buffer else 0
            found[mine] = windows[offsets[in_epoch][mine] - first]
        ids[in_epoch] = found
    return ids


def rank_positions(first: int, micro_batch_size: int, rank: int, world_size: int) -> np.ndarray:
    """The positions of ``rank``'s rows of the global micro-batch of ``micro_batch_size · world_size``
    windows that starts at position ``first``: every ``world_size``-th, from ``first + rank``."""
    return first + rank + world_size * np.arange(micro_batch_size, dtype=np.int64)


def prefetch_batches(
    windows: TokenWindows | MixedWindows,
    seed: int,
    positions: Iterable[np.ndarray],
    pin_memory: bool = False,
    depth: int = 2,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batch of each array of ``positions`` in order, read ``depth`` ahead on a background
    thread, so reading windows (and a shard's first opening) overlaps the device's work. Batches
    are those ``batch`` gives: prefetching changes when they are made, not what they are."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptflow-prefetch") as pool:
        pending: collections.deque[Future] = collections.deque()
        for batch_positions in positions:
            pending.append(pool.submit(windows.batch, seed, batch_positions, pin_memory))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# Two epochs' orders at most: the one being read and, across its end, the next.
@functools.lru_cache(maxsize=2)
def _piece_order(num_windows: int, piece_windows: int, seed: int, stream: int, epoch: int) -> np.ndarray:
    n_pieces = -(-num_windows // piece_windows)
    return np.random.default_rng([PIECE_STREAM, seed, stream, epoch]).permutation(n_pieces)


@functools.lru_cache(maxsize=2)
def _buffer_ends(num_windows: int, piece_windows: int, buffer_pieces: int, seed: int, stream: int,
                 epoch: int) -> np.ndarray:
    """Where each shuffle buffer of the epoch ends, in positions of the epoch."""
    order = _piece_order(num_windows, piece_windows, seed, stream, epoch)
    sizes = np.minimum(piece_windows, num_windows - order * piece_windows)
    cumulative = np.cumsum(sizes)
    # The last entry of each run of buffer_pieces pieces; the last run may be shorter.
    return cumulative[np.minimum(np.arange(buffer_pieces - 1, len(order) + buffer_pieces - 1, buffer_pieces),
                                 len(order) - 1)]


@functools.lru_cache(maxsize=8)
def _buffer_windows(num_windows: int, piece_windows: int, buffer_pieces: int, seed: int, stream: int, epoch: int,
                    buffer: int) -> np.ndarray:
    """The window ids of one shuffle buffer, in the order the epoch visits them."""
    order = _piece_order(num_windows, piece_windows, seed, stream, epoch)
    pieces = order[buffer * buffer_pieces : (buffer + 1) * buffer_pieces]
    windows = np.concatenate([np.arange(piece * piece_windows, min((piece + 1) * piece_windows, num_windows))
                              for piece in pieces])
    return np.random.default_rng([BUFFER_STREAM, seed, stream, epoch, buffer]).permutation(windows)


@functools.lru_cache(maxsize=4)
def _mix_block(weights: tuple[float, ...], mix_block: int, seed: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Each position of one mixture block: its part, and its position in that part's own stream."""
    before, after = _mix_counts(weights, mix_block, block), _mix_counts(weights, mix_block, block + 1)
    parts = np.random.default_rng([MIX_STREAM, seed, block]).permutation(np.repeat(np.arange(len(weights)),
                                                                                   after - before))
    local = np.empty(mix_block, dtype=np.int64)
    for part in range(len(weights)):
        mine = parts == part
        local[mine] = before[part] + np.arange(int(mine.sum()))
    return parts, local


def _mix_counts(weights: tuple[float, ...], mix_block: int, blocks: int) -> np.ndarray:
    """How many of the first ``blocks`` blocks' positions each part holds."""
    counts = np.floor(np.array(weights) * (blocks * mix_block)).astype(np.int64)
    counts[int(np.argmax(weights))] += blocks * mix_block - counts.sum()  # the heaviest part takes the rest
    return counts


def _to_inputs_and_targets(windows: np.ndarray, pin_memory: bool) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.from_numpy(windows[:, :-1].astype(np.int64))  # (B, T)
    targets = torch.from_numpy(windows[:, 1:].astype(np.int64))  # (B, T)
    if pin_memory:
        return inputs.pin_memory(), targets.pin_memory()
    return inputs, targets
