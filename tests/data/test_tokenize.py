from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from tokenizers import Tokenizer

from gptflow.data.config import IngestConfig, TokenizeConfig
from gptflow.data.hashing import hash_bytes
from gptflow.data.ingest import CorpusUnit, cut_into_segments, ingest_corpus
from gptflow.data.shards import (
    SPLITS,
    TOKENS_PER_RECORD_BATCH,
    TokenShardWriter,
    iter_raw_batches,
    iter_token_arrays,
    token_dtype,
)
from gptflow.data.sources import resolve_sources
from gptflow.data.stats import token_counts
from gptflow.data.store import LOCAL_STORE
from gptflow.data.token_shards import BATCH_TOKENS, BatchIndex, IndexedShardWriter, batch_index_path, batch_tokens
from gptflow.data.tokenize import PIECE_CHARS, TokenManifest, cut_at_token_boundaries, tokenize_corpus
from gptflow.data.tokenizer import load_tokenizer


def segments(unit: CorpusUnit, split: str) -> list[str]:
    dropped = set(unit.drop_doc_hashes)
    return [
        text
        for batch in iter_raw_batches(Path(unit.directory), ["text", "doc_hash", "split"])
        for text, doc_hash, row_split in zip(*(column.to_pylist() for column in batch.columns))
        if row_split == split and doc_hash not in dropped
    ]


def stretches(unit: CorpusUnit, split: str) -> list[str]:
    """The texts tokenize must encode whole, each followed by end-of-text: runs of consecutive rows
    of ``split``, none dropped, each after the first continuing the one before it."""
    dropped = set(unit.drop_doc_hashes)
    found: list[str] = []
    extends = False
    for batch in iter_raw_batches(Path(unit.directory), ["text", "doc_hash", "split", "continues"]):
        for text, doc_hash, row_split, continues in zip(*(column.to_pylist() for column in batch.columns)):
            if doc_hash in dropped or row_split != split:
                extends = False
                continue
            if extends and continues:
                found[-1] += text
            else:
                found.append(text)
            extends = True
    return found


def expected_tokens(unit: CorpusUnit, split: str, tokenizer: Tokenizer, eot_id: int) -> list[int]:
    return [i for text in stretches(unit, split) for i in [*tokenizer.encode(text).ids, eot_id]]


def read_tokens(path: Path) -> np.ndarray:
    arrays = list(iter_token_arrays(path)) if path.exists() else []
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint16)


@pytest.fixture(scope="module")
def tiny_tokens(tiny_manifest, tiny_tokenizer, tmp_path_factory) -> TokenManifest:
    return tokenize_corpus(tiny_manifest, tiny_tokenizer, TokenizeConfig(), tmp_path_factory.mktemp("tokens"))


def test_tokens_are_each_stretch_of_text_encoded_whole_then_end_of_text(tiny_manifest, tiny_tokenizer, tiny_tokens):
    tokenizer = load_tokenizer(tiny_tokenizer)
    assert max(len(text) for unit in tiny_manifest.units for text in stretches(unit, "train")) > 2 * PIECE_CHARS
    assert sum(unit.cut_documents for unit in tiny_manifest.units) > 10
    for raw_unit, token_unit in zip(tiny_manifest.units, tiny_tokens.units):
        for split in SPLITS:
            expected = expected_tokens(raw_unit, split, tokenizer, tiny_tokenizer.eot_id)
            tokens = read_tokens(Path(token_unit.directory) / f"{split}.arrow")
            assert tokens.tolist() == expected, (raw_unit.source, split)
            assert token_unit.n_tokens[split] == len(expected)
            assert int((tokens == tiny_tokenizer.eot_id).sum()) == len(stretches(raw_unit, split))
            texts = segments(raw_unit, split)
            assert token_unit.n_segments[split] == len(texts)
            assert token_unit.n_bytes[split] == sum(len(text.encode()) for text in texts)


def test_small_vocabulary_is_stored_as_uint16(tiny_tokens):
    assert tiny_tokens.dtype == "uint16"
    assert {read_tokens(path).dtype for path in tiny_tokens.paths("train")} == {np.dtype(np.uint16)}


def test_token_dtype_is_the_narrowest_that_holds_every_id():
    assert token_dtype(512) == token_dtype(1 << 16) == np.uint16
    assert token_dtype((1 << 16) + 1) == token_dtype(1 << 20) == np.uint32


def test_manifest_totals_paths_and_round_trip(tiny_manifest, tiny_tokens):
    assert Path(tiny_tokens.path).name == f"tokens-{tiny_tokens.fingerprint}.json"
    assert LOCAL_STORE.read_manifest(TokenManifest, tiny_tokens.path) == tiny_tokens
    for split in SPLITS:
        assert tiny_tokens.total_segments(split) == tiny_manifest.totals["segments"][split]
        assert tiny_tokens.total_bytes(split) == tiny_manifest.totals["bytes"][split]
        assert sum(len(read_tokens(path)) for path in tiny_tokens.paths(split)) == tiny_tokens.total_tokens(split)
        assert tiny_tokens.shard_tokens(split) == [len(read_tokens(path)) for path in tiny_tokens.paths(split)]
        # Beside each shard, how often each id occurs in it: what the unigram baseline reads.
        every_id = np.concatenate([read_tokens(path) for path in tiny_tokens.paths(split)])
        assert np.array_equal(token_counts(tiny_tokens.paths(split), tiny_tokens.vocab_size),
                              np.bincount(every_id, minlength=tiny_tokens.vocab_size))
    # Most small files have no val document: their units hold no val file and are not listed.
    without_val = [unit for unit in tiny_tokens.units if unit.n_tokens["val"] == 0]
    assert without_val and not any((Path(unit.directory) / "val.arrow").exists() for unit in without_val)
    assert len(tiny_tokens.paths("val")) == len(tiny_tokens.units) - len(without_val)


def test_tiny_batches_spanning_many_units_give_identical_shards(tiny_manifest, tiny_tokenizer, tiny_tokens, tmp_path):
    small = tokenize_corpus(tiny_manifest, tiny_tokenizer, TokenizeConfig(batch_bytes=1024), tmp_path)
    assert small.fingerprint == tiny_tokens.fingerprint
    for ours, theirs in zip(small.units, tiny_tokens.units):
        for split in ("train", "val"):
            assert np.array_equal(read_tokens(Path(ours.directory) / f"{split}.arrow"),
                                  read_tokens(Path(theirs.directory) / f"{split}.arrow"))


def test_second_run_reuses_every_unit_untouched(tiny_manifest, tiny_tokenizer, tmp_path):
    first = tokenize_corpus(tiny_manifest, tiny_tokenizer, TokenizeConfig(), tmp_path)
    stamps = {path: path.stat().st_mtime_ns for unit in first.units for path in Path(unit.directory).iterdir()}
    calls = []
    second = tokenize_corpus(tiny_manifest, tiny_tokenizer, TokenizeConfig(), tmp_path,
                             progress=lambda done, total: calls.append((done, total)))
    assert not any(unit.reused for unit in first.units) and all(unit.reused for unit in second.units)
    assert second.units == [dataclasses.replace(unit, reused=True) for unit in first.units]
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps
    total = tiny_manifest.totals["bytes"]["train"] + tiny_manifest.totals["bytes"]["val"]
    assert calls == [(total, total)]


def test_documents_dropped_as_cross_file_duplicates_are_not_tokenized(
    write_corpus, store_dir, tiny_tokenizer, make_documents
):
    shared = "a paragraph that two files both contain"
    others = make_documents(20)
    folder = write_corpus({"a.txt": shared, "b.jsonl": "".join(json.dumps({"text": text}) + "\n"
                                                                for text in [shared, *others])})
    manifest = ingest_corpus(resolve_sources([str(folder)]), IngestConfig(val_fraction=0.3), store_dir)
    progress = []
    tokens = tokenize_corpus(manifest, tiny_tokenizer, TokenizeConfig(), store_dir,
                             progress=lambda done, total: progress.append((done, total)))
    assert tokens.total_segments("train") + tokens.total_segments("val") == 21
    every_token = np.concatenate([read_tokens(path) for split in ("train", "val") for path in tokens.paths(split)])
    assert int((every_token == tiny_tokenizer.eot_id).sum()) == 21
    unique_bytes = len(shared) + sum(len(text) for text in others)
    assert progress[-1] == (unique_bytes, unique_bytes)


def test_changed_drop_list_retokenizes_only_that_unit(write_corpus, store_dir, tiny_tokenizer, make_documents):
    config = IngestConfig(val_fraction=0.3)
    folder = write_corpus({"a.txt": "alpha text", "b.txt": "beta text",
                           "c.jsonl": "".join(json.dumps({"text": text}) + "\n" for text in make_documents(20))})
    first = tokenize_corpus(ingest_corpus(resolve_sources([str(folder)]), config, store_dir),
                            tiny_tokenizer, TokenizeConfig(), store_dir)
    write_corpus({"0.jsonl": json.dumps({"text": "beta text"}) + "\n"})  # sorts first: b.txt now a duplicate
    manifest = ingest_corpus(resolve_sources([str(folder)]), config, store_dir)
    second = tokenize_corpus(manifest, tiny_tokenizer, TokenizeConfig(), store_dir)
    by_source = {Path(unit.source).name: unit for unit in second.units}
    assert by_source["a.txt"].reused and by_source["a.txt"].key == first.units[0].key
    assert not by_source["b.txt"].reused and by_source["b.txt"].n_segments == {"train": 0, "val": 0}


def test_segments_encode_to_the_tokens_of_the_whole_document(tiny_tokenizer, stdlib_text):
    tokenizer = load_tokenizer(tiny_tokenizer)
    text = stdlib_text(100_000) + "para one  \n\n\tpara two\n\n\n   indented \t\n\n" * 400
    parts = list(cut_into_segments(text, 256))
    assert len(parts) > 300
    assert [i for part in parts for i in tokenizer.encode(part).ids] == tokenizer.encode(text).ids


def test_a_large_file_reads_as_one_text_broken_only_where_val_took_a_segment(
    write_corpus, store_dir, tiny_tokenizer, stdlib_text
):
    folder = write_corpus({"book.txt": stdlib_text(300_000)})
    manifest = ingest_corpus(resolve_sources([str(folder)]), IngestConfig(val_fraction=0.2), store_dir)
    [unit] = manifest.units
    splits = [split for batch in iter_raw_batches(Path(unit.directory), ["split"])
              for split in batch.column("split").to_pylist()]
    train_runs = sum(1 for index, split in enumerate(splits)
                     if split == "train" and (index == 0 or splits[index - 1] == "val"))
    [token_unit] = tokenize_corpus(manifest, tiny_tokenizer, TokenizeConfig(), store_dir).units

    train = read_tokens(Path(token_unit.directory) / "train.arrow")
    assert int((train == tiny_tokenizer.eot_id).sum()) == train_runs < unit.segments["train"] / 2
    assert train[-1] == tiny_tokenizer.eot_id
    tokenizer = load_tokenizer(tiny_tokenizer)
    between_ends = np.split(train, np.flatnonzero(train == tiny_tokenizer.eot_id) + 1)[:-1]
    assert [tokenizer.decode(part[:-1].tolist()) for part in between_ends] == stretches(unit, "train")


def test_a_dropped_segment_breaks_the_text_and_a_long_line_is_cut_exactly(
    write_corpus, store_dir, tiny_tokenizer, stdlib_text
):
    book = stdlib_text(100_000)
    config = IngestConfig(val_fraction=0.2)
    copied = list(cut_into_segments(book, config.segment_chars))[10]
    one_line = " ".join(f"word{index}" for index in range(8000))  # no line end: one segment, > 2 pieces
    folder = write_corpus({"0-copied.txt": copied, "book.txt": book, "one-line.txt": one_line})
    manifest = ingest_corpus(resolve_sources([str(folder)]), config, store_dir)
    assert manifest.units[1].drop_doc_hashes == [hash_bytes(copied.encode())]
    assert len(one_line) > 2 * PIECE_CHARS and manifest.units[2].cut_documents == 0

    tokens = tokenize_corpus(manifest, tiny_tokenizer, TokenizeConfig(), store_dir)
    tokenizer = load_tokenizer(tiny_tokenizer)
    for raw_unit, token_unit in zip(manifest.units, tokens.units):
        for split in SPLITS:
            expected = expected_tokens(raw_unit, split, tokenizer, tiny_tokenizer.eot_id)
            assert read_tokens(Path(token_unit.directory) / f"{split}.arrow").tolist() == expected, raw_unit.source


@pytest.mark.parametrize("min_chars", [8, 64, 1000])
def test_cutting_at_token_boundaries_never_changes_the_tokens(tiny_manifest, tiny_tokenizer, min_chars):
    tokenizer = load_tokenizer(tiny_tokenizer)
    texts = [text for unit in tiny_manifest.units[:10] for text in stretches(unit, "train")] + [
        "it's  two  spaces,\tтабы and \n\n\n  blank lines  \n  " * 40,
        "digits 123 456\n789 x1 y2\n" * 60,
        "naïve café ünïcödé 日本語 テキスト 🎉 done " * 50,
    ]
    cuts = 0
    for text in texts:
        parts = cut_at_token_boundaries(text, min_chars)
        assert "".join(parts) == text
        assert all(len(part) >= min_chars for part in parts[:-1])
        cuts += len(parts) - 1
        assert [i for part in parts for i in tokenizer.encode(part).ids] == tokenizer.encode(text).ids
    assert cuts > len(texts)


def test_token_shard_record_batches_hold_at_most_a_million_tokens(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 60_000, size=int(2.5 * TOKENS_PER_RECORD_BATCH), dtype=np.uint16)
    writer = TokenShardWriter(tmp_path / "train.arrow", np.dtype(np.uint16))
    for chunk in np.array_split(tokens, 37):
        writer.write(chunk)
    writer.close()
    batches = list(iter_token_arrays(tmp_path / "train.arrow"))
    assert [len(batch) for batch in batches] == [TOKENS_PER_RECORD_BATCH] * 2 + [TOKENS_PER_RECORD_BATCH // 2]
    assert np.array_equal(np.concatenate(batches), tokens)
    with pytest.raises(TypeError):
        TokenShardWriter(tmp_path / "other.arrow", np.dtype(np.uint16)).write(tokens.astype(np.uint32))


def test_tokenize_writes_token_shards_in_record_batches_beside_an_index_of_their_bytes(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 60_000, size=int(2.5 * BATCH_TOKENS), dtype=np.uint16)
    writer = IndexedShardWriter(tmp_path / "train.arrow", np.dtype(np.uint16))
    for chunk in np.array_split(tokens, 37):
        writer.write(chunk)
    writer.close()
    batches = list(iter_token_arrays(tmp_path / "train.arrow"))
    assert [len(batch) for batch in batches] == [BATCH_TOKENS] * 2 + [BATCH_TOKENS // 2]
    assert np.array_equal(np.concatenate(batches), tokens)
    index = BatchIndex.from_json(json.loads(batch_index_path(tmp_path / "train.arrow").read_text()))
    data = (tmp_path / "train.arrow").read_bytes()
    ranges = [data[start : start + length] for start, length in zip(index.offsets, index.lengths)]
    assert index.tokens == [len(batch) for batch in batches] and index.dtype == "uint16"
    assert [hash_bytes(message) for message in ranges] == index.hashes
    assert all(np.array_equal(batch_tokens(pa.py_buffer(message), index), batch)
               for message, batch in zip(ranges, batches))
    with pytest.raises(TypeError):
        IndexedShardWriter(tmp_path / "other.arrow", np.dtype(np.uint16)).write(tokens.astype(np.uint32))

