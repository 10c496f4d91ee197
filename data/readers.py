"""The one reader of source files: ``read_records`` turns any file gptflow reads (a corpus file,
fine-tuning data, a benchmark, a labelled file) into located records, skipping and counting bad
input; ``read_documents`` takes pretraining's documents from them.

A record is ``(location, value)``: a string for a text file (``.txt .md .rst .py``, one per
file), else a JSON value (a JSONL line, a JSON array item, or a whole JSON document), a CSV row
keyed by its header (Python's ``csv`` over the decoded stream, ``surrogateescape`` marking
undecodable bytes), a parquet or hub row, or a CoNLL sentence (``.conll .iob .bio``:
``{"words", "tags", "lines"}``), or a web page's main text (``.html .htm .warc``: ``data.web``).
``.gz`` and ``.zst`` are read on any format but parquet. The
location is ``path:line`` for JSONL and CSV (a row's first line) and CoNLL, ``path:record N``
for JSON arrays, parquet and hub rows, the path alone otherwise. Text is UTF-8, a leading BOM
dropped.

Bad input is skipped and counted in a ``SkipReport`` with its location, never raised: a binary
file (a NUL in its first ``BINARY_SNIFF_BYTES``), a line, row or text that is not UTF-8, a line
that is not JSON, a CSV row the parser rejects, and the rest of a file that breaks off (a
truncated archive, a corrupt parquet file). ``columns=`` lets parquet decode only the columns a
consumer reads, and raises ``MissingColumns`` when a CSV or parquet file has none of them (a
setting to fix, not bad data).

``read_documents`` takes the text of each record (a string record, or its ``data.text_field``),
turns ``\\r\\n`` into ``\\n``, skips documents shorter than ``min_chars`` (counted), and raises a
``CorpusError`` naming the keys the records do have when none has the field."""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from gptflow.data.errors import CorpusError, SkipReport
from gptflow.data.sources import HUB_PREFIX, SourceFile, open_source

SKIP_BINARY = "binary file"
SKIP_INVALID_UTF8 = "invalid UTF-8"
SKIP_INVALID_JSON = "invalid JSON"
SKIP_MALFORMED_CSV = "malformed CSV row"
SKIP_UNREADABLE = "unreadable file"
SKIP_NO_TEXT_FIELD = "record without the text field"
SKIP_NOT_TEXT = "text field not a string"
SKIP_TOO_SHORT = "document shorter than min_chars"

BINARY_SNIFF_BYTES = 8192
"""A NUL byte this early marks a binary file; text formats never contain one."""
READ_BUFFER_BYTES = 1 << 20
PARQUET_BATCH_ROWS = 1024
UNDECODABLE = (chr(0xDC80), chr(0xDCFF))
"""The range ``errors="surrogateescape"`` maps undecodable bytes to: a CSV value holding one was not UTF-8."""

csv.field_size_limit(2**31 - 1)  # a document in a CSV cell may be far longer than the 128 KiB default

Record = tuple[str, Any]
"""(location, value): where a record came from, for skip reports, and the record itself: a dict
of fields, or a string (a text file, a bare string in a JSON array or JSONL line)."""


class MissingColumns(ValueError):
    """A table (CSV, parquet) has none of the columns a consumer asked for; ``columns`` are the ones
    it has, for the consumer's message."""

    def __init__(self, source: SourceFile, columns: list[str]) -> None:
        super().__init__(f"{source.path} has none of the requested columns (its columns: {', '.join(columns)})")
        self.columns = columns


class SourceReadError(OSError):
    """Reading a source failed in the system (a failing disk, a stale mount: an ``OSError`` with an
    errno), not in its format: the same file may read whole later, so nothing read from it is kept."""


def read_records(source: SourceFile, skips: SkipReport, columns: Sequence[str] | None = None,
                 raise_read_errors: bool = False) -> Iterator[Record]:
    """The records of ``source`` in file order, bad input added to ``skips``.

    ``columns``: the fields the consumer reads. A parquet file then decodes only those columns
    (the others of a wide table are never read), and a CSV or parquet file that has none of them
    raises ``MissingColumns`` before any record is read: that is a setting to fix, not bad data.
    ``raise_read_errors``: raise ``SourceReadError`` for a read the system fails, rather than
    skipping the rest of the file, for a consumer that caches what it read.
    """
    try:
        yield from _READERS[source.format](source, skips, columns)
    except (OSError, EOFError, pa.ArrowException) as error:  # truncated archive, corrupt parquet
        if raise_read_errors and isinstance(error, OSError) and error.errno is not None:
            raise SourceReadError(error.errno, error.strerror, str(source.path)) from error
        skips.add(SKIP_UNREADABLE, f"{source.path} ({error})")


def read_documents(source: SourceFile, text_field: str, skips: SkipReport, min_chars: int = 1,
                   raise_read_errors: bool = False) -> Iterator[str]:
    """Pretraining's documents of ``source`` in file order: the text of each record (a string
    record, or its ``text_field``), normalised; records without usable text are skipped;
    ``raise_read_errors`` as ``read_records`` takes it.

    Raises ``CorpusError`` when records exist but none has ``text_field``: that is a setting to
    fix, not bad data to skip.
    """
    field = _TextField(source, text_field, skips)
    try:
        for location, record in read_records(source, skips, columns=[text_field], raise_read_errors=raise_read_errors):
            text = field.from_record(record, location)
            if text is None:
                continue
            text = text.replace("\r\n", "\n")
            if len(text.strip()) < min_chars:
                skips.add(SKIP_TOO_SHORT, location)
            else:
                yield text
    except MissingColumns as missing:
        raise _missing_field_error(source, text_field, missing.columns) from None
    field.require_found()


class _TextField:
    """Takes the text out of records, and remembers whether any record had the field at all."""

    def __init__(self, source: SourceFile, name: str, skips: SkipReport) -> None:
        self.source = source
        self.name = name
        self.skips = skips
        self.records = 0
        self.found = 0
        self.keys_seen: set[str] = set()

    def from_record(self, record: Any, location: str) -> str | None:
        self.records += 1
        if isinstance(record, str):  # a text file, or a bare string in .json arrays and .jsonl lines
            self.found += 1
            return record
        value = record.get(self.name) if isinstance(record, dict) else None
        if value is None:
            if isinstance(record, dict):
                self.keys_seen.update(key for key in record if isinstance(key, str))
            self.skips.add(SKIP_NO_TEXT_FIELD, location)
            return None
        self.found += 1
        if isinstance(value, bytes):  # a binary parquet or hub column
            return _decode(value, location, self.skips)
        if isinstance(value, str):
            return value
        self.skips.add(SKIP_NOT_TEXT, location)
        return None

    def require_found(self) -> None:
        if self.records and not self.found:
            raise _missing_field_error(self.source, self.name, sorted(self.keys_seen))


def _missing_field_error(source: SourceFile, field: str, keys: list[str]) -> CorpusError:
    shown = ", ".join(keys[:20]) + (", ..." if len(keys) > 20 else "") if keys else "no named fields"
    return CorpusError(
        f"No record in {source.path} has the text field '{field}' (its records have: {shown}). "
        f"Name the field that holds the text with --set data.text_field=<key>."
    )


def _decode(data: bytes, location: str, skips: SkipReport, start_offset: int = 0) -> str | None:
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        skips.add(SKIP_INVALID_UTF8, f"{location} (byte {start_offset + error.start})")
        return None


def _open(source: SourceFile) -> io.BufferedReader:
    return io.BufferedReader(pa.input_stream(open_source(source), compression=source.compression), READ_BUFFER_BYTES)


def _is_binary(head: bytes) -> bool:
    return b"\x00" in head[:BINARY_SNIFF_BYTES]


def _skipped_as_binary(stream: io.BufferedReader, source: SourceFile, skips: SkipReport) -> bool:
    if _is_binary(stream.peek(BINARY_SNIFF_BYTES)):
        skips.add(SKIP_BINARY, str(source.path))
        return True
    return False


def _read_text(source: SourceFile, skips: SkipReport, columns: Sequence[str] | None) -> Iterator[Record]:
    with _open(source) as stream:
        data = stream.read()
    location = str(source.path)
    if _is_binary(data):
        skips.add(SKIP_BINARY, location)
    elif (text := _decode(data, location, skips)) is not None:
        yield location, text


def _read_jsonl(source: SourceFile, skips: SkipReport, columns: Sequence[str] | None) -> Iterator[Record]:
    with _open(source) as stream:
        if _skipped_as_binary(stream, source, skips):
            return
        line_start = 0
        for line_number, line in enumerate(stream, start=1):
            location = f"{source.path}:{line_number}"
            offset, line_start = line_start, line_start + len(line)
            if not line.strip():
                continue
            if (decoded := _decode(line, location, skips, offset)) is None:
                continue
            try:
                yield location, json.loads(decoded)
            except json.JSONDecodeError:
                skips.add(SKIP_INVALID_JSON, location)


def _read_json(source: SourceFile, skips: SkipReport, columns: Sequence[str] | None) -> Iterator[Record]:
    with _open(source) as stream:
        if _skipped_as_binary(stream, source, skips):
            return
        data = stream.read()
    if (decoded := _decode(data, str(source.path), skips)) is None:
        return
    try:
        value = json.loads(decoded)
    except json.JSONDecodeError as error:
        skips.add(SKIP_INVALID_JSON, f"{source.path}:{error.lineno}")
        return
    if isinstance(value, list):
        yield from _numbered(source, value)
    else:
        yield str(source.path), value


def _read_csv(source: SourceFile, skips: SkipReport, columns: Sequence[str] | None) -> Iterator[Record]:
    with _open(source) as stream:
        if _skipped_as_binary(stream, source, skips):
            return
        # Undecodable bytes become lone surrogates instead of failing the file: one bad row is
        # skipped, the rest read.
        text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader = csv.DictReader(text)
        header = reader.fieldnames or []
        if columns and not set(columns) & set(header):
            raise MissingColumns(source, list(header))
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                skips.add(SKIP_MALFORMED_CSV, f"{source.path}:{reader.line_num} ({error})")
                continue
            values = [value for value in row.values() if isinstance(value, str)]
            # The row's first line: a quoted field may span several.
            location = f"{source.path}:{reader.line_num - sum(value.count(chr(10)) for value in values)}"
            if any(UNDECODABLE[0] <= character <= UNDECODABLE[1] for value in values for character in value):
                skips.add(SKIP_INVALID_UTF8, location)
            else:
                yield location, row


def _read_parquet(source: SourceFile, skips: SkipReport, columns: Sequence[str] | None) -> Iterator[Record]:
    with open_source(source) as stream:  # seekable: parquet reads its footer first, then only the columns wanted
        parquet = pq.ParquetFile(stream)
        names = parquet.schema_arrow.names
        wanted = [name for name in columns if name in names] if columns else None
        if columns and not wanted:
            raise MissingColumns(source, names)
        batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=wanted)
        yield from _numbered(source, (row for batch in batches for row in batch.to_pylist()))


def _read_conll(source: SourceFile, skips: SkipReport, columns: Sequence[str] | None) -> Iterator[Record]:
    """CoNLL-style files: a word per line with its columns (the first is the word, the last its
    tag), a blank line between sentences, ``-DOCSTART-`` lines ignored. Each sentence is a record
    ``{"words": [...], "tags": [...], "lines": [...]}`` located at its first line; a sentence with
    a line that is not UTF-8 is left out (that line is the skip reported)."""
    with _open(source) as stream:
        if _skipped_as_binary(stream, source, skips):
            return
        sentence: dict[str, list[Any]] = {"words": [], "tags": [], "lines": []}
        readable = True
        for line_number, line in enumerate(itertools.chain(stream, [b""]), start=1):  # b"": the last sentence ends
            if not line.strip():
                if sentence["words"] and readable:
                    yield f"{source.path}:{sentence['lines'][0]}", sentence
                sentence, readable = {"words": [], "tags": [], "lines": []}, True
                continue
            decoded = _decode(line, f"{source.path}:{line_number}", skips)
            if decoded is None:
                readable = False
                continue
            fields = decoded.split()
            if fields[0] == "-DOCSTART-":
                continue
            sentence["words"].append(fields[0])
            sentence["tags"].append(fields[-1] if len(fields) > 1 else "")
            sentence["lines"].append(line_number)


def _read_hub(source: SourceFile, skips: SkipReport, columns: Sequence[str] | None) -> Iterator[Record]:
    import datasets  # heavy; only hub corpora need it

    name, revision = str(source.path).removeprefix(HUB_PREFIX).rsplit("@", 1)
    yield from _numbered(source, datasets.load_dataset(name, split="train", streaming=True, revision=revision))


def _read_web(source: SourceFile, skips: SkipReport, columns: Sequence[str] | None) -> Iterator[Record]:
    from gptflow.data.web import read_pages  # it reads skip reasons from here

    yield from read_pages(source, skips)


def _numbered(source: SourceFile, records: Iterable[Any]) -> Iterator[Record]:
    """Records located as ``path:record N`` (1-based), for formats without lines."""
    for index, record in enumerate(records, start=1):
        yield f"{source.path}:record {index}", record


_READERS: dict[str, Callable[[SourceFile, SkipReport, Sequence[str] | None], Iterator[Record]]] = {
    "text": _read_text,
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_csv,
    "parquet": _read_parquet,
    "conll": _read_conll,
    "hub": _read_hub,
    "html": _read_web,
    "warc": _read_web,
}
