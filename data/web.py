"""Web inputs: HTML files (``.html .htm``) and WARC files (``.warc``, ``.warc.gz``) → the main text
of each page, extracted once per file into its own cached unit.

A WARC file's documents are its ``response`` records whose HTTP ``Content-Type`` is HTML, each
with its ``WARC-Target-URI`` kept as the page's URL; an HTML file is one page (no URL). The main
text (navigation, headers and footers left out) is extracted by resiliparse's
``extract_plain_text(main_content=True)``: measured on Python's HTML documentation it keeps about
the same text as trafilatura at about 20x its speed (``bench/html_extraction.py``, bench/RESULTS.md).

Extraction is the expensive step and depends on nothing but the file's bytes, so it is a unit of
its own, ``extracted/<key>/`` (``pages.arrow`` + ``unit.json``), keyed by the file's content hash,
format, this code's version and resiliparse's: settings of later steps (language, segments, PII)
change the ingest unit's key, never this one, so changing them re-reads extracted text only.

Bad input is skipped and counted as for every format, located ``path:record N`` (the WARC
record's number, from 1): a record that cannot be parsed (the rest of the file with it, since a
WARC reader cannot find the next record after a broken one), a record cut short by the file's end
(a truncated download: its page is not kept half), a page that is not in its declared or detected
encoding, and a page without main text. As in every reader, a file that breaks off (a truncated
``.html.gz``) keeps what was read before it, and a read the system fails is a
``SourceReadError``. Records that are not HTML responses (requests, metadata, images) are no
documents and are not counted.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa

from gptflow.data.code_version import code_version
from gptflow.data.errors import SkipReport, UserError
from gptflow.data.hashing import hash_json
from gptflow.data.readers import SKIP_TOO_SHORT, SKIP_UNREADABLE, SourceReadError
from gptflow.data.shards import read_unit_file, write_unit_file
from gptflow.data.sources import SourceFile, open_source
from gptflow.data.store import ArtifactStore

WEB_FORMATS = {"html", "warc"}
PAGES_FILE = "pages.arrow"
INSTALL_HINT = "pip install 'gptflow[web]'"
PAGES_PER_BATCH = 256
READ_CHUNK_BYTES = 1 << 16

SKIP_MALFORMED_WARC = "malformed WARC record (the rest of the file)"
SKIP_CUT_SHORT_WARC = "WARC record cut short (the file ends inside it)"
SKIP_UNDECODABLE_PAGE = "page not in its declared encoding"
SKIP_NO_MAIN_TEXT = "page without main text"

_PAGES_SCHEMA = pa.schema([("record", pa.string()), ("url", pa.string()), ("text", pa.large_string())])


class WebInputsUnavailableError(UserError):
    """A corpus has HTML or WARC files but the extractor or WARC reader is not installed."""


def extractor_version() -> str:
    """resiliparse's and warcio's versions (they decide the text extracted, so they key the unit);
    a ``WebInputsUnavailableError`` naming the install when either is missing."""
    try:
        return f"resiliparse {metadata.version('resiliparse')}, warcio {metadata.version('warcio')}"
    except metadata.PackageNotFoundError:
        raise WebInputsUnavailableError(f"HTML and WARC corpus files need resiliparse and warcio: {INSTALL_HINT}.") \
            from None


def web_documents(source: SourceFile, name: str, content_hash: str, min_chars: int, store_dir: Path,
                  artifacts: ArtifactStore, skips: SkipReport) -> Iterator[tuple[str, str | None]]:
    """The documents of a web file for its ingest unit, ``(text, url)``: the main text of its pages
    and their URLs (None for an HTML file), from its extraction unit (``store_dir/extracted/<key>/``),
    pages shorter than ``min_chars`` skipped."""
    key = hash_json(extraction_key_fields(source, content_hash, code_version(__name__)))
    for location, url, text in extracted_pages(source, name, store_dir / "extracted" / key, artifacts, skips):
        if len(text.strip()) < min_chars:
            skips.add(SKIP_TOO_SHORT, location)
        else:
            yield text, url or None


def extracted_pages(source: SourceFile, name: str, directory: Path, artifacts: ArtifactStore,
                    skips: SkipReport) -> Iterator[tuple[str, str, str]]:
    """``(location, url, text)`` of each page of ``source`` with main text, from its extraction unit
    at ``directory``, written first unless complete; the unit's skips join ``skips``, located in
    ``name`` (the file's name now: a unit found by content may have been written under another)."""
    if not artifacts.is_complete(directory):
        _write_extraction_unit(source, name, directory, artifacts)
    written = read_unit_file(directory)
    skips.merge(SkipReport.from_dict(written["skips"]).relocated(written["source"], name))
    with pa.memory_map(str(directory / PAGES_FILE)) as stream:
        reader = pa.ipc.open_file(stream)
        for index in range(reader.num_record_batches):
            batch = reader.get_batch(index).to_pydict()
            for record, url, text in zip(batch["record"], batch["url"], batch["text"]):
                yield f"{name}:{record}" if record else name, url, text


def _write_extraction_unit(source: SourceFile, name: str, directory: Path, artifacts: ArtifactStore) -> None:
    skips = SkipReport()
    pages = 0
    with artifacts.commit(directory) as tmp:
        with pa.ipc.new_file(str(tmp / PAGES_FILE), _PAGES_SCHEMA) as writer:
            batch: list[tuple[str, str, str]] = []
            try:
                for page in _pages(source, name, skips):
                    batch.append(page)
                    pages += 1
                    if len(batch) == PAGES_PER_BATCH:
                        writer.write_batch(_as_batch(batch))
                        batch = []
            except (OSError, EOFError, pa.ArrowException) as error:  # as data.readers.read_records takes them
                if isinstance(error, OSError) and error.errno is not None and not source.is_object:
                    # The system failed the read (a failing disk): nothing of the file is kept.
                    raise SourceReadError(error.errno, error.strerror, str(source.path)) from error
                skips.add(SKIP_UNREADABLE, f"{name} ({_first_line(error)})")  # a broken archive: the rest of it
            writer.write_batch(_as_batch(batch))
        write_unit_file(tmp, {"source": name, "pages": pages, "skips": skips.to_dict()})


def _as_batch(pages: list[tuple[str, str, str]]) -> pa.RecordBatch:
    records, urls, texts = zip(*pages) if pages else ((), (), ())
    return pa.RecordBatch.from_arrays([pa.array(records, pa.string()), pa.array(urls, pa.string()),
                                       pa.array(texts, pa.large_string())], schema=_PAGES_SCHEMA)


def _pages(source: SourceFile, name: str, skips: SkipReport) -> Iterator[tuple[str, str, str]]:
    """``(record, url, text)`` per page with main text; ``record`` is ``record N``, or empty for an
    HTML file, which is one page."""
    if source.format == "html":
        with pa.input_stream(open_source(source), compression=source.compression) as stream:
            data = stream.read()
        if (text := _main_text(data, None, name, skips)) is not None:
            yield "", "", text
        return
    yield from _warc_pages(source, name, skips)


def read_pages(source: SourceFile, skips: SkipReport) -> Iterator[tuple[str, str]]:
    """``(location, text)`` of each page of an HTML or WARC file, extracted now (no unit): for the
    readers of files that are not a corpus; ingest reads ``extracted_pages``."""
    extractor_version()
    for record, _, text in _pages(source, str(source.path), skips):
        yield (f"{source.path}:{record}" if record else str(source.path)), text


def _warc_pages(source: SourceFile, name: str, skips: SkipReport) -> Iterator[tuple[str, str, str]]:
    from warcio.archiveiterator import ArchiveIterator
    from warcio.exceptions import ArchiveLoadFailed

    number = 0
    # warcio reads the record-by-record gzip of .warc.gz itself; zstd it cannot.
    with pa.input_stream(open_source(source), compression="zstd" if source.compression == "zstd" else None) as stream:
        try:
            for number, record in enumerate(ArchiveIterator(stream), start=1):
                location = f"{name}:record {number}"
                content_type = (record.http_headers.get_header("Content-Type") or "") if record.http_headers else ""
                is_page = record.rec_type == "response" and "html" in content_type.lower()
                data = record.content_stream().read() if is_page else None
                while record.raw_stream.read(READ_CHUNK_BYTES):  # the rest of what it declares: all there?
                    pass
                if record.raw_stream.limit > 0:
                    skips.add(SKIP_CUT_SHORT_WARC, location)
                    return
                if data is not None and (text := _main_text(data, _charset(content_type), location, skips)) is not None:
                    yield f"record {number}", record.rec_headers.get_header("WARC-Target-URI") or "", text
        except (ArchiveLoadFailed, EOFError, zlib.error, ValueError) as error:
            skips.add(SKIP_MALFORMED_WARC, f"{name}:record {number + 1} ({_first_line(error)})")


def _charset(content_type: str) -> str | None:
    for parameter in content_type.split(";")[1:]:
        key, _, value = parameter.partition("=")
        if key.strip().lower() == "charset" and value.strip():
            return value.strip().strip("\"'")
    return None


def _main_text(data: bytes, charset: str | None, location: str, skips: SkipReport) -> str | None:
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.encoding import detect_encoding

    encoding = charset or detect_encoding(data)
    try:
        html = data.decode(encoding)
    except (UnicodeDecodeError, LookupError):
        skips.add(SKIP_UNDECODABLE_PAGE, f"{location} ({encoding})")
        return None
    text = extract_plain_text(html, main_content=True).strip()
    if not text:
        skips.add(SKIP_NO_MAIN_TEXT, location)
        return None
    return text


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def extraction_key_fields(source: SourceFile, content_hash: str, code: str) -> dict[str, Any]:
    """What an extraction unit's key hashes: the file's bytes and format, and the code that reads them."""
    return {"stage": "extract", "code": code, "extractor": extractor_version(), "content": content_hash,
            "format": source.format, "compression": source.compression}
