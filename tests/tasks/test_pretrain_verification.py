"""Each token shard the pretrain job trains on is re-hashed when a rank first reads it, not before
the first step: an altered shard is refused and named then."""

from __future__ import annotations

import os

import numpy as np
import pytest

from gptflow.data.commits import CorruptArtifactError, atomic_directory, is_complete
from gptflow.data.store import LOCAL_STORE
from gptflow.model.config import ModelConfig, TrainConfig
from gptflow.model.pretraining import PretrainObjective, run_pretraining


def test_training_refuses_a_shard_altered_behind_an_unchanged_size_and_mtime(tmp_path, write_shard):
    units = {}
    for name in ("old", "new"):
        with atomic_directory(tmp_path / "tokens" / name) as tmp:
            write_shard(tmp / "train.arrow", np.arange(1000, dtype=np.uint16) % 64)
            write_shard(tmp / "val.arrow", np.arange(500, dtype=np.uint16) % 64)
        units[name] = tmp_path / "tokens" / name
    altered = units["new"] / "train.arrow"
    stat = altered.stat()
    token_bytes = (np.arange(10, dtype=np.uint16) + 10).tobytes()
    with open(altered, "r+b") as file:  # one token's bytes, in range of the vocabulary
        file.seek(altered.read_bytes().find(token_bytes))
        file.write(b"\x01\x00")
    os.utime(altered, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    model_config = ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=64)
    train_paths, val_paths = [units["old"] / "train.arrow", altered], [units["old"] / "val.arrow"]

    # Opening reads no token: the altered shard is only found when its windows are read.
    PretrainObjective(model_config, train_paths, val_paths, shard_store=LOCAL_STORE)
    assert is_complete(units["new"])

    train_config = TrainConfig(max_steps=3, micro_batch_size=8, device="cpu", val_tokens=64)
    with pytest.raises(CorruptArtifactError, match=f"{altered} does not hold the bytes.*altered after it was written"):
        run_pretraining(model_config, train_config, train_paths, val_paths, tmp_path / "run", verify_shards=True)
    assert not is_complete(units["new"]) and is_complete(units["old"])
