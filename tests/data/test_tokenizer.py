from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models

from gptflow.data.config import IngestConfig, TokenizerConfig
from gptflow.data.hashing import hash_bytes
from gptflow.data.ingest import ingest_corpus
from gptflow.data.shards import iter_raw_batches
from gptflow.data.sources import resolve_sources
from gptflow.data.store import LOCAL_STORE
from gptflow.data.tokenizer import (
    EOT_TOKEN,
    META_FILE,
    PAD_TOKEN,
    TokenizerArtifact,
    _training_sample,
    describe_tokenizer,
    load_tokenizer,
    train_tokenizer,
)
from gptflow.data.units import in_this_process

ROUND_TRIP_TEXTS = [
    "def f(x):\n    return x  # done\n",
    "  leading and trailing spaces  ",
    "tabs\tand\r\ncarriage returns\r",
    "ünïcödé, 日本語, emoji 🎉🚀, combining é",
    "\x00\x01 control bytes \x7f",
    "",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_decode_of_encode_gives_back_any_text(tiny_tokenizer, text):
    tokenizer = load_tokenizer(tiny_tokenizer)
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_special_tokens_have_fixed_ids_and_the_vocabulary_its_size(tiny_tokenizer):
    tokenizer = load_tokenizer(tiny_tokenizer)
    assert (tiny_tokenizer.eot_id, tiny_tokenizer.pad_id) == (0, 1)
    assert tokenizer.token_to_id(EOT_TOKEN) == 0 and tokenizer.token_to_id(PAD_TOKEN) == 1
    assert tokenizer.encode(f"end{EOT_TOKEN}").ids[-1] == 0
    assert tiny_tokenizer.vocab_size == tokenizer.get_vocab_size() == 512


def test_artifact_loads_from_itself_its_file_or_its_directory(tiny_tokenizer):
    path = Path(tiny_tokenizer.path)
    vocabularies = [load_tokenizer(source).get_vocab() for source in (tiny_tokenizer, path, path.parent, str(path))]
    assert all(vocabulary == vocabularies[0] for vocabulary in vocabularies)
    assert TokenizerArtifact.from_dict(json.loads(json.dumps(tiny_tokenizer.to_dict()))) == tiny_tokenizer


def test_second_training_is_reused_and_a_new_setting_trains_anew(tiny_manifest, tiny_tokenizer):
    store = Path(tiny_manifest.path).parent.parent
    again = train_tokenizer(tiny_manifest, TokenizerConfig(vocab_size=512), store)
    assert again.reused and again.hash == tiny_tokenizer.hash and again.path == tiny_tokenizer.path
    bigger = train_tokenizer(tiny_manifest, TokenizerConfig(vocab_size=640), store)
    assert not bigger.reused and bigger.path != tiny_tokenizer.path and bigger.vocab_size == 640


def test_training_is_deterministic(tiny_manifest, tmp_path):
    config = TokenizerConfig(vocab_size=600, sample_bytes=200_000)
    first = train_tokenizer(tiny_manifest, config, tmp_path)
    shutil.rmtree(Path(first.path).parent)
    second = train_tokenizer(tiny_manifest, config, tmp_path)
    assert not second.reused and second.hash == first.hash


def test_sample_is_bounded_train_only_and_drawn_from_the_whole_corpus(write_corpus, store_dir, make_documents):
    files = {f"part-{index:02d}.jsonl": "".join(json.dumps({"text": text}) + "\n" for text in
                                                make_documents(50, f"file {index}"))
             for index in range(20)}
    manifest = ingest_corpus(resolve_sources([str(write_corpus(files))]), IngestConfig(val_fraction=0.2), store_dir)
    budget = manifest.totals["bytes"]["train"] // 4

    sample = _training_sample(manifest, budget, in_this_process, LOCAL_STORE)
    sampled_bytes = sum(len(text.encode()) for text in sample)
    assert budget - 100 < sampled_bytes <= budget
    assert _training_sample(manifest, budget, in_this_process, LOCAL_STORE) == sample
    # The units' offers hold the corpus's choice: the same sample as ranking every train segment at once.
    ranked = sorted((doc_hash, text) for unit in manifest.units
                    for text, doc_hash, split in _rows(unit.directory)
                    if split == "train" and doc_hash not in unit.drop_doc_hashes)
    taken, chosen = 0, []
    for _, text in ranked:
        if taken >= budget:
            break
        chosen.append(text)
        taken += len(text.encode())
    assert sample[:-1] == chosen[:-1] and chosen[-1].encode().startswith(sample[-1].encode())
    files_sampled = {int(text.split(":")[0].split()[1]) for text in sample if text.startswith("file")}
    assert files_sampled == set(range(20))
    val_hashes = {doc_hash for unit in manifest.units for doc_hash in _hashes_of_split(unit.directory, "val")}
    assert not {hash_bytes(text.encode()) for text in sample} & val_hashes

    artifact = train_tokenizer(manifest, TokenizerConfig(vocab_size=512, sample_bytes=budget), store_dir)
    meta = json.loads((Path(artifact.path).parent / META_FILE).read_text())
    assert meta["sample_bytes"] == sampled_bytes and meta["corpus_fingerprint"] == manifest.fingerprint


def test_a_document_larger_than_the_budget_is_cut_to_it(write_corpus, store_dir):
    books = {f"book-{index}.txt": f"book {index} " + "word " * 1_000 for index in range(12)}
    manifest = ingest_corpus(resolve_sources([str(write_corpus(books))]), IngestConfig(val_fraction=0.45), store_dir)
    (sample,) = _training_sample(manifest, 2048, in_this_process, LOCAL_STORE)
    assert len(sample.encode()) == 2048
    assert any(book.startswith(sample) for book in books.values())


def _rows(directory: str) -> list[tuple[str, str, str]]:
    """``(text, doc_hash, split)`` of every segment of a raw unit."""
    return [row for batch in iter_raw_batches(Path(directory), ["text", "doc_hash", "split"])
            for row in zip(*(column.to_pylist() for column in batch.columns))]


def _hashes_of_split(directory: str, split: str) -> set[str]:
    return {
        doc_hash
        for batch in iter_raw_batches(Path(directory), ["doc_hash", "split"])
        for doc_hash, doc_split in zip(batch.column("doc_hash").to_pylist(), batch.column("split").to_pylist())
        if doc_split == split
    }


def test_an_existing_tokenizer_file_is_described_as_the_stage_describes_it(tiny_tokenizer, tmp_path):
    copy = shutil.copy(tiny_tokenizer.path, tmp_path / "tokenizer.json")
    described = describe_tokenizer(copy)
    assert described.to_dict() == {**tiny_tokenizer.to_dict(), "path": str(copy), "reused": True}


def test_a_tokenizer_without_the_special_tokens_is_refused(tmp_path):
    foreign = tmp_path / "tokenizer.json"
    Tokenizer(models.BPE()).save(str(foreign))
    with pytest.raises(ValueError, match="not a gptflow tokenizer: it lacks the special tokens"):
        describe_tokenizer(foreign)
