"""Near-duplicate removal (``data.near_dedup_threshold``): real files ingested into a real store,
signatures and LSH by the installed datasketch."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from gptflow.data.config import IngestConfig
from gptflow.data.hashing import hash_bytes
from gptflow.data.ingest import CorpusManifest, ingest_corpus
from gptflow.data.shards import iter_raw_batches
from gptflow.data.sources import resolve_sources
from gptflow.tasks.settings import ConfigError, PretrainSettings, build_config

pytest.importorskip("datasketch", reason="near-dedup is an optional extra: pip install 'gptflow[near-dedup]'")

OFF = IngestConfig(val_fraction=0.3)
AT_0_8 = IngestConfig(val_fraction=0.3, near_dedup_threshold=0.8)
WORDS = ("river stone lantern copper orchard meadow harbor window thunder violet basket candle forest "
         "silver mirror ladder pepper garden marble wagon saddle feather compass ember glacier hollow "
         "island jasmine kettle lumber nectar oyster pebble quartz rafter sparrow timber umbrella velvet "
         "walnut yarrow zephyr anchor bramble cinder dune falcon granite heron ivory juniper").split()


def paragraph(seed: int, words: int = 120) -> str:
    """Prose-like text of random words: two paragraphs of different seeds share almost no 5-grams."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words)) + "."


def with_one_word_changed(text: str, position: int = 60) -> str:
    words = text.split(" ")
    words[position] = "CHANGED"
    return " ".join(words)


def jsonl(texts: list[str]) -> str:
    return "".join(json.dumps({"text": text}) + "\n" for text in texts)


def ingest(folder: Path, store_dir: Path, config: IngestConfig) -> CorpusManifest:
    return ingest_corpus(resolve_sources([str(folder)]), config, store_dir)


def kept_texts(manifest: CorpusManifest) -> list[str]:
    """The texts tokenize will read, in the order it reads them."""
    kept = []
    for unit in manifest.units:
        dropped = set(unit.drop_doc_hashes)
        for batch in iter_raw_batches(Path(unit.directory), ["text", "doc_hash"]):
            kept += [text for text, doc_hash in zip(batch.column("text").to_pylist(), batch.column("doc_hash").to_pylist())
                     if doc_hash not in dropped]
    return kept


@pytest.fixture
def corpus(write_corpus) -> tuple[Path, list[str]]:
    """Three files of six distinct paragraphs and four near duplicates of them (one word changed),
    one in the same file as its original and three in later files; and one exact duplicate."""
    texts = [paragraph(seed) for seed in range(6)]
    folder = write_corpus({
        "a.jsonl": jsonl([texts[0], texts[1], with_one_word_changed(texts[0])]),
        "b.jsonl": jsonl([with_one_word_changed(texts[1]), texts[2], texts[3], with_one_word_changed(texts[2], 10)]),
        "c.txt": with_one_word_changed(texts[3], 100),
        "d.jsonl": jsonl([texts[4], texts[5], texts[4]]),
    })
    return folder, texts


def test_near_duplicates_are_dropped_at_0_8_and_counted_per_source(corpus, store_dir):
    folder, texts = corpus
    manifest = ingest(folder, store_dir, AT_0_8)

    # The first of each group stays, in the order exact dedup keeps copies: by path, then file order.
    assert kept_texts(manifest) == texts
    assert {Path(unit.source).name: unit.near_duplicates for unit in manifest.units} == {
        "a.jsonl": 1, "b.jsonl": 2, "c.txt": 1, "d.jsonl": 0}
    assert manifest.totals["near_duplicates"] == 4
    assert manifest.totals["duplicates"] == 1  # the exact copy in d.jsonl, counted as before
    assert sum(manifest.totals["segments"].values()) == len(texts)
    assert sum(manifest.totals["bytes"].values()) == sum(len(text.encode()) for text in texts)
    near_copy = with_one_word_changed(texts[0])
    assert manifest.units[0].drop_doc_hashes == [hash_bytes(near_copy.encode())]
    assert all(unit.drop_doc_hashes == sorted(unit.drop_doc_hashes) for unit in manifest.units)


def test_distinct_documents_stay_and_results_repeat_exactly(write_corpus, store_dir, tmp_path):
    texts = [paragraph(seed) for seed in range(40)]
    folder = write_corpus({"a.jsonl": jsonl(texts[:20]), "b.jsonl": jsonl(texts[20:])})
    first = ingest(folder, store_dir, AT_0_8)
    again = ingest(folder, tmp_path / "other-store", AT_0_8)

    assert first.totals["near_duplicates"] == 0 and kept_texts(first) == texts
    assert again.fingerprint == first.fingerprint


def test_turning_it_on_reuses_every_file_unit_and_off_gives_back_todays_manifest(corpus, store_dir):
    folder, _ = corpus
    off = ingest(folder, store_dir, OFF)
    on = ingest(folder, store_dir, AT_0_8)
    off_again = ingest(folder, store_dir, OFF)

    assert all(unit.reused for unit in on.units)  # only the drop lists change
    assert on.fingerprint != off.fingerprint  # so tokenize, keyed by it, runs again
    assert off.totals["near_duplicates"] == 0
    assert off_again.fingerprint == off.fingerprint
    assert Path(off_again.path).read_bytes() == Path(off.path).read_bytes()


def test_a_threshold_of_1_drops_only_texts_with_the_same_words(write_corpus, store_dir):
    text = paragraph(7)
    folder = write_corpus({"a.jsonl": jsonl([text, text.upper(), with_one_word_changed(text)])})
    manifest = ingest(folder, store_dir, IngestConfig(val_fraction=0.3, near_dedup_threshold=1.0))

    # Upper-cased is another exact text but the same shingles (lower-cased); one changed word is not.
    assert kept_texts(manifest) == [text, with_one_word_changed(text)]
    assert manifest.units[0].near_duplicates == 1


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.5, float("nan")])
def test_a_threshold_outside_0_to_1_is_refused_naming_the_setting(threshold):
    with pytest.raises(ValueError, match=r"data\.near_dedup_threshold must be a Jaccard similarity in \(0, 1\]"):
        IngestConfig(near_dedup_threshold=threshold)


def test_the_setting_is_read_from_overrides_and_none_turns_it_off():
    assert build_config(PretrainSettings, overrides={"data.near_dedup_threshold": "0.8"}).data.near_dedup_threshold == 0.8
    assert build_config(PretrainSettings, overrides={"data.near_dedup_threshold": "none"}).data.near_dedup_threshold is None
    with pytest.raises(ConfigError, match=r"data\.near_dedup_threshold must be .* got 2\.0"):
        build_config(PretrainSettings, overrides={"data.near_dedup_threshold": "2"})
