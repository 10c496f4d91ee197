"""Training windows over memory-mapped token shards.

The shards of a split are read as one token stream, in the order given. Every stretch of
continuous text already ends with the end-of-text token, so a window that runs from the end of
one shard into the next is no different from one that runs from one document into the next; and
a corpus of many small files (shorter than a window each) still contributes every token. A window is ``block_size + 1``
consecutive tokens: the model reads the first ``block_size`` and predicts the last ``block_size``.

Random windows are a pure function of ``(seed, step, micro_step, rank, world_size)``, so a run
resumed from a checkpoint at step ``s`` sees exactly the batches an uninterrupted run sees from
step ``s`` on, with no sampler state to save.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from gptflow.data.commits import corrupt_artifact
from gptflow.data.errors import CorpusError

TOKEN_COLUMN = "tokens"
TOKEN_TYPES = (pa.uint16(), pa.uint32())


def _read_chunks(path: Path, vocab_size: int) -> list[np.ndarray]:
    """Zero-copy views of one shard's memory-mapped record batches, every id checked to be below
    ``vocab_size`` (an id beyond it would index past the embedding, or train on garbage)."""
    # The table's buffers keep the mapping alive after the file is closed, so thousands of
    # shards do not hold thousands of file descriptors.
    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_file(source).read_all()
    if TOKEN_COLUMN not in table.column_names:
        raise ValueError(f"{path}: expected a {TOKEN_COLUMN!r} column, found {table.column_names}")
    column = table.column(TOKEN_COLUMN)
    if column.type not in TOKEN_TYPES:
        raise ValueError(f"{path}: column {TOKEN_COLUMN!r} has type {column.type}, expected uint16 or uint32")
    largest = pc.max(column).as_py()
    if largest is not None and largest >= vocab_size:
        raise corrupt_artifact(path, f"holds token id {largest}, beyond the vocabulary of {vocab_size} ids")
    return [chunk.to_numpy(zero_copy_only=True) for chunk in column.chunks if len(chunk)]


class TokenWindows:
    """Windows of ``block_size + 1`` tokens drawn from the concatenation of token shards, whose ids
    must all be below ``vocab_size`` (refused with ``CorruptArtifactError`` when the shard opens)."""

    def __init__(self, paths: Sequence[Path], block_size: int, vocab_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if not paths:
            raise ValueError("TokenWindows needs at least one token shard, got none")
        self.block_size = block_size
        self.paths = [Path(path) for path in paths]
        self.chunks = [chunk for path in self.paths for chunk in _read_chunks(path, vocab_size)]
        self.chunk_starts = np.cumsum([0, *(len(chunk) for chunk in self.chunks)])
        self.num_tokens = int(self.chunk_starts[-1])
        if self.num_tokens < block_size + 1:
            raise CorpusError(
                f"The token shards hold {self.num_tokens} tokens in all ({len(self.paths)} files, e.g. "
                f"{self.paths[0]}), fewer than one window of block_size + 1 = {block_size + 1}. "
                "Lower model.block_size or add more text to the corpus."
            )

    @property
    def num_window_starts(self) -> int:
        """Distinct window positions that ``sample_batch`` draws from."""
        return self.num_tokens - self.block_size

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the stream; a view when they lie in one chunk."""
        index = int(np.searchsorted(self.chunk_starts, start, side="right")) - 1
        offset = start - int(self.chunk_starts[index])
        chunk = self.chunks[index]
        if offset + length <= len(chunk):
            return chunk[offset : offset + length]
        pieces = [chunk[offset:]]
        remaining = length - len(pieces[0])
        while remaining > 0:
            index += 1
            pieces.append(self.chunks[index][:remaining])
            remaining -= len(pieces[-1])
        return np.concatenate(pieces)

    def sample_batch(self, seed: int, step: int, micro_step: int, batch_size: int, rank: int = 0, world_size: int = 1,
                     pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, int64 of shape ``(batch_size, block_size)``, of random windows.

        The windows depend only on the arguments. With ``world_size`` ranks, one global batch of
        ``batch_size * world_size`` windows is drawn and ``rank`` takes its slice, so the ranks
        together see exactly what one process with the whole batch would. ``pin_memory``
        allocates page-locked tensors so the copy to a CUDA device can be asynchronous.
        """
        rng = np.random.default_rng([seed, step, micro_step])
        starts = rng.integers(0, self.num_window_starts, size=batch_size * world_size)
        mine = starts[rank * batch_size : (rank + 1) * batch_size]
        windows = np.stack([self.read(int(start), self.block_size + 1) for start in mine])
        return _to_inputs_and_targets(windows, pin_memory)

    def evaluation_batches(
        self, batch_size: int, max_tokens: int, pin_memory: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Windows spread evenly over the whole stream, for evaluation: a pure function of the
        shards and ``max_tokens``, every target token scored at most once.

        The stream is cut into ``(num_tokens - 1) // block_size`` consecutive windows that do not
        overlap, and ``max_tokens // block_size`` of them (at least one, at most all) are scored:
        the middle window of each of as many equal runs, in stream order. Every budget thus
        samples the same windows evenly, and its mean loss estimates the whole stream's, not
        that of its start (a split's first source or documents, which may differ from the rest);
        a budget that covers the stream scores every window. The last batch may hold fewer than
        ``batch_size`` windows.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        n_tiles = (self.num_tokens - 1) // self.block_size
        n_windows = min(max(1, max_tokens // self.block_size), n_tiles)
        # Run i spans windows [i, i + 1) · n_tiles / n_windows; its middle is (i + 1/2) · n_tiles / n_windows.
        tiles = (2 * np.arange(n_windows) + 1) * n_tiles // (2 * n_windows)
        starts = tiles * self.block_size
        for first in range(0, n_windows, batch_size):
            batch = [self.read(int(start), self.block_size + 1) for start in starts[first : first + batch_size]]
            yield _to_inputs_and_targets(np.stack(batch), pin_memory)


class MixedWindows:
    """Windows drawn from several ``TokenWindows`` with fixed probabilities, e.g. new data at
    50% and the data a model was already trained on at 50% when training continues on a grown
    corpus. Like ``TokenWindows.sample_batch``, a pure function of its arguments."""

    def __init__(self, parts: Sequence[tuple[TokenWindows, float]]) -> None:
        parts = [(windows, weight) for windows, weight in parts if weight > 0]
        if not parts:
            raise ValueError("MixedWindows needs at least one part with a positive weight")
        if len({windows.block_size for windows, _ in parts}) != 1:
            raise ValueError("every part of a MixedWindows must have the same block_size")
        self.parts = [windows for windows, _ in parts]
        total = sum(weight for _, weight in parts)
        self.probabilities = np.array([weight / total for _, weight in parts])
        self.block_size = self.parts[0].block_size

    def sample_batch(self, seed: int, step: int, micro_step: int, batch_size: int, rank: int = 0, world_size: int = 1,
                     pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([seed, step, micro_step])
        total = batch_size * world_size
        chosen = rng.choice(len(self.parts), size=total, p=self.probabilities)
        fractions = rng.random(total)  # a uniform draw per window, scaled to its part's range
        windows = [
            self.parts[part].read(int(fraction * self.parts[part].num_window_starts), self.block_size + 1)
            for part, fraction in zip(chosen[rank * batch_size : (rank + 1) * batch_size],
                                      fractions[rank * batch_size : (rank + 1) * batch_size])
        ]
        return _to_inputs_and_targets(np.stack(windows), pin_memory)


def prefetch_batches(
    windows: TokenWindows | MixedWindows,
    seed: int,
    steps: range,
    accum_steps: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    depth: int = 2,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches of every (step, micro-step) in order, sampled ``depth`` ahead on a background
    thread, so reading windows and pinning them overlaps the device's work. Batches are the same
    as ``sample_batch`` gives: prefetching changes when they are made, not what they are."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptflow-prefetch") as pool:
        pending: collections.deque[Future] = collections.deque()
        for step in steps:
            for micro_step in range(accum_steps):
                pending.append(pool.submit(windows.sample_batch, seed, step, micro_step, batch_size,
                                           rank, world_size, pin_memory))
                if len(pending) > depth:
                    yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _to_inputs_and_targets(windows: np.ndarray, pin_memory: bool) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.from_numpy(windows[:, :-1].astype(np.int64))  # (B, T)
    targets = torch.from_numpy(windows[:, 1:].astype(np.int64))  # (B, T)
    if pin_memory:
        return inputs.pin_memory(), targets.pin_memory()
    return inputs, targets
