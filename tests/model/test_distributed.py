"""Data parallelism on CPU (gloo): two processes of micro-batch B train like one of 2B."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gptflow.model.checkpoint import FINAL_DIR, WEIGHTS_FILE

DDP_TRAINING = Path(__file__).with_name("ddp_training.py")
ROOT = Path(__file__).resolve().parents[2]


def _run(command: list[str], tmp_path: Path) -> None:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_two_gloo_ranks_follow_the_one_process_loss_trajectory(tmp_path, write_shard):
    tokens = np.random.default_rng(0).integers(2, 128, size=20_000).astype(np.uint16)
    train, val = write_shard(tmp_path / "train.arrow", tokens), write_shard(tmp_path / "val.arrow", tokens[:2000])
    shards = [str(train), str(val)]

    _run([sys.executable, str(DDP_TRAINING), str(tmp_path / "one"), *shards, "8", str(tmp_path / "one.json")], tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run([*torchrun, str(DDP_TRAINING), str(tmp_path / "two"), *shards, "4", str(tmp_path / "two.json")], tmp_path)

    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert one.keys() == two.keys() and len(one) == 10
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    assert one["20"] < one["2"]  # it trained
    single = load_file(tmp_path / "one" / FINAL_DIR / WEIGHTS_FILE)
    parallel = load_file(tmp_path / "two" / FINAL_DIR / WEIGHTS_FILE)
    for name, tensor in single.items():
        torch.testing.assert_close(parallel[name], tensor, atol=1e-4, rtol=1e-4)
    # Only rank 0 wrote: one set of checkpoints, no leftovers.
    assert [p.name for p in sorted((tmp_path / "two" / "checkpoints").iterdir())] == ["step-00000010", "step-00000020"]


def test_a_world_size_that_disagrees_with_nproc_is_refused(
    tmp_path, monkeypatch, tiny_config, tiny_train_config, pattern_shards
):
    from gptflow.model.pretraining import run_pretraining

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="torchrun --nproc_per_node 1"):
        run_pretraining(tiny_config, tiny_train_config, *pattern_shards, tmp_path / "run")
