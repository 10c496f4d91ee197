from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from gptflow.data import exact_dedup
from gptflow.data.code_version import code_version
from gptflow.data.commits import CONTENTS_FILE, is_complete
from gptflow.data.config import IngestConfig
from gptflow.data.errors import CorpusError
from gptflow.data.hashing import hash_bytes, split_by_hash
from gptflow.data.ingest import CorpusManifest, cut_into_segments, ingest_corpus, ingest_unit
from gptflow.data.readers import SKIP_BINARY, SKIP_TOO_SHORT
from gptflow.data.shards import RAW_SCHEMA, iter_raw_batches, raw_shard_paths
from gptflow.data.sources import SKIP_READ_ERROR, SKIP_UNSUPPORTED, SourceFile, resolve_sources
from gptflow.data.store import LOCAL_STORE

CONFIG = IngestConfig(val_fraction=0.3)
RAW_COLUMNS = ["text", "doc_hash", "split", "continues"]


def jsonl(texts: list[str]) -> str:
    return "".join(json.dumps({"text": text}) + "\n" for text in texts)


def ingest(folder: Path, store_dir: Path, config: IngestConfig = CONFIG, **kwargs) -> CorpusManifest:
    return ingest_corpus(resolve_sources([str(folder)]), config, store_dir, **kwargs)


def rows(directory: Path) -> list[tuple[str, str, str, bool]]:
    """``(text, doc_hash, split, continues)`` of every row of a raw unit, in file order."""
    return [row for batch in iter_raw_batches(directory, RAW_COLUMNS)
            for row in zip(*(column.to_pylist() for column in batch.columns))]


def documents_by_split(manifest: CorpusManifest) -> dict[str, str]:
    """doc_hash → split of every segment tokenize will see."""
    found = {}
    for unit in manifest.units:
        dropped = set(unit.drop_doc_hashes)
        for batch in iter_raw_batches(Path(unit.directory), ["doc_hash", "split"]):
            for doc_hash, split in zip(batch.column("doc_hash").to_pylist(), batch.column("split").to_pylist()):
                if doc_hash not in dropped:
                    found[doc_hash] = split
    return found


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in sorted(directory.iterdir())}


def test_each_file_becomes_a_committed_unit_of_hashed_split_documents(write_corpus, store_dir, make_documents):
    texts = make_documents(40)
    folder = write_corpus({"a.jsonl": jsonl(texts[:30]), "b.txt": texts[30]})
    manifest = ingest(folder, store_dir)

    assert [Path(unit.source).name for unit in manifest.units] == ["a.jsonl", "b.txt"]
    assert all(is_complete(Path(unit.directory)) for unit in manifest.units)
    assert next(iter_raw_batches(Path(manifest.units[0].directory), RAW_SCHEMA.names)).schema == RAW_SCHEMA
    # Documents shorter than segment_chars stay whole: one row each, continuing nothing.
    written = rows(Path(manifest.units[0].directory))
    assert [text for text, _, _, _ in written] == texts[:30]
    for text, doc_hash, split, continues in written:
        assert doc_hash == hash_bytes(text.encode())
        assert split == split_by_hash(doc_hash, CONFIG.val_fraction)
        assert not continues
    assert {split for _, _, split, _ in written} == {"train", "val"}
    assert sum(manifest.totals["segments"].values()) == manifest.total_documents == 31
    assert manifest.totals["cut_documents"] == manifest.totals["cut_segments"] == 0
    assert sum(manifest.totals["bytes"].values()) == sum(len(text.encode()) for text in texts[:31])


def test_manifest_is_written_under_its_fingerprint_and_round_trips(write_corpus, store_dir, make_documents):
    manifest = ingest(write_corpus({"a.jsonl": jsonl(make_documents(5))}), store_dir)
    assert Path(manifest.path) == store_dir / "manifests" / f"corpus-{manifest.fingerprint}.json"
    assert LOCAL_STORE.read_manifest(CorpusManifest, manifest.path) == manifest
    moved = store_dir.parent / "moved"  # the workspace copied elsewhere: its manifest names its own units
    shutil.copytree(store_dir, moved)
    assert [unit.directory for unit in LOCAL_STORE.read_manifest(CorpusManifest, moved / "manifests" / Path(manifest.path).name).units] \
        == [str(moved / "raw" / unit.key) for unit in manifest.units]


def test_duplicates_are_dropped_within_a_file_and_across_files(write_corpus, store_dir, make_documents):
    texts = make_documents(6)
    folder = write_corpus({
        "a.jsonl": jsonl([texts[0], texts[1], texts[0], texts[0]]),
        "b.jsonl": jsonl([texts[1], texts[2], texts[3]]),
        "c.txt": texts[2],
    })
    manifest = ingest(folder, store_dir)
    first, second, third = manifest.units

    assert first.duplicates == 2 and first.drop_doc_hashes == []
    assert second.drop_doc_hashes == [hash_bytes(texts[1].encode())]
    assert third.drop_doc_hashes == [hash_bytes(texts[2].encode())]
    assert sum(unit.segments["train"] + unit.segments["val"] for unit in manifest.units) == 4
    assert manifest.totals["duplicates"] == 4
    assert set(documents_by_split(manifest)) == {hash_bytes(text.encode()) for text in texts[:4]}


def test_dedup_over_hash_partitions_drops_what_one_pass_drops(write_corpus, store_dir, make_documents, monkeypatch):
    texts = make_documents(60)
    folder = write_corpus({f"part-{index}.jsonl": jsonl(texts[index * 10:index * 10 + 30]) for index in range(4)})
    whole = ingest(folder, store_dir)
    monkeypatch.setattr(exact_dedup, "DEDUP_PARTITION_SEGMENTS", 8)  # 60 unique of 120 segments: 15 partitions
    partitioned = ingest(folder, store_dir)

    assert sum(len(unit.drop_doc_hashes) for unit in whole.units) == 120 - 60
    assert [unit.drop_doc_hashes for unit in partitioned.units] == [unit.drop_doc_hashes for unit in whole.units]
    assert partitioned.totals == whole.totals and partitioned.fingerprint == whole.fingerprint


def test_adding_files_moves_no_document_between_splits(write_corpus, store_dir, make_documents):
    folder = write_corpus({"a.jsonl": jsonl(make_documents(100, "old"))})
    before = documents_by_split(ingest(folder, store_dir))
    write_corpus({"b.jsonl": jsonl(make_documents(100, "new")), "0-first.jsonl": jsonl(make_documents(50, "more"))})
    after = documents_by_split(ingest(folder, store_dir))
    assert len(after) == 250
    assert {doc_hash: after[doc_hash] for doc_hash in before} == before


def test_second_ingest_reuses_every_unit_byte_for_byte(write_corpus, store_dir, make_documents):
    folder = write_corpus({"a.jsonl": jsonl(make_documents(20)), "b.md": "# title\n\nbody"})
    first = ingest(folder, store_dir)
    files_before = [snapshot(Path(unit.directory)) for unit in first.units]
    second = ingest(folder, store_dir)
    assert [unit.reused for unit in first.units] == [False, False]
    assert [unit.reused for unit in second.units] == [True, True]
    assert [snapshot(Path(unit.directory)) for unit in second.units] == files_before
    assert second.fingerprint == first.fingerprint


def test_modified_file_gets_a_new_unit_and_the_others_are_reused(write_corpus, store_dir, make_documents):
    folder = write_corpus({"a.jsonl": jsonl(make_documents(20)), "b.txt": "version one"})
    first = ingest(folder, store_dir)
    (folder / "b.txt").write_text("version two")
    second = ingest(folder, store_dir)
    assert second.units[0].key == first.units[0].key and second.units[0].reused
    assert second.units[1].key != first.units[1].key and not second.units[1].reused
    assert second.fingerprint != first.fingerprint


def test_touched_but_unchanged_file_keeps_its_unit(write_corpus, store_dir, make_documents):
    folder = write_corpus({"a.txt": "same words", "b.jsonl": jsonl(make_documents(20))})
    first = ingest(folder, store_dir)
    os.utime(folder / "a.txt", ns=(1, 1))
    assert ingest(folder, store_dir).units[0].key == first.units[0].key


def test_changing_a_setting_that_changes_documents_changes_the_keys(write_corpus, store_dir, make_documents):
    folder = write_corpus({"a.jsonl": jsonl(make_documents(20))})
    first = ingest(folder, store_dir)
    assert ingest(folder, store_dir, IngestConfig(val_fraction=0.1)).units[0].key != first.units[0].key
    other_segments = IngestConfig(val_fraction=0.3, segment_chars=8192)
    assert ingest(folder, store_dir, other_segments).units[0].key != first.units[0].key
    same_documents = IngestConfig(val_fraction=0.3, shard_bytes=4096)
    assert ingest(folder, store_dir, same_documents).units[0].key == first.units[0].key


def test_large_file_is_written_in_several_shards_in_document_order(write_corpus, store_dir, make_documents):
    texts = make_documents(400)
    folder = write_corpus({"a.jsonl": jsonl(texts)})
    manifest = ingest(folder, store_dir, IngestConfig(val_fraction=0.3, shard_bytes=2048))
    directory = Path(manifest.units[0].directory)
    assert len(raw_shard_paths(directory)) > 5
    read_back = [text for batch in iter_raw_batches(directory, ["text"]) for text in batch.column("text").to_pylist()]
    assert read_back == texts


def test_skips_are_reported_in_the_manifest_even_for_reused_units(write_corpus, store_dir, make_documents):
    folder = write_corpus({"good.jsonl": jsonl(make_documents(20)), "blob.txt": b"\x00\x01", "empty.md": "  \n",
                           "x.docx": b"PK"})
    for _ in range(2):
        skips = ingest(folder, store_dir).skips
        assert skips.counts == {SKIP_BINARY: 1, SKIP_TOO_SHORT: 1, SKIP_UNSUPPORTED: 1}
        assert skips.examples[SKIP_BINARY] == [str(folder / "blob.txt")]


def test_corpus_with_no_usable_document_is_an_error_naming_the_skipped_files(write_corpus, store_dir):
    folder = write_corpus({"blob.txt": b"\x00\x01", "blank.txt": "\n\n"})
    with pytest.raises(CorpusError) as raised:
        ingest(folder, store_dir)
    message = str(raised.value)
    assert "no usable documents" in message
    assert f"{folder / 'blob.txt'}" in message and SKIP_BINARY in message
    assert f"{folder / 'blank.txt'}" in message and SKIP_TOO_SHORT in message


def test_corpus_too_small_for_a_validation_split_is_an_error_saying_what_to_do(write_corpus, store_dir):
    folder = write_corpus({"note.txt": "a text file shorter than one segment\n" * 100})
    with pytest.raises(CorpusError) as raised:
        ingest(folder, store_dir)
    message = str(raised.value)
    assert "val split is empty (documents: 1, segments: 1;" in message
    assert "lower --set data.segment_chars=<chars>" in message and "data.val_fraction" in message


def test_a_file_whose_read_fails_after_listing_is_skipped_counted_and_leaves_no_unit(
    write_corpus, store_dir, make_documents
):
    # The disk fails between listing and ingesting: /proc/self/mem opens, then its read fails with EIO.
    folder = write_corpus({"a.jsonl": jsonl(make_documents(20))})
    (folder / "failing.txt").symlink_to("/proc/self/mem")
    listed = resolve_sources([str(folder)]).files + [SourceFile(folder / "failing.txt", "text")]
    manifest = ingest_corpus(listed, CONFIG, store_dir)
    assert [Path(unit.source).name for unit in manifest.units] == ["a.jsonl"]
    assert manifest.skips.counts == {SKIP_READ_ERROR: 1}
    assert manifest.skips.examples[SKIP_READ_ERROR] == [f"{folder / 'failing.txt'} (Input/output error)"]
    assert len(list((store_dir / "raw").iterdir())) == 1
    assert str(folder / "failing.txt") not in json.loads((store_dir / "file-hashes.json").read_text())


def test_a_file_whose_read_fails_once_its_hash_is_known_leaves_no_unit_half_read(write_corpus, store_dir):
    # Its content hash known from an earlier run (file-hashes.json), the file is only read for its
    # documents, and that read fails: a unit of what was read so far would be reused as the file's.
    (store_dir.parent / "corpus").mkdir()
    failing = store_dir.parent / "corpus" / "failing.txt"
    failing.symlink_to("/proc/self/mem")
    unit, skips = ingest_unit(SourceFile(failing, "text"), "0" * 32, CONFIG, store_dir, LOCAL_STORE,
                              code_version("gptflow.data.ingest"))
    assert unit is None
    [location] = skips.examples[SKIP_READ_ERROR]  # the kernel's error for the reader's read pattern: EIO or EINVAL
    assert location.startswith(f"{failing} (") and skips.total == 1
    assert not (store_dir / "raw").exists() or not list((store_dir / "raw").iterdir())


def test_failed_file_leaves_no_unit_directory_behind(write_corpus, store_dir, make_documents):
    folder = write_corpus({"a.jsonl": jsonl(make_documents(5)), "b.jsonl": '{"body": "wrong field"}\n'})
    with pytest.raises(CorpusError, match=r"b\.jsonl"):
        ingest(folder, store_dir)
    raw = store_dir / "raw"
    assert [path.name for path in raw.iterdir() if path.name.startswith(".tmp-")] == []
    assert len(list(raw.iterdir())) == 1  # a.jsonl's unit, committed before b.jsonl failed


def test_interrupted_or_damaged_units_are_rebuilt_never_reused(write_corpus, store_dir, make_documents):
    folder = write_corpus({"a.jsonl": jsonl(make_documents(30))})
    directory = Path(ingest(folder, store_dir).units[0].directory)
    shard = raw_shard_paths(directory)[0]

    # A run killed before its commit leaves only a temporary directory, which must not count.
    os.rename(directory, directory.parent / f".tmp-{directory.name}-killed")
    rebuilt = ingest(folder, store_dir).units[0]
    assert not rebuilt.reused and is_complete(directory)

    # Damaged bytes in a committed unit: rebuilt too.
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert not is_complete(directory)
    assert not ingest(folder, store_dir).units[0].reused
    assert is_complete(directory) and (directory / CONTENTS_FILE).exists()
    assert pa.ipc.open_file(pa.py_buffer(shard.read_bytes())).read_all().num_rows == 30


def test_progress_counts_source_bytes_up_to_the_total(write_corpus, store_dir, make_documents):
    folder = write_corpus({"a.jsonl": jsonl(make_documents(30)), "b.txt": "some text"})
    calls = []
    ingest(folder, store_dir, progress=lambda done, total: calls.append((done, total)))
    total = sum(path.stat().st_size for path in folder.iterdir())
    assert calls[-1] == (total, total)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_a_long_document_is_cut_after_the_first_line_that_reaches_the_size():
    assert list(cut_into_segments("aaaa\nbbbb\ncccc\n", 3)) == ["aaaa", "\nbbbb", "\ncccc\n"]
    # Trailing spaces and blank lines go with the next segment, which always holds some text.
    assert list(cut_into_segments("ab  \n\n  cd ef\ngh", 2)) == ["ab", "  \n\n  cd ef", "\ngh"]
    assert list(cut_into_segments("aaaa\nbbbb\n\n\n", 3)) == ["aaaa", "\nbbbb\n\n\n"]
    assert list(cut_into_segments("short\ntext", 100)) == ["short\ntext"]
    assert list(cut_into_segments("no line end " * 100, 10)) == ["no line end " * 100]


def test_one_large_text_file_is_cut_into_segments_that_fill_both_splits(write_corpus, store_dir, stdlib_text):
    book = stdlib_text(300_000)
    [unit] = ingest(write_corpus({"book.txt": book}), store_dir).units
    written = rows(Path(unit.directory))

    assert "".join(text for text, _, _, _ in written) == book
    assert (unit.documents, unit.cut_documents, unit.cut_segments) == (1, 1, len(written))
    assert len(written) > 50 and all(len(text) >= CONFIG.segment_chars for text, _, _, _ in written[:-1])
    assert [continues for _, _, _, continues in written] == [False] + [True] * (len(written) - 1)
    for text, doc_hash, split, _ in written:
        assert doc_hash == hash_bytes(text.encode()) and split == split_by_hash(doc_hash, CONFIG.val_fraction)
    assert unit.segments["train"] > 0 and unit.segments["val"] > 0
    assert sum(unit.segments.values()) == len(written)


def test_text_appended_to_a_file_keeps_every_earlier_segment_in_its_split(write_corpus, store_dir, stdlib_text):
    grown = stdlib_text(400_000)
    folder = write_corpus({"book.txt": grown[:300_000]})
    before = rows(Path(ingest(folder, store_dir).units[0].directory))
    write_corpus({"book.txt": grown})  # the same file, grown at its end
    after = rows(Path(ingest(folder, store_dir).units[0].directory))

    assert len(after) > len(before) + 20
    # Every segment but the old last one: same text, hash, split and continuity.
    assert after[: len(before) - 1] == before[:-1]
    assert "".join(text for text, _, _, _ in after) == grown


def test_segments_repeated_within_a_file_are_dropped_and_break_the_text(write_corpus, store_dir):
    log = "start" + "\nthe same log line, again and again" * 1000 + "\nthe end"
    segments = list(cut_into_segments(log, CONFIG.segment_chars))
    assert len(set(segments)) == 3 and len(segments) > 5  # the first, many identical, the last
    [unit] = ingest(write_corpus({"app-log.txt": log}), store_dir).units

    written = rows(Path(unit.directory))
    assert [text for text, _, _, _ in written] == [segments[0], segments[1], segments[-1]]
    assert [continues for _, _, _, continues in written] == [False, True, False]
    assert unit.duplicates == len(segments) - 3
    assert (unit.documents, unit.cut_documents, unit.cut_segments) == (1, 1, len(segments))
