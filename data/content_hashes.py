"""Content hashes of source files remembered across runs (``file-hashes.json`` in the store), so a
rerun over a large corpus hashes, or downloads, only the files that changed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gptflow.data.commits import write_json_atomic
from gptflow.data.hashing import hash_bytes
from gptflow.data.sources import HUB_FORMAT, SourceFile, source_stamp


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
