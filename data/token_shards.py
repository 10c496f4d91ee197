"""Token shards as tokenize writes them: ``{train,val}.arrow`` in each ``tokens/<key>/`` unit
directory, with their batch indexes (the loader reads them through ``data.shard_reader``).

A token shard is an uncompressed Arrow IPC file of one column ``tokens`` (uint16 when the
vocabulary has at most 65,536 ids, else uint32) in record batches of ``BATCH_TOKENS``
(the last fewer), written only if it gets tokens, beside its batch index
``{train,val}.batches.json`` (``BatchIndex``): each batch's byte range in the file, token count
and content hash, so that a reader on an object store fetches and checks only the batches it
reads (``data.streaming``), and reads each as the Arrow IPC message it is (``batch_tokens``).
Beside them, ``{train,val}.token_counts.npz`` holds how often each id occurs in the shard (arrays
``ids``, those that occur, and ``counts``, each in the narrowest dtype that holds it: at most a few
bytes per distinct id), so that statistics over a split (the unigram baseline, ``data.stats``)
read kilobytes per shard, not the shard.
Shards tokenized by versions before the index have none (and record batches of 1 Mi tokens): they
are fetched whole, and read as every local shard is, memory-mapped (``data.shard_reader``).

What the tokenize stage writes is here, and only that: its code version covers this module.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from gptflow.data.hashing import hash_bytes
from gptflow.data.shards import TOKEN_COLUMN

BATCH_TOKENS = 1 << 15
"""The unit a streamed shard is fetched and checked in (64 KB of uint16 ids): a piece of training's
order (``data.loader.PIECE_TOKENS``, 32 batches) fetches at most the batch at either end beyond it."""
BATCH_INDEX_SUFFIX = ".batches.json"
TOKEN_COUNTS_SUFFIX = ".token_counts.npz"


class IndexedShardWriter:
    """Streams token arrays into one token shard, re-batched into record batches of
    ``tokens_per_batch`` (the last fewer) whatever sizes the arrays come in, and writes its
    ``BatchIndex`` beside it on ``close``.

    The file is created with the first tokens: a shard that would be empty is not written at all
    (most small source files have no validation documents, and file creation is not free).
    """

    def __init__(self, path: Path, dtype: np.dtype, tokens_per_batch: int = BATCH_TOKENS) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.tokens_per_batch = tokens_per_batch
        self.schema = pa.schema([(TOKEN_COLUMN, pa.from_numpy_dtype(self.dtype))])
        self.n_tokens = 0
        self._sink: pa.OSFile | None = None
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0
        self._batch_ends: list[int] = []
        self._batch_tokens: list[int] = []
        self._first_batch_bytes = 0
        self._id_counts = np.zeros(0, dtype=np.int64)

    def write(self, tokens: np.ndarray) -> None:
        if tokens.dtype != self.dtype:
            raise TypeError(f"token shard holds {self.dtype}, got {tokens.dtype}")
        self._pending.append(tokens)
        self._pending_tokens += len(tokens)
        counts = np.bincount(tokens)
        if len(counts) > len(self._id_counts):
            self._id_counts = np.pad(self._id_counts, (0, len(counts) - len(self._id_counts)))
        self._id_counts[: len(counts)] += counts
        self.n_tokens += len(tokens)
        if self._pending_tokens >= self.tokens_per_batch:
            self._flush(keep_remainder=True)

    def close(self) -> None:
        self._flush(keep_remainder=False)
        if self._writer is None:
            return
        self._writer.close()
        self._sink.close()
        # The first batch follows the file's magic bytes and schema, which the writer writes with it.
        first = self._batch_ends[0] - self._first_batch_bytes
        offsets = [first, *self._batch_ends[:-1]]
        lengths = [end - start for start, end in zip(offsets, self._batch_ends)]
        with open(self.path, "rb") as shard:
            hashes = [hash_bytes(read_at(shard, start, length)) for start, length in zip(offsets, lengths)]
        index = BatchIndex(self.dtype.name, offsets, lengths, self._batch_tokens, hashes)
        batch_index_path(self.path).write_text(json.dumps(index.to_json()))
        ids = np.flatnonzero(self._id_counts)
        counts = self._id_counts[ids]
        np.savez(token_counts_path(self.path), ids=ids.astype(np.min_scalar_type(ids[-1])),
                 counts=counts.astype(np.min_scalar_type(counts.max())))

    def _flush(self, keep_remainder: bool) -> None:
        if not self._pending:
            return
        tokens = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        full = len(tokens) - len(tokens) % self.tokens_per_batch if keep_remainder else len(tokens)
        if self._writer is None and full:
            self._sink = pa.OSFile(str(self.path), "wb")
            self._writer = pa.ipc.new_file(self._sink, self.schema)
        for start in range(0, full, self.tokens_per_batch):
            batch = pa.record_batch([pa.array(tokens[start : min(start + self.tokens_per_batch, full)])],
                                    schema=self.schema)
            if not self._batch_ends:
                self._first_batch_bytes = batch.serialize().size
            self._writer.write_batch(batch)
            self._batch_ends.append(self._sink.tell())
            self._batch_tokens.append(batch.num_rows)
        self._pending = [tokens[full:]] if full < len(tokens) else []
        self._pending_tokens = len(tokens) - full


@dataclasses.dataclass(frozen=True)
class BatchIndex:
    """Where each record batch of a token shard lies in its file (``offsets``, ``lengths`` in
    bytes), how many tokens it holds, and its content hash (``data.hashing.hash_bytes``)."""

    dtype: str
    offsets: list[int]
    lengths: list[int]
    tokens: list[int]
    hashes: list[str]

    def to_json(self) -> dict[str, object]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, value: dict[str, object]) -> BatchIndex:
        return cls(**value)

    @functools.cached_property
    def token_starts(self) -> np.ndarray:
        """The shard's token offset of each batch's first token, and its token count last."""
        return np.cumsum([0, *self.tokens])

    def schema(self) -> pa.Schema:
        return pa.schema([(TOKEN_COLUMN, pa.from_numpy_dtype(np.dtype(self.dtype)))])


def batch_index_path(shard: Path) -> Path:
    """Where the ``BatchIndex`` of the token shard ``shard`` lies: ``train.batches.json`` beside ``train.arrow``."""
    return shard.with_name(shard.stem + BATCH_INDEX_SUFFIX)


def token_counts_path(shard: Path) -> Path:
    """Where the id counts of the token shard ``shard`` lie: ``train.token_counts.npz`` beside ``train.arrow``."""
    return shard.with_name(shard.stem + TOKEN_COUNTS_SUFFIX)


def batch_tokens(message: pa.Buffer, index: BatchIndex) -> np.ndarray:
    """The tokens of one record batch of a shard, from its bytes (a range ``index`` gives), zero-copy."""
    batch = pa.ipc.read_record_batch(pa.ipc.read_message(message), index.schema())
    return batch.column(0).to_numpy(zero_copy_only=True)


def read_at(file: object, start: int, length: int) -> bytes:
    """Bytes ``[start, start + length)`` of the open binary ``file``: a record batch of a shard."""
    file.seek(start)
    return file.read(length)
