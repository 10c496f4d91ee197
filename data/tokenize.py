"""Stage 3, tokenize: raw shards → memory-mappable token shards, one cached unit per source file.

Each raw unit becomes ``tokens/<key>/``: ``train.arrow`` and ``val.arrow`` (each only if that split
has tokens) and ``unit.json`` (tokens, bytes and segments per split; the bytes are the UTF-8 bytes
of the segments encoded, for bits per byte). The key covers this code, the tokenizer's hash, the
raw unit's text (``CorpusUnit.text_hash``) and its drop list, so a grown corpus re-tokenizes only
its new files, and a changed filter only the files whose kept text it changed. A unit of
work (``tokenize_units``) is a group of consecutive files of about ``batch_bytes`` of text, so
many small files share the tokenizer's batches; ``TokenManifest.paths(split)`` lists the shard
files that exist, and the manifest is written as ``manifests/tokens-<fingerprint>.json``.

The end-of-text id follows every stretch of continuous text: a whole document, or the
consecutive segments of one that went to the same split (a book reads as one text in train, not a
document every few kilobytes).

Speed is set by the tokenizer, and the stage adds little to it (bench/tokenize_throughput.py
measures both on the same texts):

- Segments are joined into items of about ``PIECE_CHARS``, each stretch followed by the literal
  end-of-text token, which the tokenizer's added-token matching turns into its id; items from many
  small files fill one batch, so tiny files do not starve the tokenizer's threads, and long
  segments are cut where the pre-tokenizer cuts anyway, so one huge file still uses every thread.
  Ingest cuts segments at such places too, so encoding them apart gives the tokens of the whole.
- The next batch is encoded (in Rust, without the GIL) while Python turns the previous batch's
  ids into numpy and writes them: the conversion, the costliest Python step, overlaps the encoding.
- Batches are bounded (``TokenizeConfig.batch_bytes``), so memory is too.

What it cannot hide is the fixed cost of committing one directory per source file (a few file
creations each): negligible for large files, but on a corpus of many small files on a filesystem
where creating files is slow it can rival the encoding itself.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
from tokenizers import Encoding, Tokenizer

from gptflow.data.code_version import code_version
from gptflow.data.commits import write_json_atomic
from gptflow.data.config import TokenizeConfig
from gptflow.data.hashing import hash_json
from gptflow.data.ingest import CorpusManifest, CorpusUnit
from gptflow.data.shards import SPLITS, UNIT_FILE, iter_raw_batches, token_dtype, write_unit_file
from gptflow.data.store import LOCAL_STORE, ArtifactStore, store_references
from gptflow.data.token_shards import IndexedShardWriter
from gptflow.data.tokenizer import EOT_TOKEN, TokenizerArtifact, load_tokenizer
from gptflow.data.units import PROGRESS_ARGUMENT, MapUnits, Progress, in_this_process

PIECE_CHARS = 16 * 1024
"""Target size of one encode item: small enough that a batch holds many (the tokenizer
parallelises over items), big enough that per-item overhead stays negligible."""
ENCODE_AHEAD = 1
"""Batches encoding while one is converted and written. One is enough to keep the tokenizer busy;
each more holds another batch's encodings (~100 bytes per token) in memory."""

# The byte-level pre-tokenizer (GPT-2's split pattern, which looks ahead but never behind) always
# ends a token at a letter or digit followed by a space or newline, and splits what follows the
# same way whatever came before: cutting a text there changes no token. ASCII only, so that no
# disagreement between Python's and the tokenizer's idea of a letter or a space can matter.
_TOKEN_BOUNDARY = re.compile(r"[A-Za-z0-9](?=[ \n])")



@dataclass
class TokenUnit:
    """One source file's tokens in the store."""

    source: str
    key: str
    directory: str
    n_tokens: dict[str, int]
    """Tokens per split, end-of-text tokens included."""
    n_bytes: dict[str, int]
    """UTF-8 bytes of the segments encoded, per split (for bits per byte)."""
    n_segments: dict[str, int]
    reused: bool


@dataclass
class TokenManifest:
    units: list[TokenUnit]
    dtype: str
    vocab_size: int
    eot_id: int
    tokenizer_hash: str
    corpus_fingerprint: str
    fingerprint: str
    """Hash of every unit's key: names exactly these token shards."""
    path: str = ""
    """Where the manifest was written (``manifests/tokens-<fingerprint>.json``)."""

    def paths(self, split: str) -> list[Path]:
        """The token shards holding ``split`` tokens, in source order (empty shards left out)."""
        return [Path(unit.directory) / f"{split}.arrow" for unit in self.units if unit.n_tokens[split]]

    def shard_tokens(self, split: str) -> list[int]:
        """The token count of each of ``paths(split)``, in order."""
        return [unit.n_tokens[split] for unit in self.units if unit.n_tokens[split]]

    def total_tokens(self, split: str) -> int:
        return sum(unit.n_tokens[split] for unit in self.units)

    def total_bytes(self, split: str) -> int:
        return sum(unit.n_bytes[split] for unit in self.units)

    def total_segments(self, split: str) -> int:
        return sum(unit.n_segments[split] for unit in self.units)

    def to_dict(self) -> dict[str, Any]:
        value = {**vars(self), "units": [dict(vars(unit)) for unit in self.units]}  # asdict: a slow deep copy
        value["totals"] = {
            split: {
                "tokens": self.total_tokens(split), "bytes": self.total_bytes(split),
                "segments": self.total_segments(split),
            }
            for split in SPLITS
        }
        return value

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> TokenManifest:
        fields = {name: item for name, item in value.items() if name not in ("units", "totals")}
        return cls(units=[TokenUnit(**unit) for unit in value["units"]], **fields)


def tokenize_corpus(manifest: CorpusManifest, tokenizer: TokenizerArtifact, config: TokenizeConfig, store_dir: Path,
                    progress: Progress | None = None, map_units: MapUnits = in_this_process,
                    artifacts: ArtifactStore = LOCAL_STORE) -> TokenManifest:
    """Tokenize every unit of ``manifest`` not already in the store (``artifacts``), in groups of
    consecutive units (``tokenize_units``, run through ``map_units``); ``progress(done, total)``
    counts segment bytes."""
    code = code_version(__name__)
    keys = [_unit_key(unit, tokenizer, code) for unit in manifest.units]
    directories = [store_dir / "tokens" / key for key in keys]
    # A unit in the store is reused by its counts alone: its shards stay where they are until read.
    unit_files = artifacts.read_files(directory / UNIT_FILE for directory in directories)
    counts = {index: json.loads(found) for index, found in enumerate(unit_files) if found is not None}
    reused = set(counts)
    pending = [index for index in range(len(directories)) if index not in reused]

    total_bytes = sum(_unit_bytes(unit) for unit in manifest.units)
    done_bytes = total_bytes - sum(_unit_bytes(manifest.units[index]) for index in pending)
    if progress and not pending:
        progress(done_bytes, total_bytes)

    def advance(n_bytes: int) -> None:
        nonlocal done_bytes
        done_bytes += n_bytes
        if progress:
            progress(done_bytes, total_bytes)

    groups = _groups(pending, manifest.units, config.batch_bytes)
    calls = [{"units": [manifest.units[index] for index in group], "directories": [directories[index] for index in group],
              "tokenizer": tokenizer, "config": config, "artifacts": artifacts, PROGRESS_ARGUMENT: advance}
             for group in groups]
    expected_bytes = done_bytes
    for group, written in zip(groups, map_units(tokenize_units, calls)):
        counts.update(zip(group, written))
        expected_bytes += sum(_unit_bytes(manifest.units[index]) for index in group)
        if done_bytes < expected_bytes:  # a group run here reported its bytes as it went; one run elsewhere, now
            advance(expected_bytes - done_bytes)

    result = TokenManifest(
        units=[
            TokenUnit(
                source=unit.source, key=keys[index], directory=str(directories[index]),
                n_tokens=counts[index]["n_tokens"], n_bytes=counts[index]["n_bytes"],
                n_segments=counts[index]["n_segments"], reused=index in reused,
            )
            for index, unit in enumerate(manifest.units)
        ],
        dtype=token_dtype(tokenizer.vocab_size).name,
        vocab_size=tokenizer.vocab_size,
        eot_id=tokenizer.eot_id,
        tokenizer_hash=tokenizer.hash,
        corpus_fingerprint=manifest.fingerprint,
        fingerprint=hash_json(keys),
    )
    result.path = str(store_dir / "manifests" / f"tokens-{result.fingerprint}.json")
    write_json_atomic(Path(result.path), store_references(result.to_dict(), store_dir))
    artifacts.share(Path(result.path))
    return result


def tokenize_units(
    units: list[CorpusUnit],
    directories: list[Path],
    tokenizer: TokenizerArtifact,
    config: TokenizeConfig,
    artifacts: ArtifactStore,
    advance: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Write the token directory of each of ``units`` (encoded in shared batches); returns each
    one's ``unit.json`` content. ``advance(n)`` is called as each ``n`` bytes of segments are written."""
    if config.workers:
        # Read when the tokenizer first starts its thread pool; a pool already running keeps its size.
        os.environ["RAYON_NUM_THREADS"] = str(config.workers)
    artifacts.fetch_whole((Path(unit.directory) for unit in units), "tokenize")
    dtype = token_dtype(tokenizer.vocab_size)
    written = []
    encoded = _encoded(_batches(_pieces(units), config.batch_bytes), load_tokenizer(tokenizer), dtype)
    with contextlib.closing(encoded):
        current = next(encoded, None)
        for index, (unit, directory) in enumerate(zip(units, directories)):
            counts = {name: dict.fromkeys(SPLITS, 0) for name in ("n_tokens", "n_bytes", "n_segments")}
            with artifacts.commit(directory) as tmp:
                writers = {split: IndexedShardWriter(tmp / f"{split}.arrow", dtype) for split in SPLITS}
                while current is not None and current[0].unit == index:
                    piece, tokens = current
                    writers[piece.split].write(tokens)
                    counts["n_bytes"][piece.split] += piece.n_bytes
                    counts["n_segments"][piece.split] += piece.n_segments
                    if advance:
                        advance(piece.n_bytes)
                    current = next(encoded, None)
                for split, writer in writers.items():
                    writer.close()
                    counts["n_tokens"][split] = writer.n_tokens
                written.append({
                    "source": unit.source,
                    "raw_key": unit.key,
                    "tokenizer_hash": tokenizer.hash,
                    "dtype": dtype.name,
                    **counts,
                })
                write_unit_file(tmp, written[-1])
    return written


def _groups(pending: list[int], units: list[CorpusUnit], min_bytes: int) -> list[list[int]]:
    """``pending`` in consecutive groups of at least ``min_bytes`` of text (the last may hold less):
    a group is one unit of work, its encode batches full, and many groups keep many workers busy."""
    groups: list[list[int]] = []
    group_bytes = min_bytes
    for index in pending:
        if group_bytes >= min_bytes:
            groups.append([])
            group_bytes = 0
        groups[-1].append(index)
        group_bytes += _unit_bytes(units[index])
    return groups


def _unit_bytes(unit: CorpusUnit) -> int:
    return sum(unit.bytes.values())


def _unit_key(unit: CorpusUnit, tokenizer: TokenizerArtifact, code: str) -> str:
    return hash_json({
        "stage": "tokenize",
        "code": code,
        "tokenizer": tokenizer.hash,
        # The text tokenized, not its unit's key: a re-filter that keeps a file's text retokenizes nothing.
        "raw": unit.text_hash,
        "drop": hash_json(sorted(unit.drop_doc_hashes)),
    })


@dataclass
class _Piece:
    """One encode item: consecutive segments of one unit and split, each stretch of continuous
    text followed by the end-of-text token, or a leading part of one long segment."""

    unit: int
    split: str
    text: str
    n_segments: int
    """Segments that end in this piece."""
    n_bytes: int
    """UTF-8 bytes of the segments that end in this piece."""


class _PieceBuilder:
    def __init__(self, unit: int, split: str) -> None:
        self.unit = unit
        self.split = split
        self._reset()

    def add(self, text: str, n_bytes: int, ends_stretch: bool) -> Iterator[_Piece]:
        """Add one segment; the end-of-text token follows it if ``ends_stretch``."""
        *leading, last = cut_at_token_boundaries(text, PIECE_CHARS)
        if leading:
            yield from self.flush()
            yield from (_Piece(self.unit, self.split, part, 0, 0) for part in leading)
        self.parts += (last, EOT_TOKEN) if ends_stretch else (last,)
        self.chars += len(last)
        self.n_segments += 1
        self.n_bytes += n_bytes
        if self.chars >= PIECE_CHARS:
            yield from self.flush()

    def flush(self) -> Iterator[_Piece]:
        if self.parts:
            yield _Piece(self.unit, self.split, "".join(self.parts), self.n_segments, self.n_bytes)
            self._reset()

    def _reset(self) -> None:
        self.parts: list[str] = []
        self.chars = 0
        self.n_segments = 0
        self.n_bytes = 0


def cut_at_token_boundaries(text: str, min_chars: int) -> list[str]:
    """``text`` in parts of at least ``min_chars`` (the last may be shorter), cut only where the
    byte-level pre-tokenizer puts a token boundary anyway, so the parts encode to exactly the
    tokens of the whole. A text with no such place stays whole."""
    parts = []
    start = 0
    while len(text) - start > 2 * min_chars:
        cut = _TOKEN_BOUNDARY.search(text, start + min_chars)
        if cut is None or len(text) - cut.end() < min_chars:
            break
        parts.append(text[start : cut.end()])
        start = cut.end()
    parts.append(text[start:])
    return parts


def _pieces(units: list[CorpusUnit]) -> Iterator[_Piece]:
    for index, unit in enumerate(units):
        builders = {split: _PieceBuilder(index, split) for split in SPLITS}
        for text, n_bytes, split, ends_stretch in _segments(unit):
            yield from builders[split].add(text, n_bytes, ends_stretch)
        for builder in builders.values():
            yield from builder.flush()


def _segments(unit: CorpusUnit) -> Iterator[tuple[str, int, str, bool]]:
    """``(text, n_bytes, split, ends_stretch)`` of each segment of ``unit`` not dropped, in file
    order. A stretch goes on only into the next row, if that row continues it, is kept and went to
    the same split; so each segment is held until the next row is read."""
    dropped = set(unit.drop_doc_hashes)
    held: tuple[str, int, str] | None = None
    for batch in iter_raw_batches(Path(unit.directory), ["text", "doc_hash", "split", "continues"]):
        texts = batch.column("text").to_pylist()
        sizes = pc.binary_length(batch.column("text")).to_pylist()
        hashes = batch.column("doc_hash").to_pylist() if dropped else itertools.repeat(None)
        rows = zip(texts, sizes, hashes, batch.column("split").to_pylist(), batch.column("continues").to_pylist())
        for text, n_bytes, doc_hash, split, continues in rows:
            kept = doc_hash not in dropped
            if held is not None:
                yield *held, not (kept and continues and split == held[2])
            held = (text, n_bytes, split) if kept else None
    if held is not None:
        yield *held, True


def _batches(pieces: Iterator[_Piece], batch_chars: int) -> Iterator[list[_Piece]]:
    # Characters stand in for bytes: exact enough for sizing a batch, and free to count.
    batch: list[_Piece] = []
    chars = 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece.text)
        if chars >= batch_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encoded(
    batches: Iterator[list[_Piece]], tokenizer: Tokenizer, dtype: np.dtype
) -> Iterator[tuple[_Piece, np.ndarray]]:
    """Each piece with its token ids, in order. ``ENCODE_AHEAD`` batches are encoding (without the
    GIL) while the oldest is converted to numpy and yielded, so the two overlap."""
    encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
    queued: collections.deque[tuple[list[_Piece], Future[list[Encoding]]]] = collections.deque()
    try:
        for batch in batches:
            texts = [piece.text for piece in batch]
            queued.append((batch, encoder.submit(tokenizer.encode_batch_fast, texts, add_special_tokens=False)))
            if len(queued) > ENCODE_AHEAD:
                yield from _with_ids(*queued.popleft(), dtype)
        while queued:
            yield from _with_ids(*queued.popleft(), dtype)
    finally:
        encoder.shutdown(cancel_futures=True)


def _with_ids(
    batch: list[_Piece], encoded: Future[list[Encoding]], dtype: np.dtype
) -> Iterator[tuple[_Piece, np.ndarray]]:
    encodings = encoded.result()
    lengths = [len(encoding) for encoding in encodings]
    # One pass over all ids of the batch: the cheapest way found from Encoding.ids lists to numpy.
    ids = np.fromiter(itertools.chain.from_iterable(encoding.ids for encoding in encodings), dtype, sum(lengths))
    for piece, end, length in zip(batch, itertools.accumulate(lengths), lengths):
        yield piece, ids[end - length : end]
