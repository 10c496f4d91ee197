"""Corpus files read in place from an object store: ``s3://bucket/raw/`` (every object below the
prefix), ``s3://bucket/raw/**/*.jsonl`` (a glob), ``s3://bucket/raw/a.jsonl`` (one object), or
the same for any fsspec URL (``gs://`` where gcsfs is installed).

A URL is listed once, when sources are resolved, and each object's size and version as listed (its
ETag on S3) stand in for its bytes, as a local file's size and mtime do: a rerun over unchanged
objects reads none of them. Objects are streamed, never copied to disk, through a filesystem made
afresh from the URL at each use: its listings are never cached (objects change between runs), and a
source shipped to another process (a Ray worker) carries its URL, not a client.

A prefix lists every object below it (hidden names and unsupported extensions skipped and
counted, as in a folder), a glob goes through ``fs.glob``, a named object must exist. A missing
bucket, a prefix with no objects, access denied, an unreachable endpoint or a missing fsspec
filesystem (s3fs) is a one-line ``CorpusError`` naming the URL and the fix. The listed size and
ETag (``SourceFile.listed_stamp``) are what ``data.sources.source_stamp`` gives for an object:
the ingest stage's key inputs and the ``file-hashes.json`` cache. A new or changed object is
read twice (hashed, then ingested), never copied to disk; parquet seeks its footer and reads only
the columns wanted. Its unit key is the one the same bytes in a local file would have, so a rerun
costs one listing per URL.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from typing import Any, BinaryIO

from gptflow.data.errors import CorpusError

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_S3_SCHEMES = ("s3", "s3a")
_GLOB_CHARACTERS = set("*?[")


@dataclass(frozen=True)
class ListedObject:
    url: str
    size: int
    version: str
    """What changes whenever the object's bytes do: its ETag on S3."""
    relative_name: str
    """Its name below the listed prefix (or below a glob's fixed part)."""


def is_object_url(spec: str) -> bool:
    """Whether ``spec`` is a URL with a scheme (``s3://...``), read through fsspec."""
    return _URL.match(spec) is not None


def list_objects(url: str) -> list[ListedObject]:
    """The objects ``url`` names: every one below a prefix, those a glob matches, or the one object it
    names. Raises ``CorpusError`` when it names none, or the store cannot be listed."""
    filesystem, path = _filesystem(url)
    is_glob = bool(_GLOB_CHARACTERS & set(path))
    root = _folder_above_glob(path) if is_glob else path
    try:
        found = filesystem.glob(path, detail=True) if is_glob else filesystem.find(path, detail=True)
        objects = [ListedObject(url=filesystem.unstrip_protocol(name), size=int(info["size"]),
                                # a store whose listings carry no ETag: the fs's own key of the object's state
                                version=str(info.get("ETag") or info.get("etag") or filesystem.ukey(name)),
                                relative_name=name[len(root):].lstrip("/"))
                   for name, info in found.items() if info.get("type") == "file"]
    except FileNotFoundError:  # a prefix with no objects lists as empty: only the bucket can be missing
        raise CorpusError(f"Corpus URL '{url}': its bucket '{path.split('/')[0]}' does not exist. Check the URL, or "
                          f"create the bucket.") from None
    except PermissionError:
        raise CorpusError(f"Corpus URL '{url}' cannot be listed (access denied): give these credentials list and read "
                          f"access to it (AWS_ACCESS_KEY_ID / AWS_PROFILE), or leave it out of --corpus.") from None
    except Exception as error:  # the client's own errors differ by store and library (botocore's are no OSError)
        raise CorpusError(f"Corpus URL '{url}' cannot be reached ({type(error).__name__}: {_one_line(error)}): check "
                          f"the endpoint (AWS_ENDPOINT_URL for S3) and the network.") from None
    if not objects:
        place = "matches" if is_glob else "lies at or below"
        raise CorpusError(f"Corpus URL '{url}' names no objects (none {place} it). Check the prefix or pattern "
                          f"(e.g. s3://bucket/raw/ or 's3://bucket/raw/**/*.jsonl').")
    return objects


def open_object(url: str) -> BinaryIO:
    """The object at ``url`` as a seekable binary stream, read from the store as it is consumed."""
    filesystem, path = _filesystem(url)
    return filesystem.open(path, "rb")


def _folder_above_glob(pattern: str) -> str:
    """``bucket/raw/**/*.jsonl`` → ``bucket/raw``: what a glob's matches are named below."""
    first = min(index for index in (pattern.find(character) for character in _GLOB_CHARACTERS) if index >= 0)
    return pattern[:first].rpartition("/")[0]


def _filesystem(url: str) -> tuple[Any, str]:
    scheme = url.split("://", 1)[0]
    try:
        return object_store_filesystem(url)
    except ImportError as error:
        fix = "pip install 'gptflow[s3]'" if scheme in _S3_SCHEMES else f"install what fsspec names: {_one_line(error)}"
        raise CorpusError(f"Corpus URL '{url}' needs fsspec's {scheme}:// filesystem: {fix}.") from None
    except ValueError as error:  # fsspec knows no such protocol
        raise CorpusError(f"Corpus URL '{url}': {scheme}:// is not a storage fsspec can read ({_one_line(error)}). "
                          f"Use a local path or an s3:// URL.") from None


_CLIENT_SETTINGS = ("AWS_", "GOOGLE_", "GCS", "FSSPEC_")
"""The environment a store's client reads when it is made: endpoints, credentials, profiles."""


def object_store_filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path within it. One client per scheme and
    environment, shared by every use in the process (making one costs about as much as a hundred
    requests); its listings are never cached, since objects change between and during runs."""
    scheme = url.split("://", 1)[0]
    environment = tuple(sorted((name, value) for name, value in os.environ.items() if name.startswith(_CLIENT_SETTINGS)))
    filesystem = _client(scheme, environment)
    return filesystem, filesystem._strip_protocol(url)


@functools.lru_cache(maxsize=16)
def _client(scheme: str, environment: tuple[tuple[str, str], ...]) -> Any:
    import fsspec  # a dependency of datasets; only object stores need it

    return fsspec.filesystem(scheme, use_listings_cache=False, skip_instance_cache=True)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
