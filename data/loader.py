"""Training windows over memory-mapped token shards.

A window is ``block_size + 1`` consecutive tokens of one shard: the model reads the first
``block_size`` and predicts the last ``block_size``. Windows never cross a shard boundary (the
end of one source file is not followed by the start of the next), but they do cross the record
batches inside a shard, which are only a writing unit.

Random windows are a pure function of ``(seed, step, micro_step, rank)``, so a run resumed from
a checkpoint at step ``s`` sees exactly the batches an uninterrupted run sees from step ``s`` on,
with no sampler state to save.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

TOKEN_COLUMN = "tokens"
TOKEN_TYPES = (pa.uint16(), pa.uint32())


class _Shard:
    """One token shard as zero-copy views of its memory-mapped record batches."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # The table's buffers keep the mapping alive after the file is closed, so thousands of
        # shards do not hold thousands of file descriptors.
        with pa.memory_map(str(path)) as source:
            table = pa.ipc.open_file(source).read_all()
        if TOKEN_COLUMN not in table.column_names:
            raise ValueError(f"{path}: expected a {TOKEN_COLUMN!r} column, found {table.column_names}")
        column = table.column(TOKEN_COLUMN)
        if column.type not in TOKEN_TYPES:
            raise ValueError(f"{path}: column {TOKEN_COLUMN!r} has type {column.type}, expected uint16 or uint32")
        self.chunks = [chunk.to_numpy(zero_copy_only=True) for chunk in column.chunks if len(chunk)]
        lengths = [len(chunk) for chunk in self.chunks]
        self.chunk_starts = np.cumsum([0, *lengths])
        self.num_tokens = int(self.chunk_starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)``; a view when they lie in one record batch."""
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


class TokenWindows:
    """Windows of ``block_size + 1`` tokens drawn from a set of token shards.

    Shards shorter than a window contribute none and are listed in ``short_shards``; it is an
    error only when no shard is long enough.
    """

    def __init__(self, paths: Sequence[Path], block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if not paths:
            raise ValueError("TokenWindows needs at least one token shard, got none")
        self.block_size = block_size
        shards = [_Shard(Path(path)) for path in paths]
        window = block_size + 1
        self.shards = [shard for shard in shards if shard.num_tokens >= window]
        self.short_shards = [shard.path for shard in shards if shard.num_tokens < window]
        if not self.shards:
            sizes = ", ".join(f"{shard.path} ({shard.num_tokens} tokens)" for shard in shards)
            raise ValueError(
                f"No token shard holds a window of block_size + 1 = {window} tokens: {sizes}. "
                "Lower model.block_size or add more text to the corpus."
            )
        self.num_tokens = sum(shard.num_tokens for shard in self.shards)
        # Window starts of shard i are the integers [start_offsets[i], start_offsets[i + 1]) of
        # one global range, so a uniform draw over it weights shards by their length.
        self._start_offsets = np.cumsum([0] + [shard.num_tokens - block_size for shard in self.shards])

    @property
    def num_window_starts(self) -> int:
        """Distinct window positions that ``sample_batch`` draws from."""
        return int(self._start_offsets[-1])

    def sample_batch(
        self,
        seed: int,
        step: int,
        micro_step: int,
        batch_size: int,
        rank: int = 0,
        pin_memory: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, int64 of shape ``(batch_size, block_size)``, of random windows.

        The windows depend only on the arguments. ``pin_memory`` allocates page-locked tensors so
        the copy to a CUDA device can be asynchronous (``.to(device, non_blocking=True)``).
        """
        rng = np.random.default_rng([seed, step, micro_step, rank])
        starts = rng.integers(0, self.num_window_starts, size=batch_size)
        shard_indices = np.searchsorted(self._start_offsets, starts, side="right") - 1
        windows = np.stack(
            [
                self.shards[shard_index].read(int(start - self._start_offsets[shard_index]), self.block_size + 1)
                for shard_index, start in zip(shard_indices, starts)
            ]
        )
        return _to_inputs_and_targets(windows, pin_memory)

    def sequential_batches(
        self, batch_size: int, max_tokens: int, pin_memory: bool = False
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping windows in shard order, for evaluation: every target token is scored
        at most once, and the same call always yields the same batches.

        Stops after ``max_tokens // block_size`` windows (at least one) or when the shards run
        out; the last batch may hold fewer than ``batch_size`` windows.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        windows_left = max(1, max_tokens // self.block_size)
        pending: list[np.ndarray] = []
        for shard in self.shards:
            for start in range(0, shard.num_tokens - self.block_size, self.block_size):
                pending.append(shard.read(start, self.block_size + 1))
                windows_left -= 1
                if len(pending) == batch_size or windows_left == 0:
                    yield _to_inputs_and_targets(np.stack(pending), pin_memory)
                    pending = []
                if windows_left == 0:
                    return
        if pending:
            yield _to_inputs_and_targets(np.stack(pending), pin_memory)


def _to_inputs_and_targets(windows: np.ndarray, pin_memory: bool) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.from_numpy(windows[:, :-1].astype(np.int64))  # (B, T)
    targets = torch.from_numpy(windows[:, 1:].astype(np.int64))  # (B, T)
    if pin_memory:
        return inputs.pin_memory(), targets.pin_memory()
    return inputs, targets
