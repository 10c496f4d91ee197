"""Data mixtures: weights parsed off --corpus values, training windows drawn by source at those weights."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from gptflow.data.mixture import MixtureError, WeightedCorpus, mixture_parts, split_weight
from gptflow.data.sources import resolve_sources
from gptflow.data.tokenize import TokenManifest, TokenUnit
from gptflow.model.config import ModelConfig
from gptflow.model.pretraining import training_windows

BLOCK_SIZE = 32
VOCAB_SIZE = 1 << 16


def test_weights_are_split_off_the_sources_and_paths_holding_equals_signs_stay_whole(tmp_path):
    hive = tmp_path / "year=2024"
    hive.mkdir()
    corpus = WeightedCorpus.parse(["web/=0.7", "hf:owner/code=3", f"{hive}/*.parquet=2"])
    assert corpus.sources == ["web/", "hf:owner/code", f"{hive}/*.parquet"]
    assert corpus.weights == {"web/": 0.7, "hf:owner/code": 3.0, f"{hive}/*.parquet": 2.0}
    assert split_weight(f"{hive}/*.parquet") == (f"{hive}/*.parquet", None)  # '=' before a '/' is the path's
    assert split_weight(str(hive)) == (str(hive), None)  # an existing path is a path, '=' and all
    assert WeightedCorpus.parse(["a/", "b.txt"]) == WeightedCorpus(["a/", "b.txt"], {})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["x/=abc"], "--corpus x/=abc: the weight 'abc' is not a number"),
        (["x/=-1"], "--corpus x/=-1: a weight must be a positive finite number"),
        (["x/=0"], "--corpus x/=0: a weight must be a positive finite number"),
        (["x/=nan"], "--corpus x/=nan: a weight must be a positive finite number"),
        (["x/=inf"], "--corpus x/=inf: a weight must be a positive finite number"),
        (["a/=0.8", "b/"], "--corpus b/ has no weight while --corpus a/=0.8 has one: give every --corpus a weight"),
        (["a/=0.5", "a/=0.5"], "--corpus a/ is given twice"),
    ],
)
def test_bad_weights_are_refused_naming_the_source(values, message):
    with pytest.raises(MixtureError, match="^" + re.escape(message)):
        WeightedCorpus.parse(values)


@pytest.fixture
def two_source_tokens(tmp_path, write_shard) -> tuple[TokenManifest, dict[str, str]]:
    """Sources ``big/`` (three files, 9,000 train tokens of ids below 30,000) and ``small/`` (one
    file, 1,000 tokens of ids from 50,000): their tokens as the tokenize stage leaves them, and
    which source named each file, as source resolution says."""
    units = []
    for source, files, first_id, n_tokens in (("big", 3, 0, 3000), ("small", 1, 50000, 1000)):
        (tmp_path / source).mkdir()
        for index in range(files):
            text_file = tmp_path / source / f"{index}.txt"
            text_file.write_text("some text\n")
            directory = tmp_path / "tokens" / f"{source}-{index}"
            directory.mkdir(parents=True)
            start = first_id + index * n_tokens
            write_shard(directory / "train.arrow", np.arange(start, start + n_tokens, dtype=np.uint16))
            units.append(TokenUnit(source=str(text_file.resolve()), key=f"{source}-{index}", directory=str(directory),
                                   n_tokens={"train": n_tokens, "val": 0}, n_bytes={"train": n_tokens, "val": 0},
                                   n_segments={"train": 1, "val": 0}, reused=False))
    manifest = TokenManifest(units=units, dtype="uint16", vocab_size=VOCAB_SIZE, eot_id=0, tokenizer_hash="t",
                             corpus_fingerprint="c", fingerprint="f")
    named_by = resolve_sources([str(tmp_path / "big"), str(tmp_path / "small")]).named_by
    return manifest, {path: Path(source).name for path, source in named_by.items()}


def test_training_windows_come_from_each_source_at_its_weight_not_its_token_share(two_source_tokens):
    tokens, named_by = two_source_tokens
    parts = mixture_parts({"big": 1.0, "small": 4.0}, named_by, tokens, min_tokens=BLOCK_SIZE + 1)
    assert [(part.source, part.probability, len(part.train_paths)) for part in parts] == [
        ("big", 0.2, 3), ("small", 0.8, 1)]

    model_config = ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=BLOCK_SIZE, vocab_size=VOCAB_SIZE)
    windows = training_windows([], None, parts, model_config)
    first_tokens = windows.batch(seed=11, positions=np.arange(2560))[0][:, 0]
    # The small source holds a tenth of the tokens but gets four fifths of the windows.
    assert abs((first_tokens >= 50000).float().mean().item() - 0.8) < 0.01
    again = training_windows([], None, parts, model_config).batch(seed=11, positions=np.arange(192, 256))
    assert torch.equal(again[0][:, 0], first_tokens[192:256])


def test_a_weighted_source_without_a_window_of_train_tokens_is_named(two_source_tokens):
    tokens, named_by = two_source_tokens
    with pytest.raises(MixtureError, match=r"^--corpus small=4: 1,000 training tokens, fewer than one training window "
                                           r"\(model.block_size \+ 1 = 1,025\)"):
        mixture_parts({"big": 1.0, "small": 4.0}, named_by, tokens, min_tokens=1025)
