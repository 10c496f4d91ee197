"""A corpus read in place from S3 (``--corpus s3://bucket/raw/``), against a real S3 server (moto's)."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gptflow.data import content_hashes as content_hashes_module
from gptflow.data import readers as readers_module
from gptflow.data.config import IngestConfig
from gptflow.data.errors import CorpusError
from gptflow.data.ingest import FILE_HASH_CACHE, CorpusManifest, ingest_corpus
from gptflow.data.shards import iter_raw_batches
from gptflow.data.sources import SKIP_HIDDEN, SKIP_UNSUPPORTED, open_source, resolve_sources

CONFIG = IngestConfig(val_fraction=0.3)


def jsonl(texts: list[str]) -> str:
    return "".join(json.dumps({"text": text}) + "\n" for text in texts)


def parquet(texts: list[str]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buffer)
    return buffer.getvalue()


@pytest.fixture
def corpus_files(make_documents) -> dict[str, str | bytes]:
    """One file of each kind ingest reads, under the names a prefix listing finds them by."""
    texts = make_documents(40)
    return {
        "a.txt": texts[0],
        "nested/b.jsonl": jsonl(texts[1:15] + texts[1:3]),  # duplicates, dropped alike from both stores
        "nested/c.jsonl.gz": gzip.compress(jsonl(texts[15:25]).encode()),
        "d.parquet": parquet(texts[25:40]),
    }


def upload(bucket: str, files: dict[str, str | bytes]) -> None:
    import s3fs

    filesystem = s3fs.S3FileSystem(skip_instance_cache=True)
    for name, content in files.items():
        filesystem.pipe_file(f"{bucket}/{name}", content.encode() if isinstance(content, str) else content)


def documents(manifest: CorpusManifest) -> list[tuple[str, str, list[str], list[tuple[str, str, bool]]]]:
    """Each unit's name, content hash, drop list and ``(doc_hash, split, continues)`` rows."""
    return [(Path(unit.source).name, unit.content_hash, unit.drop_doc_hashes,
             [row for batch in iter_raw_batches(Path(unit.directory), ["doc_hash", "split", "continues"])
              for row in zip(*(column.to_pylist() for column in batch.columns))])
            for unit in manifest.units]


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The sources ingest opens (to hash them or read their documents), in order."""
    calls: list[str] = []

    def recording(source):
        calls.append(str(source.path))
        return open_source(source)

    monkeypatch.setattr(content_hashes_module, "open_source", recording)
    monkeypatch.setattr(readers_module, "open_source", recording)
    return calls


def test_a_prefix_lists_every_readable_object_below_it_and_a_glob_its_matches(s3_bucket, corpus_files):
    upload(s3_bucket, {f"raw/{name}": content for name, content in corpus_files.items()}
           | {"raw/notes.bin": b"\x00", "raw/.trash/old.txt": "gone", "rawer/other.txt": "not below raw/"})

    resolution = resolve_sources([f"{s3_bucket}/raw/"])
    assert [(source.path, source.format, source.compression) for source in resolution.files] == [
        (f"{s3_bucket}/raw/a.txt", "text", None),
        (f"{s3_bucket}/raw/d.parquet", "parquet", None),
        (f"{s3_bucket}/raw/nested/b.jsonl", "jsonl", None),
        (f"{s3_bucket}/raw/nested/c.jsonl.gz", "jsonl", "gzip"),
    ]
    assert resolution.skipped.counts == {SKIP_HIDDEN: 1, SKIP_UNSUPPORTED: 1}
    assert [source.name for source in resolution.files] == ["a.txt", "d.parquet", "b.jsonl", "c.jsonl.gz"]
    # Size and ETag as listed stand in for the bytes: the stage key needs no request per object.
    [size, etag] = resolution.fingerprint_inputs()[0][1:]
    assert size == len(corpus_files["a.txt"]) and etag.strip('"')
    # A source crosses to a Ray worker as its URL, and reads the same there.
    source = pickle.loads(pickle.dumps(resolution.files[0]))
    with open_source(source) as stream:
        assert stream.read() == corpus_files["a.txt"].encode()

    matched = resolve_sources([f"{s3_bucket}/raw/**/*.jsonl", f"{s3_bucket}/raw/a.txt"])
    assert [source.path for source in matched.files] == [f"{s3_bucket}/raw/a.txt", f"{s3_bucket}/raw/nested/b.jsonl"]


def test_objects_ingest_to_the_same_documents_as_the_same_files_on_disk(s3_bucket, corpus_files, write_corpus,
                                                                         tmp_path):
    upload(s3_bucket, {f"raw/{name}": content for name, content in corpus_files.items()})
    local = ingest_corpus(resolve_sources([str(write_corpus(corpus_files))]), CONFIG, tmp_path / "local-store")
    remote = ingest_corpus(resolve_sources([f"{s3_bucket}/raw/"]), CONFIG, tmp_path / "s3-store")

    assert [unit.source for unit in remote.units] == [f"{s3_bucket}/raw/{name}" for name in
                                                      ("a.txt", "d.parquet", "nested/b.jsonl", "nested/c.jsonl.gz")]
    assert not any(unit.reused for unit in remote.units)
    assert documents(remote) == documents(local)
    assert remote.totals == local.totals and remote.total_documents == 42 and remote.totals["duplicates"] == 2
    assert remote.fingerprint == local.fingerprint  # same bytes, same units: the source's name is not in a key


def test_a_rerun_reads_no_unchanged_object_and_a_changed_one_is_ingested_again(s3_bucket, corpus_files, store_dir,
                                                                                opened, make_documents):
    upload(s3_bucket, {f"raw/{name}": content for name, content in corpus_files.items()})
    first = ingest_corpus(resolve_sources([f"{s3_bucket}/raw/"]), CONFIG, store_dir)
    assert sorted(set(opened)) == sorted(unit.source for unit in first.units)
    hashes = json.loads((store_dir / FILE_HASH_CACHE).read_text())
    assert {url: set(entry) for url, entry in hashes.items()} == {unit.source: {"size", "etag", "hash"}
                                                                   for unit in first.units}

    opened.clear()
    second = ingest_corpus(resolve_sources([f"{s3_bucket}/raw/"]), CONFIG, store_dir)
    assert opened == []
    assert all(unit.reused for unit in second.units) and second.fingerprint == first.fingerprint

    changed = f"{s3_bucket}/raw/nested/b.jsonl"
    upload(s3_bucket, {"raw/nested/b.jsonl": jsonl(make_documents(5, prefix="new"))})
    third = ingest_corpus(resolve_sources([f"{s3_bucket}/raw/"]), CONFIG, store_dir)
    assert set(opened) == {changed}
    assert [unit.source for unit in third.units if not unit.reused] == [changed]
    assert third.total_documents == 1 + 5 + 10 + 15


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_missing_bucket_an_empty_prefix_or_an_unsupported_object_is_one_clear_error(s3_bucket):
    upload(s3_bucket, {"raw/a.txt": "text", "raw/model.bin": b"\x00\x01"})
    cases = {
        "s3://gptflow-no-such-bucket/raw/": "its bucket 'gptflow-no-such-bucket' does not exist",
        f"{s3_bucket}/empty/": "names no objects (none lies at or below it)",
        f"{s3_bucket}/raw/missing.txt": "names no objects",
        f"{s3_bucket}/raw/**/*.csv": "names no objects (none matches it)",
        f"{s3_bucket}/raw/model.bin": "has an unsupported type",
    }
    for url, problem in cases.items():
        with pytest.raises(CorpusError) as refused:
            resolve_sources([url])
        message = str(refused.value)
        assert url in message and problem in message and "\n" not in message


def test_an_endpoint_that_cannot_be_reached_is_named_with_the_setting_to_check(s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(CorpusError, match=r"cannot be reached \(EndpointConnectionError: .*\): check the endpoint "
                                          r"\(AWS_ENDPOINT_URL for S3\) and the network"):
        resolve_sources([f"{s3_bucket}/raw/"])
