"""Corpus statistics over a split's token shards, from the id counts tokenize wrote beside each
shard (``data.token_shards.token_counts_path``): a few kilobytes read per shard, never its tokens,
so a statistic over a corpus on an object store fetches no shard."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gptflow.data.commits import CorruptArtifactError
from gptflow.data.store import LOCAL_STORE, ArtifactStore
from gptflow.data.token_shards import token_counts_path


def token_counts(paths: Sequence[Path], vocab_size: int, artifacts: ArtifactStore = LOCAL_STORE) -> np.ndarray:
    """How often each id in ``[0, vocab_size)`` occurs in the token shards at ``paths``, committed to ``artifacts``."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    count_files = [token_counts_path(Path(path)) for path in paths]
    for path, found in zip(count_files, artifacts.read_files(count_files)):
        if found is None:
            raise CorruptArtifactError(
                f"{path} is not in the store: its token shard's directory was altered or removed after it was "
                "committed, or was written before shards had id counts. Run the command again: the tokenize stage "
                "computes it again.")
        with np.load(io.BytesIO(found), allow_pickle=False) as arrays:
            ids, id_counts = arrays["ids"], arrays["counts"]
        if len(ids) and int(ids[-1]) >= vocab_size:
            raise CorruptArtifactError(f"{path} counts token id {int(ids[-1])}, beyond the vocabulary of {vocab_size} "
                                       "ids: the shard was tokenized with another tokenizer.")
        counts[ids] += id_counts
    return counts


def unigram_cross_entropy(train_paths: Sequence[Path], val_paths: Sequence[Path], vocab_size: int,
                          artifacts: ArtifactStore = LOCAL_STORE) -> float:
    """Nats per token of the val tokens under the train split's unigram distribution, add-one
    smoothed so an id unseen in train costs a finite amount.

    The baseline a language model must beat: a model that has learnt nothing but token
    frequencies reaches exactly this val loss.
    """
    val_counts = token_counts(val_paths, vocab_size, artifacts)
    if not val_counts.sum():
        raise ValueError("No validation tokens: the corpus is too small for its val_fraction, or has no val split.")
    train_counts = token_counts(train_paths, vocab_size, artifacts)
    log_probs = np.log(train_counts + 1.0) - np.log(train_counts.sum() + vocab_size)
    return float(-(val_counts * log_probs).sum() / val_counts.sum())
