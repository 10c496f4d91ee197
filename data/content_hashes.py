"""Content hashes of source files remembered across runs (``file-hashes.json`` in the store), so a
rerun over a large corpus hashes, or downloads, only the files that changed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gptflow.data.commits import write_json_atomic
from gptflow.data.hashing import hash_bytes, hash_stream
from gptflow.data.readers import SourceReadError
from gptflow.data.sources import HUB_FORMAT, SourceFile, open_source, source_stamp


class ContentHashes:
    """Content hashes of source files, remembered by their ``source_stamp`` across runs.

    A file whose size and mtime are unchanged is taken to have unchanged bytes (as make and git
    do), and so is an object whose size and ETag are, so a rerun over a large corpus hashes (or
    downloads) only new or changed files.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.entries: dict[str, dict[str, Any]] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.stamps: dict[str, dict[str, Any]] = {}
        self.changed = False

    def known(self, source: SourceFile) -> str | None:
        """The content hash of ``source`` if it is known without reading the file, else None; its
        stamp now is what ``remember`` records."""
        if source.format == HUB_FORMAT:
            return hash_bytes(str(source.path).encode())  # the path pins the dataset revision
        stamp = source_stamp(source)
        self.stamps[str(source.path)] = stamp
        entry = self.entries.get(str(source.path))
        if entry and entry == {**stamp, "hash": entry["hash"]}:
            return entry["hash"]
        return None

    def remember(self, source: SourceFile, content_hash: str) -> None:
        """Record ``content_hash`` under the stamp ``known`` saw (the file read after it)."""
        stamp = self.stamps.get(str(source.path))
        if stamp is not None and self.entries.get(str(source.path)) != {**stamp, "hash": content_hash}:
            self.entries[str(source.path)] = {**stamp, "hash": content_hash}
            self.changed = True

    def save(self) -> None:
        if self.changed:
            write_json_atomic(self.path, self.entries)


def hash_source_file(source: SourceFile) -> str:
    """The hash of ``source``'s bytes, read now; a ``SourceReadError`` when the system fails the read
    of a local file."""
    try:
        with open_source(source) as stream:
            return hash_stream(stream)
    except OSError as error:
        if source.is_object:  # an object store that is away is no property of the object: not a skip
            raise
        raise SourceReadError(error.errno, error.strerror or str(error), str(source.path)) from error
