"""Corpus sources: what the user named (files, folders, globs, object-store URLs, the built-in corpus,
hub datasets) resolved into the sorted, de-duplicated list of files to ingest.

A file or folder the user named explicitly must be readable, or resolution fails with a
``CorpusError``; files merely found inside a folder or by a glob that gptflow cannot read (unknown
extension, hidden, no read permission, a read that fails with an I/O error, a pipe or device, a
broken symlink) are skipped and counted, since folders of real data always hold some of those.
Symlinked files and folders are followed: a file is listed once, at its target's path with the
format of the name it was found by, and each real folder is walked once (so a symlink loop ends). Object-store URLs (``s3://bucket/raw/``)
are listed the same way: ``data.object_sources``.

A spec is a file, a folder (searched recursively), a glob (``**`` included), an object-store URL,
``hf:owner/name`` (a hub dataset, pinned to the revision it resolves to now, so its revision
stands for its content as a file's hash does) or ``BUILTIN_CORPUS`` (the running interpreter's
standard library source, tests and ``site-packages`` left out). The format comes from the
extension (``FORMAT_BY_SUFFIX``), under an optional ``.gz`` / ``.zst``; the records are read by
``data.readers``.
"""

from __future__ import annotations

import glob
import os
import stat
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, BinaryIO

from gptflow.data.errors import CorpusError, SkipReport
from gptflow.data.object_sources import is_object_url, list_objects, open_object

BUILTIN_CORPUS = "builtin:python-stdlib"
"""The source of the running interpreter's standard library: ~12 MB of real text, always present."""
HUB_PREFIX = "hf:"

FORMAT_BY_SUFFIX = {
    ".txt": "text", ".md": "text", ".rst": "text", ".py": "text",
    ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv",
    ".html": "html", ".htm": "html", ".warc": "warc",
}
"""File formats by extension; ``text`` is one document per file."""
CODE_SUFFIXES = {".py"}
"""Extensions of the files that are code, not prose: no prose heuristic (``data.languages``,
``data.quality``) judges their documents."""
COMPRESSION_BY_SUFFIX = {".gz": "gzip", ".zst": "zstd"}
"""Outer compression by extension, named as pyarrow's codecs are."""
UNCOMPRESSIBLE_FORMATS = {"parquet"}
"""Formats that compress their own pages and need random access, so no outer compression."""
HUB_FORMAT = "hub"

SKIP_UNSUPPORTED = "unsupported file type"
SKIP_HIDDEN = "hidden file or folder"
SKIP_PERMISSION_DENIED = "unreadable file (permission denied)"
SKIP_UNLISTABLE_FOLDER = "unlistable folder (permission denied)"
SKIP_NOT_REGULAR = "not a regular file (pipe, socket or device)"
SKIP_BROKEN_SYMLINK = "broken or looping symlink"
SKIP_READ_ERROR = "read error (a failing disk or a stale network mount)"

_STDLIB_TEST_FOLDERS = {"test", "tests", "idle_test"}
_STDLIB_EXCLUDED_FOLDERS = _STDLIB_TEST_FOLDERS | {"site-packages", "__pycache__"}
_GLOB_CHARACTERS = set("*?[")


@dataclass(frozen=True)
class SourceFile:
    """One unit of ingestion: a file, an object in an object store, or a hub dataset at a pinned
    revision, and how to read it."""

    path: Path | str
    """A file's absolute path; an object's URL, as a string (a ``Path`` would merge the ``//`` of
    ``s3://bucket/key``); for hub datasets ``hf:owner/name@<revision>``."""
    format: str
    """``text``, ``jsonl``, ``json``, ``parquet``, ``csv``, ``html``, ``warc``, or ``hub``."""
    compression: str | None = None
    """``gzip`` or ``zstd`` (from a ``.gz`` / ``.zst`` suffix), else None."""
    listed_stamp: tuple[int, str] | None = None
    """An object's size and version (its ETag on S3) as listed; None for a file, whose size and
    mtime are read when needed (``source_stamp``)."""

    @property
    def is_object(self) -> bool:
        """Whether this is an object in an object store, read in place through fsspec."""
        return isinstance(self.path, str)

    @property
    def name(self) -> str:
        """The file's or object's name, without its folders."""
        return PurePosixPath(str(self.path)).name

    @property
    def is_code(self) -> bool:
        """Whether the file is source code (``CODE_SUFFIXES``, under its compression's suffix)."""
        suffixes = [suffix.lower() for suffix in PurePosixPath(self.name).suffixes]
        if suffixes and self.compression:
            suffixes.pop()
        return self.format == "text" and bool(suffixes) and suffixes[-1] in CODE_SUFFIXES


@dataclass
class SourceResolution:
    files: list[SourceFile]
    """Files to ingest, sorted by path, each once."""
    skipped: SkipReport = field(default_factory=SkipReport)
    """Files found in folders or globs that were not taken, by reason."""
    named_by: dict[str, str] = field(default_factory=dict)
    """Each file's path → the spec that named it (the first, for a file two specs name): the source
    a data mixture weighs it under."""

    def fingerprint_inputs(self) -> list[list[object]]:
        """A cheap stand-in for the files' contents (path and ``source_stamp``) for a stage cache
        key: anything that changes a file's bytes changes one of these."""
        return [[str(source.path)] if source.format == HUB_FORMAT
                else [str(source.path), *source_stamp(source).values()] for source in self.files]


def source_stamp(source: SourceFile) -> dict[str, Any]:
    """What stands in for a file's bytes between runs, without reading them: a file's size and
    mtime (as make and git take them), an object's size and version (``etag``) as listed."""
    if source.listed_stamp is not None:
        size, version = source.listed_stamp
        return {"size": size, "etag": version}
    stat = Path(source.path).stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def open_source(source: SourceFile) -> BinaryIO:
    """The bytes of a file or object as a seekable binary stream (an object is streamed, not downloaded)."""
    return open_object(str(source.path)) if source.is_object else open(source.path, "rb")


def resolve_sources(specs: Sequence[str]) -> SourceResolution:
    """Resolve ``specs`` (paths, folders searched recursively, globs with ``**``, object-store URLs of
    prefixes, globs or objects, ``hf:owner/name``, or ``BUILTIN_CORPUS``) into files; raises
    ``CorpusError`` for a spec that names nothing usable."""
    skipped = SkipReport()
    files: dict[Path | str, SourceFile] = {}
    named_by: dict[str, str] = {}
    for spec in specs:
        for source in _resolve_spec(spec, skipped):
            files.setdefault(source.path, source)
            named_by.setdefault(str(source.path), spec)
    if not files:
        raise CorpusError(
            f"No readable files in {', '.join(repr(spec) for spec in specs)} ({skipped.summary()}). "
            f"Supported extensions: {_supported_extensions()}."
        )
    return SourceResolution(files=sorted(files.values(), key=lambda source: str(source.path)), skipped=skipped,
                            named_by=named_by)


def detect_format(path: PurePath) -> tuple[str, str | None] | None:
    """(format, compression) from the file name, e.g. ``a.jsonl.gz`` → ("jsonl", "gzip"); None if
    gptflow cannot read it."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    compression = COMPRESSION_BY_SUFFIX.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes.pop()
    file_format = FORMAT_BY_SUFFIX.get(suffixes[-1]) if suffixes else None
    if file_format is None or (compression and file_format in UNCOMPRESSIBLE_FORMATS):
        return None
    return file_format, compression


def builtin_corpus_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _resolve_spec(spec: str, skipped: SkipReport) -> Iterator[SourceFile]:
    if spec == BUILTIN_CORPUS:
        yield from _builtin_corpus()
    elif spec.startswith(HUB_PREFIX):
        yield _resolve_hub_dataset(spec[len(HUB_PREFIX):])
    elif is_object_url(spec):
        yield from _resolve_objects(spec, skipped)
    elif _GLOB_CHARACTERS & set(spec):
        yield from _resolve_glob(spec, skipped)
    else:
        path = Path(spec).expanduser()
        if not os.path.lexists(path):
            raise CorpusError(
                f"Corpus path '{spec}' does not exist (resolved to {path.absolute()}). "
                f"Check the path, or omit --corpus to use the built-in corpus."
            )
        if os.path.isdir(path):
            yield from _walk_folder(path.resolve(), spec, skipped)
        else:
            yield _explicit_file(path, spec)


def _explicit_file(path: Path, spec: str) -> SourceFile:
    usable = _usable_source(path)
    if isinstance(usable, SourceFile):
        return usable
    problems = {
        SKIP_UNSUPPORTED: f"has an unsupported type. Supported extensions: {_supported_extensions()}. "
                          f"Rename or convert the file",
        SKIP_PERMISSION_DENIED: "cannot be read (permission denied). Run `chmod +r` on it",
        SKIP_NOT_REGULAR: "is a pipe, socket or device, which ingest cannot read twice (to hash it, then "
                          "for its documents). Save its contents to a file and name that",
        SKIP_BROKEN_SYMLINK: "is a symlink whose target is missing or that links back to itself. Fix the link",
        SKIP_READ_ERROR: "cannot be read: reading it fails with an I/O error (a failing disk or a stale network "
                         "mount). Copy what can be read to a healthy disk and name that",
    }
    raise CorpusError(f"Corpus file '{spec}' {problems[usable]}, or leave it out of --corpus.")


def _candidate(path: Path, skipped: SkipReport, real_path: Path | None = None) -> SourceFile | None:
    usable = _usable_source(path, real_path)
    if isinstance(usable, SourceFile):
        return usable
    skipped.add(usable, str(path))
    return None


def _usable_source(path: Path, real_path: Path | None = None) -> SourceFile | str:
    """``path`` as a file to ingest, or the ``SKIP_*`` reason it cannot be one. Links are followed:
    the format comes from the name as found (a link named ``a.jsonl`` may point at a hash-named blob,
    as in the Hugging Face cache), the path is the target's (``real_path`` when the caller knows it),
    so a file found twice is listed once."""
    try:
        mode = path.stat().st_mode
    except PermissionError:
        return SKIP_PERMISSION_DENIED
    except OSError:  # ENOENT or ELOOP for a path that was listed: only a symlink can be dangling
        return SKIP_BROKEN_SYMLINK
    if not stat.S_ISREG(mode):
        return SKIP_NOT_REGULAR
    detected = detect_format(path)
    if detected is None:
        return SKIP_UNSUPPORTED
    # Opening and reading are the only true test of readability (ACLs, root, network mounts, failing
    # disks); ingest reads the first byte anyway.
    try:
        with open(path, "rb") as stream:
            stream.read(1)
    except PermissionError:
        return SKIP_PERMISSION_DENIED
    except OSError:  # EIO, ESTALE: the file lists and opens, but its bytes cannot be had
        return SKIP_READ_ERROR
    return SourceFile(real_path or path.resolve(), *detected)


def _walk_folder(root: Path, spec: str, skipped: SkipReport) -> Iterator[SourceFile]:
    """The files under ``root`` (a real path), following symlinked folders; each real folder is
    listed once, so a link back to a folder above ends instead of looping."""
    try:
        pending = [(root, root, _sorted_entries(root))]
    except PermissionError as error:
        raise CorpusError(
            f"Corpus folder '{spec}' cannot be listed (permission denied). "
            f"Run `chmod +rx` on it, or leave it out of --corpus."
        ) from error
    visited = {root}
    while pending:
        folder, real_folder, entries = pending.pop()
        for entry in entries:
            path = folder / entry.name
            # Below a real folder only a link needs resolving, which costs a system call per folder level.
            known_real_path = None if entry.is_symlink() else real_folder / entry.name
            if entry.name.startswith("."):
                skipped.add(SKIP_HIDDEN, str(path))
            elif entry.is_dir() if known_real_path else os.path.isdir(path):  # is_dir raises on a looping link
                real_path = known_real_path or path.resolve()
                if real_path in visited:
                    continue
                visited.add(real_path)
                try:
                    pending.append((path, real_path, _sorted_entries(real_path)))
                except PermissionError:
                    skipped.add(SKIP_UNLISTABLE_FOLDER, str(path))
            elif (source := _candidate(path, skipped, known_real_path)) is not None:
                yield source


def _sorted_entries(folder: Path) -> list[os.DirEntry[str]]:
    # Listing order varies by filesystem; which skipped files are shown as examples should not.
    with os.scandir(folder) as entries:
        return sorted(entries, key=lambda entry: entry.name)


def _resolve_glob(pattern: str, skipped: SkipReport) -> Iterator[SourceFile]:
    # glob leaves hidden files out unless the pattern names them, like a shell does.
    matches = [Path(match).absolute() for match in glob.glob(os.path.expanduser(pattern), recursive=True)]
    files = [match for match in matches if not os.path.isdir(match)]
    if not files:
        raise CorpusError(
            f"Corpus pattern '{pattern}' matches no files (searched from {Path.cwd()}). "
            f"Check the pattern; quote it so the shell does not expand it first."
        )
    for path in files:
        if (source := _candidate(path, skipped)) is not None:
            yield source


def _resolve_objects(url: str, skipped: SkipReport) -> Iterator[SourceFile]:
    objects = list_objects(url)
    if len(objects) == 1 and objects[0].url == url:  # named explicitly: it must be readable
        detected = detect_format(PurePosixPath(url))
        if detected is None:
            raise CorpusError(f"Corpus object '{url}' has an unsupported type. Supported extensions: "
                              f"{_supported_extensions()}. Rename or convert it, or leave it out of --corpus.")
        yield SourceFile(url, *detected, listed_stamp=(objects[0].size, objects[0].version))
        return
    for listed in objects:
        detected = detect_format(PurePosixPath(listed.relative_name))
        if any(part.startswith(".") for part in listed.relative_name.split("/")):
            skipped.add(SKIP_HIDDEN, listed.url)
        elif detected is None:
            skipped.add(SKIP_UNSUPPORTED, listed.url)
        else:
            yield SourceFile(listed.url, *detected, listed_stamp=(listed.size, listed.version))


def _builtin_corpus() -> Iterator[SourceFile]:
    root = builtin_corpus_root()
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in _STDLIB_EXCLUDED_FOLDERS]
        for name in names:
            if name.endswith(".py"):
                yield SourceFile(Path(folder) / name, "text")


def _resolve_hub_dataset(name: str) -> SourceFile:
    # Pinning the revision makes the dataset content-addressed like a file: the revision is
    # its content hash, and ingest reads exactly that revision.
    from huggingface_hub import HfApi

    try:
        revision = HfApi().dataset_info(name).sha
    except Exception as error:  # offline, unknown id, private repo: each a different exception type
        raise CorpusError(
            f"Hub dataset '{HUB_PREFIX}{name}' could not be resolved ({type(error).__name__}: {error}). "
            f"Check the id (hf:owner/name) and the network connection."
        ) from error
    return SourceFile(Path(f"{HUB_PREFIX}{name}@{revision}"), HUB_FORMAT)


def _supported_extensions() -> str:
    compressed = ", ".join(sorted(COMPRESSION_BY_SUFFIX))
    return f"{', '.join(sorted(FORMAT_BY_SUFFIX))} (optionally compressed: {compressed}; not .parquet)"
