"""Exact duplicates across files: each segment an earlier unit (in source-path order) already
holds goes on the later unit's ``drop_doc_hashes``, which tokenize honours; units themselves are
never rewritten, so one new file never invalidates the others."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gptflow.data.shards import iter_raw_batches

if TYPE_CHECKING:
    from gptflow.data.ingest import CorpusUnit

DEDUP_PARTITION_SEGMENTS = 1 << 18
"""Segment hashes cross-file dedup holds in memory at once (about 100 MB at its peak)."""


def drop_cross_file_duplicates(units: list[CorpusUnit]) -> None:
    """Give each unit the segments an earlier unit already holds (sorted), and take them off its counts.

    The corpus's segment hashes are split by value into partitions of about
    ``DEDUP_PARTITION_SEGMENTS``, each deduplicated in its own pass over the units: memory holds
    one partition's hashes (as 32-byte arrays, not Python strings), whatever the corpus's size,
    and every partition keeps the first occurrence in unit order, as one pass over all hashes
    would. Reads only the hash and split columns and the text offsets, never the texts.
    """
    partitions = max(1, -(-sum(sum(unit.segments.values()) for unit in units) // DEDUP_PARTITION_SEGMENTS))
    for partition in range(partitions):
        hashes, owners, in_val, sizes = [], [], [], []
        for index, unit in enumerate(units):
            for batch in iter_raw_batches(Path(unit.directory), ["text", "doc_hash", "split"]):
                digests = _digests(batch.column("doc_hash"))
                mine = _partition_of(digests, partitions) == partition
                hashes.append(digests[mine])
                owners.append(np.full(int(mine.sum()), index, dtype=np.int32))
                in_val.append(np.asarray(pc.equal(batch.column("split"), "val"), dtype=bool)[mine])
                sizes.append(np.asarray(pc.binary_length(batch.column("text")), dtype=np.int64)[mine])
        if not hashes:
            continue
        digests = np.concatenate(hashes)
        _, first = np.unique(digests, return_index=True)  # each hash's first occurrence, in unit order
        repeated = np.ones(len(digests), dtype=bool)
        repeated[first] = False
        owner = np.concatenate(owners)[repeated]
        val, size = np.concatenate(in_val)[repeated], np.concatenate(sizes)[repeated]
        for digest, index in zip(digests[repeated], owner.tolist()):
            units[index].drop_doc_hashes.append(digest.decode())
        for split, chosen in (("val", val), ("train", ~val)):
            counts = np.bincount(owner[chosen], minlength=len(units))
            dropped_bytes = np.bincount(owner[chosen], weights=size[chosen], minlength=len(units))
            for unit, count, n_bytes in zip(units, counts.tolist(), dropped_bytes.tolist()):
                unit.segments[split] -= count
                unit.bytes[split] -= int(n_bytes)
    for unit in units:
        unit.drop_doc_hashes.sort()
        unit.duplicates += len(unit.drop_doc_hashes)


_HEX_VALUES = np.zeros(256, dtype=np.uint32)
_HEX_VALUES[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16, dtype=np.uint32)


def _digests(doc_hashes: pa.Array) -> np.ndarray:
    """The 32-hex-character hashes as a NumPy array of 32-byte strings (one copy, no Python objects)."""
    fixed = doc_hashes.cast(pa.binary(32))
    if len(fixed) == 0:
        return np.empty(0, dtype="S32")
    return np.frombuffer(fixed.buffers()[1], dtype="S32", count=len(fixed), offset=fixed.offset * 32)


def _partition_of(digests: np.ndarray, partitions: int) -> np.ndarray:
    """Each hash's partition, from its hex digits 8 to 16 (its split comes from digits 0 to 8)."""
    digits = _HEX_VALUES[digests.view(np.uint8).reshape(-1, 32)[:, 8:16]]
    return (digits << (4 * np.arange(7, -1, -1, dtype=np.uint32))).sum(axis=1, dtype=np.uint64) % partitions
