"""Near-duplicate removal with MinHash LSH (``data.near_dedup_threshold``), after exact dedup.

Near duplicates are found per segment, as exact ones are (a document under ``data.segment_chars``
is one segment): each segment tokenize would read gets a MinHash signature of its word 5-grams
(lower-cased, split at whitespace), and in the order exact dedup keeps copies (units by sorted
source path, segments in file order) a segment whose estimated Jaccard similarity to a segment
kept before it reaches the threshold goes on its unit's ``drop_doc_hashes``, like an exact
duplicate; the first of a group stays. LSH (datasketch's ``MinHashLSH``) only proposes
candidates; each is checked against the kept segment's signature, so a false candidate drops
nothing. Fixed permutations (``NUM_PERM``, ``SEED``) make the result the same on every run with
one datasketch version (its version is in the ingest stage's key).

What scales and what does not: signatures are computed per unit, through the stage's
``MapUnits`` (on Ray with ``--ray``), reading one record batch at a time. The LSH index and the
kept segments' signatures live in the stage's process: about 4 KB per kept segment (measured
with datasketch 2.0: the signature, and a key per LSH band), about as much memory as the text of
4 KB segments itself. That fits corpora of a few million segments (tens of GB of text), not
terabytes, which need an index sharded by band (not built here). Signatures are not cached: a
rerun of the ingest stage with the setting on computes them again (the per-file units stay
reused), at about 1 ms per 4 KB segment per core.

datasketch is an optional extra, imported only when the setting is on.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.compute as pc

from gptflow.data.errors import UserError
from gptflow.data.shards import iter_raw_batches
from gptflow.data.units import MapUnits

if TYPE_CHECKING:
    from gptflow.data.ingest import CorpusUnit

NUM_PERM = 128
"""Hash functions per signature: the estimate's standard error is about 0.04 at Jaccard 0.8."""
SEED = 1
SHINGLE_WORDS = 5
LSH_MAX_THRESHOLD = 0.95
"""datasketch's LSH cannot band above about 0.97 (it would need fewer than 2 bands): a higher
setting asks LSH for candidates at this one, and the signature check applies the setting."""
INSTALL_HINT = "pip install 'gptflow[near-dedup]'"


class NearDedupUnavailableError(UserError):
    """``data.near_dedup_threshold`` is set but datasketch is not installed."""


def datasketch_version() -> str:
    """The installed datasketch's version (its hashing shapes which segments are dropped, so it
    belongs in the cache key); a ``NearDedupUnavailableError`` naming the install when missing."""
    try:
        return metadata.version("datasketch")
    except metadata.PackageNotFoundError:
        raise NearDedupUnavailableError(
            f"data.near_dedup_threshold needs datasketch: {INSTALL_HINT} (or leave the setting unset)."
        ) from None


def shingles(text: str) -> set[bytes]:
    """The segment's lower-cased word 5-grams; a text of fewer words is one shingle of all of them."""
    words = text.lower().split()
    if len(words) <= SHINGLE_WORDS:
        return {" ".join(words).encode()}
    return {" ".join(words[start:start + SHINGLE_WORDS]).encode() for start in range(len(words) - SHINGLE_WORDS + 1)}


def segment_signatures(directory: str, dropped: Collection[str]) -> list[tuple[str, str, int, Any]]:
    """``(doc_hash, split, bytes, signature)`` of each segment of the unit in ``directory`` not in
    ``dropped``, in file order; the signature a datasketch ``LeanMinHash`` (small to send back)."""
    from datasketch import LeanMinHash, MinHash  # an optional extra: imported only when asked for

    dropped = set(dropped)
    signatures = []
    for batch in iter_raw_batches(Path(directory), ["text", "doc_hash", "split"]):
        rows = [(text, doc_hash, split, n_bytes) for text, doc_hash, split, n_bytes in zip(
            batch.column("text").to_pylist(), batch.column("doc_hash").to_pylist(),
            batch.column("split").to_pylist(), pc.binary_length(batch.column("text")).to_pylist(),
        ) if doc_hash not in dropped]
        minhashes = MinHash.generator((shingles(text) for text, *_ in rows), num_perm=NUM_PERM, seed=SEED)
        signatures.extend((doc_hash, split, n_bytes, LeanMinHash(minhash))
                          for (_, doc_hash, split, n_bytes), minhash in zip(rows, minhashes))
    return signatures


def drop_near_duplicates(units: Sequence[CorpusUnit], threshold: float, map_units: MapUnits) -> None:
    """Add each unit's near duplicates of earlier kept segments to its ``drop_doc_hashes`` (kept
    sorted), count them in ``near_duplicates`` and take them off its segment and byte counts."""
    from datasketch import MinHashLSH

    index = MinHashLSH(threshold=min(threshold, LSH_MAX_THRESHOLD), num_perm=NUM_PERM)
    kept: list[Any] = []
    calls = [{"directory": unit.directory, "dropped": unit.drop_doc_hashes} for unit in units]
    for unit, signatures in zip(units, map_units(segment_signatures, calls)):
        for doc_hash, split, n_bytes, signature in signatures:
            if any(signature.jaccard(kept[key]) >= threshold for key in index.query(signature)):
                unit.drop_doc_hashes.append(doc_hash)
                unit.near_duplicates += 1
                unit.segments[split] -= 1
                unit.bytes[split] -= n_bytes
            else:
                index.insert(len(kept), signature)
                kept.append(signature)
        unit.drop_doc_hashes.sort()
