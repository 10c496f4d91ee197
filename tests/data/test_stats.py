from __future__ import annotations

import math

import numpy as np
import pytest

from gptflow.data.commits import CorruptArtifactError, atomic_directory
from gptflow.data.stats import token_counts, unigram_cross_entropy
from gptflow.data.token_shards import IndexedShardWriter

VOCAB = 512


def write_shards(directory, name: str, tokens: np.ndarray, n_shards: int = 3) -> list:
    """``tokens`` in ``n_shards`` shards, each in a committed unit directory of its own, as tokenize writes them."""
    paths = []
    for index, chunk in enumerate(np.array_split(tokens.astype(np.uint16), n_shards)):
        with atomic_directory(directory / f"{name}-{index}") as tmp:
            writer = IndexedShardWriter(tmp / "train.arrow", np.dtype(np.uint16))
            for part in np.array_split(chunk, 2):  # counts add up over the writer's calls
                writer.write(part)
            writer.close()
        paths.append(directory / f"{name}-{index}" / "train.arrow")
    return paths


def test_counts_stream_over_every_shard(tmp_path):
    tokens = np.array([0, 1, 1, 5, 5, 5, 511])
    counts = token_counts(write_shards(tmp_path, "t", tokens), VOCAB)
    assert counts.tolist() == np.bincount(tokens, minlength=VOCAB).tolist()


def test_hand_computed_example(tmp_path):
    train = write_shards(tmp_path, "train", np.array([0, 0, 0, 1]), n_shards=1)
    val = write_shards(tmp_path, "val", np.array([0, 2]), n_shards=1)
    vocab = 512
    expected = -(math.log(4 / (4 + vocab)) + math.log(1 / (4 + vocab))) / 2
    assert unigram_cross_entropy(train, val, vocab) == pytest.approx(expected)


def test_uniform_tokens_cost_about_log_vocab(tmp_path):
    rng = np.random.default_rng(0)
    train = write_shards(tmp_path, "train", rng.integers(0, VOCAB, 200_000))
    val = write_shards(tmp_path, "val", rng.integers(0, VOCAB, 20_000))
    assert unigram_cross_entropy(train, val, VOCAB) == pytest.approx(math.log(VOCAB), rel=0.01)


def test_skewed_tokens_cost_their_entropy_far_below_log_vocab(tmp_path):
    rng = np.random.default_rng(0)
    probabilities = 1.0 / np.arange(1, VOCAB + 1) ** 1.5
    probabilities /= probabilities.sum()
    entropy = float(-(probabilities * np.log(probabilities)).sum())
    train = write_shards(tmp_path, "train", rng.choice(VOCAB, 300_000, p=probabilities))
    val = write_shards(tmp_path, "val", rng.choice(VOCAB, 30_000, p=probabilities))
    loss = unigram_cross_entropy(train, val, VOCAB)
    assert loss == pytest.approx(entropy, rel=0.03)
    assert loss < 0.6 * math.log(VOCAB)


def test_no_validation_tokens_is_a_clear_error(tmp_path):
    train = write_shards(tmp_path, "train", np.array([1, 2, 3]), n_shards=1)
    with pytest.raises(ValueError, match="No validation tokens"):
        unigram_cross_entropy(train, [], VOCAB)


def test_a_shard_without_its_counts_is_named(tmp_path):
    train = write_shards(tmp_path, "train", np.array([1, 2, 3]), n_shards=1)
    uncommitted = tmp_path / "loose" / "train.arrow"
    uncommitted.parent.mkdir()
    writer = IndexedShardWriter(uncommitted, np.dtype(np.uint16))
    writer.write(np.array([4, 5], dtype=np.uint16))
    writer.close()
    with pytest.raises(CorruptArtifactError, match=r"loose/train.token_counts.npz is not in the store"):
        token_counts([*train, uncommitted], VOCAB)


def test_ids_beyond_the_vocabulary_are_refused(tmp_path):
    paths = write_shards(tmp_path, "train", np.array([1, 600]), n_shards=1)
    with pytest.raises(CorruptArtifactError, match="beyond the vocabulary of 512"):
        token_counts(paths, VOCAB)
