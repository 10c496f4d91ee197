"""Content hashes: of bytes, files, streams and JSON values; every key and listing in the store uses them.

Every hash is blake2b with a 16-byte digest, written as 32 hex characters: a segment's
``doc_hash``, a file's entry in ``contents.json``, a stage key (``hash_json`` of its parts, keys
sorted). ``split_by_hash`` reads a hash's first 8 hex digits as a fraction of 2^32 and sends it
to val below ``val_fraction``: corpus segments and fine-tuning records alike.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, BinaryIO

HASH_CHUNK_BYTES = 1 << 20


def hash_bytes(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def hash_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hash_stream(f)


def hash_stream(stream: BinaryIO) -> str:
    """The hash of what is left to read of ``stream``: ``hash_file``'s of the same bytes."""
    digest = hashlib.blake2b(digest_size=16)
    while chunk := stream.read(HASH_CHUNK_BYTES):
        digest.update(chunk)
    return digest.hexdigest()


def hash_json(value: Any) -> str:
    """Hash of a JSON-serialisable value, independent of dict ordering."""
    return hash_bytes(json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode())


def split_by_hash(content_hash: str, val_fraction: float) -> str:
    """``val`` for a ``val_fraction`` of items, ``train`` for the rest, decided by each item's content
    hash alone: an item never moves between the splits when the data around it changes or grows."""
    return "val" if int(content_hash[:8], 16) / 2**32 < val_fraction else "train"
