"""Readers: one source file → a stream of normalised document texts, bad input skipped and counted.

Formats (see ``data.sources``): ``text`` (.txt .md .rst .py, one document per file), ``jsonl`` (one
JSON record per line), ``json`` (an array of records or strings, or one record), ``parquet``,
``csv``, and hub datasets. Records carry their text in the configured text field. Everything but
``text`` and ``json`` streams with bounded memory; those two hold one file in memory, so very large
corpora belong in .jsonl, .parquet or .csv. gzip and zstd are decompressed on the fly by pyarrow.

Normalisation is deliberately minimal, since the tokenizer is byte-level: ``\\r\\n`` becomes
``\\n`` and a leading byte-order mark is dropped, nothing else.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from gptflow.data.errors import CorpusError, SkipReport
from gptflow.data.sources import HUB_PREFIX, SourceFile

SKIP_BINARY = "binary file"
SKIP_INVALID_UTF8 = "invalid UTF-8"
SKIP_INVALID_JSON = "invalid JSON"
SKIP_NO_TEXT_FIELD = "record without the text field"
SKIP_NOT_TEXT = "text field not a string"
SKIP_TOO_SHORT = "document shorter than min_chars"
SKIP_UNREADABLE = "unreadable file"

BINARY_SNIFF_BYTES = 8192
"""A NUL byte this early marks a binary file; text formats never contain one."""
READ_BUFFER_BYTES = 1 << 20
PARQUET_BATCH_ROWS = 1024
CSV_BLOCK_BYTES = 1 << 20

Located = tuple[str, str]
"""(location, text): where a document came from, for skip reports, and its text."""


def read_documents(source: SourceFile, text_field: str, skips: SkipReport, min_chars: int = 1) -> Iterator[str]:
    """Yield the documents of ``source`` in file order, adding skipped input to ``skips``.

    Raises ``CorpusError`` when records exist but none has ``text_field``: that is a setting to
    fix, not bad data to skip.
    """
    field = _TextField(source, text_field, skips)
    try:
        for location, text in _READERS[source.format](source, field):
            text = text.replace("\r\n", "\n")
            if len(text.strip()) < min_chars:
                skips.add(SKIP_TOO_SHORT, location)
            else:
                yield text
    except (OSError, pa.ArrowException) as error:  # truncated archive, corrupt parquet, bad CSV
        skips.add(SKIP_UNREADABLE, f"{source.path} ({error})")
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
        if isinstance(record, str):  # .json arrays (and .jsonl lines) may hold bare strings
            self.found += 1
            return record
        value = record.get(self.name) if isinstance(record, dict) else None
        if value is None:
            if isinstance(record, dict):
                self.keys_seen.update(record)
            self.skips.add(SKIP_NO_TEXT_FIELD, location)
            return None
        self.found += 1
        return self.from_value(value, location)

    def from_value(self, value: Any, location: str) -> str | None:
        if isinstance(value, bytes):
            return _decode(value, location, self.skips)
        if isinstance(value, str):
            return value
        self.skips.add(SKIP_NO_TEXT_FIELD if value is None else SKIP_NOT_TEXT, location)
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
    return io.BufferedReader(pa.input_stream(str(source.path), compression=source.compression), READ_BUFFER_BYTES)


def _is_binary(head: bytes) -> bool:
    return b"\x00" in head[:BINARY_SNIFF_BYTES]


def _skipped_as_binary(stream: io.BufferedReader, source: SourceFile, skips: SkipReport) -> bool:
    if _is_binary(stream.peek(BINARY_SNIFF_BYTES)):
        skips.add(SKIP_BINARY, str(source.path))
        return True
    return False


def _read_text(source: SourceFile, field: _TextField) -> Iterator[Located]:
    with _open(source) as stream:
        data = stream.read()
    location = str(source.path)
    if _is_binary(data):
        field.skips.add(SKIP_BINARY, location)
    elif (text := _decode(data, location, field.skips)) is not None:
        yield location, text


def _read_jsonl(source: SourceFile, field: _TextField) -> Iterator[Located]:
    with _open(source) as stream:
        if _skipped_as_binary(stream, source, field.skips):
            return
        line_start = 0
        for line_number, line in enumerate(stream, start=1):
            location = f"{source.path}:{line_number}"
            offset, line_start = line_start, line_start + len(line)
            if not line.strip():
                continue
            if (decoded := _decode(line, location, field.skips, offset)) is None:
                continue
            try:
                record = json.loads(decoded)
            except json.JSONDecodeError:
                field.skips.add(SKIP_INVALID_JSON, location)
                continue
            if (text := field.from_record(record, location)) is not None:
                yield location, text


def _read_json(source: SourceFile, field: _TextField) -> Iterator[Located]:
    with _open(source) as stream:
        if _skipped_as_binary(stream, source, field.skips):
            return
        data = stream.read()
    if (decoded := _decode(data, str(source.path), field.skips)) is None:
        return
    try:
        value = json.loads(decoded)
    except json.JSONDecodeError as error:
        field.skips.add(SKIP_INVALID_JSON, f"{source.path}:{error.lineno}")
        return
    yield from _numbered(source, value if isinstance(value, list) else [value], field.from_record)


def _read_csv(source: SourceFile, field: _TextField) -> Iterator[Located]:
    # The text column is read as bytes so that one bad value is skipped, not the whole file.
    options = pa_csv.ConvertOptions(include_columns=[field.name], column_types={field.name: pa.large_binary()})
    with _open(source) as stream:
        if _skipped_as_binary(stream, source, field.skips):
            return
        try:
            reader = pa_csv.open_csv(stream, read_options=pa_csv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                                     convert_options=options)
        except pa.ArrowKeyError:
            raise _missing_field_error(source, field.name, _csv_column_names(source)) from None
        yield from _numbered(source, _column_values(reader), field.from_value)


def _csv_column_names(source: SourceFile) -> list[str]:
    with _open(source) as stream:
        return pa_csv.open_csv(stream).schema.names


def _read_parquet(source: SourceFile, field: _TextField) -> Iterator[Located]:
    parquet = pq.ParquetFile(str(source.path))
    names = parquet.schema_arrow.names
    if field.name not in names:
        raise _missing_field_error(source, field.name, names)
    batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field.name])
    yield from _numbered(source, _column_values(batches), field.from_value)


def _read_hub(source: SourceFile, field: _TextField) -> Iterator[Located]:
    import datasets  # heavy; only hub corpora need it

    name, revision = str(source.path).removeprefix(HUB_PREFIX).rsplit("@", 1)
    records = datasets.load_dataset(name, split="train", streaming=True, revision=revision)
    yield from _numbered(source, records, field.from_record)


def _numbered(
    source: SourceFile, items: Iterable[Any], text_of: Callable[[Any, str], str | None]
) -> Iterator[Located]:
    """Texts of records or values, located as ``path:record N`` (1-based)."""
    for index, item in enumerate(items, start=1):
        location = f"{source.path}:record {index}"
        if (text := text_of(item, location)) is not None:
            yield location, text


def _column_values(batches: Iterable[pa.RecordBatch]) -> Iterator[Any]:
    for batch in batches:
        yield from batch.column(0).to_pylist()


_READERS: dict[str, Callable[[SourceFile, _TextField], Iterator[Located]]] = {
    "text": _read_text,
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_csv,
    "parquet": _read_parquet,
    "hub": _read_hub,
}
