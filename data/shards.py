"""The files of a unit directory: raw segment shards (ingest's), token shards (tokenize's), and
the ``unit.json`` of counts each unit carries.

Raw shard ``docs-00000.arrow``: one row per segment (a document, or a piece of a long one),
columns ``text: large_string``, ``doc_hash: string``, ``split: string``, ``continues: bool``
(the text goes straight on from the previous row's: the next segment of the same document, none
dropped between), and the document's metadata, null where it has none: ``url: string`` (a WARC
page's), ``language: string`` and ``language_score: float32`` (with ``data.languages`` set); rows
in file order, ``doc_hash`` the segment's ``data.hashing.hash_bytes``,
written in record batches of bounded size and rolled over to a new file every ``shard_bytes`` of
text.

Token shard ``{train,val}.arrow``: one column ``tokens`` (uint16 when the vocabulary has at most
65,536 ids, else uint32), written only if it gets tokens. Tokenize writes it in record batches
of ``data.token_shards.BATCH_TOKENS``, beside its batch index (``data.token_shards``); tokenize
stages before the index wrote batches of ``TOKENS_PER_RECORD_BATCH`` and no index
(``TokenShardWriter``). Both are uncompressed Arrow IPC files, so readers can memory-map them and
touch only the columns they ask for.

This module's code stays as it is while only documentation changes: the code version of nearly
every stage covers it (through ``data.tokenizer``), so a change here reruns them all and trains
every kept tokenizer again. New token shard code goes in ``data.token_shards``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

UNIT_FILE = "unit.json"
RAW_SCHEMA = pa.schema([
    ("text", pa.large_string()), ("doc_hash", pa.string()), ("split", pa.string()), ("continues", pa.bool_()),
    ("url", pa.string()), ("language", pa.string()), ("language_score", pa.float32()),
])
RAW_SHARD_PREFIX = "docs-"
RAW_BATCH_BYTES = 4 << 20
"""Text bytes per raw record batch: what a reader holds in memory at once."""
TOKEN_COLUMN = "tokens"
TOKENS_PER_RECORD_BATCH = 1 << 20
SPLITS = ("train", "val")
SMALL_FILE_BYTES = 1 << 20
"""Shards up to this size are read outright rather than memory-mapped (see ``_open_ipc_file``)."""


def write_unit_file(directory: Path, value: dict[str, Any]) -> None:
    """Write a unit's ``unit.json`` (its counts) into the unit directory being filled.

    A plain write: the directory is committed atomically as a whole. Compact JSON, since this is
    written once per source file and the indenting encoder is ~10x slower.
    """
    (directory / UNIT_FILE).write_text(json.dumps(value, sort_keys=True))


def read_unit_file(directory: Path) -> dict[str, Any]:
    return json.loads((directory / UNIT_FILE).read_text())


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype holding every id below ``vocab_size``."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class RawShardWriter:
    """Streams segments into ``docs-00000.arrow``, ``docs-00001.arrow``, ... in ``directory``."""

    def __init__(self, directory: Path, shard_bytes: int) -> None:
        self.directory = directory
        self.shard_bytes = shard_bytes
        self.shard_names: list[str] = []
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._shard_text_bytes = 0
        self._columns: list[list[Any]] = [[] for _ in RAW_SCHEMA]
        self._pending_bytes = 0

    def write(self, text: str, doc_hash: str, split: str, continues: bool, n_bytes: int,
              url: str | None = None, language: tuple[str, float] | None = None) -> None:
        """Add one segment; ``n_bytes`` is its UTF-8 size, which the caller already knows; ``url``
        and ``language`` (code, score): its document's, if known."""
        language_code, language_score = language or (None, None)
        for column, value in zip(self._columns, (text, doc_hash, split, continues, url, language_code, language_score)):
            column.append(value)
        self._pending_bytes += n_bytes
        if self._pending_bytes >= min(RAW_BATCH_BYTES, self.shard_bytes):
            self._flush()

    def close(self) -> list[str]:
        """Finish the last shard; returns the shard file names, in order."""
        self._flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        return self.shard_names

    def _flush(self) -> None:
        if not self._columns[0]:
            return
        if self._writer is None:
            name = f"{RAW_SHARD_PREFIX}{len(self.shard_names):05d}.arrow"
            self.shard_names.append(name)
            self._writer = pa.ipc.new_file(str(self.directory / name), RAW_SCHEMA)
        self._writer.write_batch(pa.record_batch([pa.array(column, field.type) for column, field in
                                                  zip(self._columns, RAW_SCHEMA)], schema=RAW_SCHEMA))
        self._shard_text_bytes += self._pending_bytes
        self._columns = [[] for _ in RAW_SCHEMA]
        self._pending_bytes = 0
        if self._shard_text_bytes >= self.shard_bytes:
            self._writer.close()
            self._writer = None
            self._shard_text_bytes = 0


def raw_shard_paths(directory: Path) -> list[Path]:
    return [directory / name for name in sorted(os.listdir(directory)) if name.startswith(RAW_SHARD_PREFIX)]


def iter_raw_batches(directory: Path, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    """Record batches of a raw unit's shards, in file order, holding only ``columns``.

    Large shards are memory-mapped, so columns not asked for are never read from disk.
    """
    for path in raw_shard_paths(directory):
        reader = _open_ipc_file(path)
        for index in range(reader.num_record_batches):
            yield reader.get_batch(index).select(list(columns))


def _open_ipc_file(path: Path) -> pa.ipc.RecordBatchFileReader:
    # Setting up a memory map costs ~4x more than reading a small file outright (measured on
    # 700 stdlib-sized shards); only large files gain from mapping. Arrow keeps the map open
    # for as long as any batch read from it is alive.
    if path.stat().st_size <= SMALL_FILE_BYTES:
        return pa.ipc.open_file(pa.py_buffer(path.read_bytes()))
    return pa.ipc.open_file(pa.memory_map(str(path)))


class TokenShardWriter:
    """Streams token arrays into one token shard as tokenize wrote them before the batch index
    (``data.token_shards.IndexedShardWriter`` writes them now): re-batched into record batches of
    at most ``TOKENS_PER_RECORD_BATCH`` tokens whatever sizes the arrays come in, with no index, so
    that a streaming reader fetches the shard whole. Kept for tests of such shards, and as the
    module's code (see its docstring).

    The file is created with the first tokens: a shard that would be empty is not written at all
    (most small source files have no validation documents, and file creation is not free).
    """

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.schema = pa.schema([(TOKEN_COLUMN, pa.from_numpy_dtype(self.dtype))])
        self.n_tokens = 0
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0

    def write(self, tokens: np.ndarray) -> None:
        if tokens.dtype != self.dtype:
            raise TypeError(f"token shard holds {self.dtype}, got {tokens.dtype}")
        self._pending.append(tokens)
        self._pending_tokens += len(tokens)
        self.n_tokens += len(tokens)
        if self._pending_tokens >= TOKENS_PER_RECORD_BATCH:
            self._flush(keep_remainder=True)

    def close(self) -> None:
        self._flush(keep_remainder=False)
        if self._writer is not None:
            self._writer.close()

    def _flush(self, keep_remainder: bool) -> None:
        if not self._pending:
            return
        tokens = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        full = len(tokens) - len(tokens) % TOKENS_PER_RECORD_BATCH if keep_remainder else len(tokens)
        if self._writer is None and full:
            self._writer = pa.ipc.new_file(str(self.path), self.schema)
        for start in range(0, full, TOKENS_PER_RECORD_BATCH):
            batch = tokens[start : min(start + TOKENS_PER_RECORD_BATCH, full)]
            self._writer.write_batch(pa.record_batch([pa.array(batch)], schema=self.schema))
        self._pending = [tokens[full:]] if full < len(tokens) else []
        self._pending_tokens = len(tokens) - full


def iter_token_arrays(path: Path) -> Iterator[np.ndarray]:
    """The record batches of a token shard as read-only numpy arrays (views of the file's bytes)."""
    reader = _open_ipc_file(path)
    for index in range(reader.num_record_batches):
        yield reader.get_batch(index).column(0).to_numpy()
