from __future__ import annotations

import csv
import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gptflow.data.errors import MAX_EXAMPLES_PER_REASON, CorpusError, SkipReport
from gptflow.data.readers import (
    SKIP_BINARY,
    SKIP_INVALID_JSON,
    SKIP_INVALID_UTF8,
    SKIP_NO_TEXT_FIELD,
    SKIP_NOT_TEXT,
    SKIP_TOO_SHORT,
    SKIP_UNREADABLE,
)

DOCS = ["first document", "second\r\ndocument, with a comma and \"quotes\"", "third: ünïcödé ✓"]
EXPECTED = [doc.replace("\r\n", "\n") for doc in DOCS]


def jsonl_bytes(records: list[object]) -> bytes:
    return "".join(json.dumps(record) + "\n" for record in records).encode()


def csv_bytes(rows: list[dict[str, object]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def zstd_bytes(data: bytes) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as stream:
        stream.write(data)
    return sink.getvalue().to_pybytes()


RECORDS = [{"id": index, "text": doc} for index, doc in enumerate(DOCS)]

STRUCTURED = {
    "docs.jsonl": jsonl_bytes(RECORDS),
    "docs.jsonl.gz": gzip.compress(jsonl_bytes(RECORDS)),
    "docs.jsonl.zst": zstd_bytes(jsonl_bytes(RECORDS)),
    "objects.json": json.dumps(RECORDS).encode(),
    "strings.json": json.dumps(DOCS).encode(),
    "docs.csv": csv_bytes(RECORDS),
    "docs.csv.gz": gzip.compress(csv_bytes(RECORDS)),
}


@pytest.mark.parametrize("name", sorted(STRUCTURED))
def test_every_record_format_yields_the_documents_in_order(write_corpus, read_file, name):
    folder = write_corpus({name: STRUCTURED[name]})
    documents, skips = read_file(folder / name)
    assert documents == EXPECTED
    assert skips.total == 0


def test_parquet_yields_the_text_column_in_order(tmp_path, read_file):
    path = tmp_path / "docs.parquet"
    # Small row groups and pages: the reader must stream across them, not read one.
    pq.write_table(pa.table({"id": [1, 2, 3], "text": DOCS}), path, row_group_size=2)
    assert read_file(path) == (EXPECTED, SkipReport())


@pytest.mark.parametrize("name", ["essay.txt", "README.md", "module.py", "guide.rst", "essay.txt.gz"])
def test_text_files_are_one_normalised_document_each(write_corpus, read_file, name):
    text = "\ufeffline one\r\nline two\r\n"
    data = text.encode()
    folder = write_corpus({name: gzip.compress(data) if name.endswith(".gz") else data})
    assert read_file(folder / name)[0] == ["line one\nline two\n"]


def test_single_json_object_is_one_document(write_corpus, read_file):
    folder = write_corpus({"one.json": json.dumps({"title": "t", "body": "the body"})})
    assert read_file(folder / "one.json", text_field="body")[0] == ["the body"]


def test_binary_file_is_skipped_whole_with_its_path(write_corpus, read_file):
    folder = write_corpus({"model.txt": b"weights\x00\x01\x02", "rows.jsonl": b'{"text": "a"}\n\x00\x00\x00'})
    for name in ("model.txt", "rows.jsonl"):
        documents, skips = read_file(folder / name)
        assert documents == []
        assert skips.counts == {SKIP_BINARY: 1}
        assert skips.examples[SKIP_BINARY] == [str(folder / name)]


def test_invalid_utf8_text_file_is_skipped_naming_the_byte_offset(write_corpus, read_file):
    folder = write_corpus({"latin1.txt": "café au lait".encode("latin-1")})
    documents, skips = read_file(folder / "latin1.txt")
    assert documents == []
    assert skips.examples[SKIP_INVALID_UTF8] == [f"{folder / 'latin1.txt'} (byte 3)"]


def test_bad_jsonl_lines_are_skipped_and_located_the_rest_is_read(write_corpus, read_file):
    lines = [
        b'{"text": "good one"}',
        b'{"text": "truncated',
        b"",
        '{"text": "caf\xe9"}'.encode("latin-1"),
        b'{"title": "no text here"}',
        b'{"text": 42}',
        b'{"text": "   "}',
        b'["not", "an", "object"]',
        b'{"text": "good two"}',
    ]
    folder = write_corpus({"rows.jsonl": b"\n".join(lines) + b"\n"})
    path = folder / "rows.jsonl"
    documents, skips = read_file(path)
    assert documents == ["good one", "good two"]
    offset_of_line_4 = sum(len(line) + 1 for line in lines[:3]) + lines[3].index(b"\xe9")
    assert skips.examples == {
        SKIP_INVALID_JSON: [f"{path}:2"],
        SKIP_INVALID_UTF8: [f"{path}:4 (byte {offset_of_line_4})"],
        SKIP_NO_TEXT_FIELD: [f"{path}:5", f"{path}:8"],
        SKIP_NOT_TEXT: [f"{path}:6"],
        SKIP_TOO_SHORT: [f"{path}:7"],
    }
    assert skips.total == 6


def test_file_where_no_record_has_the_text_field_is_an_error_naming_keys_and_fix(write_corpus, read_file):
    folder = write_corpus({"posts.jsonl": jsonl_bytes([{"body": "a", "id": 1}, {"body": "b", "id": 2}])})
    with pytest.raises(CorpusError) as raised:
        read_file(folder / "posts.jsonl")
    message = str(raised.value)
    assert str(folder / "posts.jsonl") in message
    assert "'text'" in message and "body, id" in message
    assert "--set data.text_field=<key>" in message


@pytest.mark.parametrize("name", ["table.csv", "table.parquet"])
def test_table_without_the_text_column_is_an_error_naming_its_columns(tmp_path, read_file, name):
    path = tmp_path / name
    if name.endswith(".csv"):
        path.write_bytes(csv_bytes([{"content": "a", "label": 1}]))
    else:
        pq.write_table(pa.table({"content": ["a"], "label": [1]}), path)
    with pytest.raises(CorpusError, match=r"text field 'text' \(its records have: content, label\)"):
        read_file(path)


def test_csv_row_with_invalid_utf8_skips_only_that_row_naming_its_line(tmp_path, read_file):
    path = tmp_path / "mixed.csv"
    path.write_bytes(b'text,n\nfine,1\n"two\nlines",2\ncaf\xe9,3\nalso fine,4\n')
    documents, skips = read_file(path)
    assert documents == ["fine", "two\nlines", "also fine"]
    assert skips.examples[SKIP_INVALID_UTF8] == [f"{path}:5"]


def test_documents_shorter_than_min_chars_after_stripping_are_skipped(write_corpus, read_file):
    folder = write_corpus({"rows.jsonl": jsonl_bytes([{"text": "  hi  "}, {"text": "hello"}, {"text": "\n\t"}])})
    documents, skips = read_file(folder / "rows.jsonl", min_chars=3)
    assert documents == ["hello"]
    assert skips.counts == {SKIP_TOO_SHORT: 2}


def test_truncated_archive_is_counted_unreadable_not_a_crash(write_corpus, read_file):
    records = [f"record {index}" for index in range(2000)]
    compressed = gzip.compress(jsonl_bytes([{"text": text} for text in records]))
    folder = write_corpus({"cut.jsonl.gz": compressed[: len(compressed) // 2]})
    documents, skips = read_file(folder / "cut.jsonl.gz")
    assert documents == records[: len(documents)]
    assert skips.counts == {SKIP_UNREADABLE: 1}
    assert skips.examples[SKIP_UNREADABLE][0].startswith(str(folder / "cut.jsonl.gz"))


def test_skip_reports_merge_counts_cap_examples_and_survive_json():
    first, second = SkipReport(), SkipReport()
    for line in range(4):
        first.add(SKIP_INVALID_JSON, f"a.jsonl:{line}")
        second.add(SKIP_INVALID_JSON, f"b.jsonl:{line}")
    second.add(SKIP_BINARY, "blob.txt")
    first.merge(second)
    assert first.counts == {SKIP_INVALID_JSON: 8, SKIP_BINARY: 1}
    assert len(first.examples[SKIP_INVALID_JSON]) == MAX_EXAMPLES_PER_REASON
    assert SkipReport.from_dict(json.loads(json.dumps(first.to_dict()))) == first
    summary = first.summary()
    assert summary.startswith("skipped 9 inputs: invalid JSON ×8 (a.jsonl:0")
    assert ", ...)" in summary and "binary file ×1 (blob.txt)" in summary


def test_relocated_report_points_at_the_files_new_path():
    report = SkipReport()
    report.add(SKIP_INVALID_JSON, "/old/place/a.jsonl:3")
    moved = report.relocated("/old/place/a.jsonl", "/new/a.jsonl")
    assert moved.examples == {SKIP_INVALID_JSON: ["/new/a.jsonl:3"]}
    assert report.examples == {SKIP_INVALID_JSON: ["/old/place/a.jsonl:3"]}
