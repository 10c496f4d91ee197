"""Corpus statistics computed from token shards, streaming (one record batch in memory at a time)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gptflow.data.shards import iter_token_arrays


def token_counts(paths: Sequence[Path], vocab_size: int) -> np.ndarray:
    """How often each id in ``[0, vocab_size)`` occurs in the token shards at ``paths``."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for path in paths:
        for tokens in iter_token_arrays(path):
            counts += np.bincount(tokens, minlength=vocab_size)[:vocab_size]
    return counts


def unigram_cross_entropy(train_paths: Sequence[Path], val_paths: Sequence[Path], vocab_size: int) -> float:
    """Nats per token of the val tokens under the train split's unigram distribution, add-one
    smoothed so an id unseen in train costs a finite amount.

    The baseline a language model must beat: a model that has learnt nothing but token
    frequencies reaches exactly this val loss.
    """
    val_counts = token_counts(val_paths, vocab_size)
    if not val_counts.sum():
        raise ValueError("No validation tokens: the corpus is too small for its val_fraction, or has no val split.")
    train_counts = token_counts(train_paths, vocab_size)
    log_probs = np.log(train_counts + 1.0) - np.log(train_counts.sum() + vocab_size)
    return float(-(val_counts * log_probs).sum() / val_counts.sum())
