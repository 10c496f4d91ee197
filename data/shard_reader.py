"""How ``data.loader.TokenWindows`` reads one token shard (``TokenShard``): whole and memory-mapped,
from this machine's disk, or, streamed from an object store through a ``data.streaming.ShardCache``,
by the record batches its batch index (``data.token_shards.BatchIndex``) names.

Apart from ``data.token_shards`` (what tokenize writes), so that the tokenize stage's code version
does not cover how shards are read.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from gptflow.data.commits import corrupt_artifact
from gptflow.data.shards import TOKEN_COLUMN
from gptflow.data.token_shards import BatchIndex

if TYPE_CHECKING:
    from gptflow.data.store import ArtifactStore
    from gptflow.data.streaming import ShardCache

TOKEN_TYPES = (pa.uint16(), pa.uint32())


class TokenShard:
    """One token shard as ``data.loader.TokenWindows`` reads it: its token count, given or from the
    footer; its tokens mapped when first read, whole or (streamed) by its record batches."""

    def __init__(self, path: Path, num_tokens: int | None) -> None:
        self.path = path
        self.chunks: list[np.ndarray] | None = None
        self.chunk_starts: np.ndarray | None = None
        self.num_tokens = self._read_table().num_rows if num_tokens is None else num_tokens

    def _read_table(self) -> pa.Table:
        try:
            # Zero-copy: the table's buffers point into the mapping, which they keep alive after the
            # file is closed, so thousands of shards do not hold thousands of file descriptors.
            with pa.memory_map(str(self.path)) as source:
                table = pa.ipc.open_file(source).read_all()
        except (pa.ArrowInvalid, OSError) as error:
            raise corrupt_artifact(self.path, f"is not a whole token shard ({error})") from error
        if TOKEN_COLUMN not in table.column_names:
            raise ValueError(f"{self.path}: expected a {TOKEN_COLUMN!r} column, found {table.column_names}")
        if table.column(TOKEN_COLUMN).type not in TOKEN_TYPES:
            raise ValueError(f"{self.path}: column {TOKEN_COLUMN!r} has type {table.column(TOKEN_COLUMN).type}, "
                             "expected uint16 or uint32")
        return table

    def open(self, store: ArtifactStore | None) -> list[np.ndarray]:
        if self.chunks is None:
            if store is not None:
                store.verify_files([self.path])
            table = self._read_table()
            if table.num_rows != self.num_tokens:
                raise corrupt_artifact(self.path, f"holds {table.num_rows} tokens, not the {self.num_tokens} its "
                                                  "manifest counts")
            column = table.column(TOKEN_COLUMN)
            self.chunks = [chunk.to_numpy(zero_copy_only=True) for chunk in column.chunks if len(chunk)]
            self.chunk_starts = np.cumsum([0, *map(len, self.chunks)])
        return self.chunks

    def read(self, offset: int, length: int) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of the opened shard; a view when they lie in one chunk."""
        return _read_chunks(self.chunks, self.chunk_starts, offset, length)

    def read_batches(self, cache: ShardCache, index: BatchIndex, offset: int, length: int) -> np.ndarray:
        """Tokens ``[offset, offset + length)`` of a shard streamed by its record batches (``index``),
        each batch mapped from the cache's copy."""
        starts = index.token_starts
        if int(starts[-1]) != self.num_tokens:
            raise corrupt_artifact(self.path, f"holds {int(starts[-1])} tokens by its batch index, not the "
                                              f"{self.num_tokens} its manifest counts")
        first = int(np.searchsorted(starts, offset, side="right")) - 1
        last = int(np.searchsorted(starts, offset + length, side="left"))
        arrays = [cache.read_batch(self.path, batch) for batch in range(first, last)]
        return _read_chunks(arrays, starts[first : last + 1] - starts[first], offset - int(starts[first]), length)


def _read_chunks(chunks: list[np.ndarray], starts: np.ndarray, offset: int, length: int) -> np.ndarray:
    """Tokens ``[offset, offset + length)`` of consecutive ``chunks`` starting at token ``starts``;
    a view when they lie in one."""
    parts = []
    chunk = int(np.searchsorted(starts, offset, side="right")) - 1
    while length > 0:
        taken = chunks[chunk][offset - int(starts[chunk]) : offset - int(starts[chunk]) + length]
        parts.append(taken)
        offset, length, chunk = offset + len(taken), length - len(taken), chunk + 1
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
