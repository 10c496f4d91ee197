"""FSDP2 on CPU (gloo): sharded training follows one process, sharded checkpoints resume at
another world size, whole checkpoints resume sharded, and bad settings are refused up front."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from gptflow.data.commits import CorruptArtifactError
from gptflow.model.checkpoint import (
    FINAL_DIR,
    WEIGHTS_FILE,
    TrainerState,
    checkpoint_path,
    load_checkpoint,
    save_sharded_checkpoint,
)
from gptflow.model.config import TrainConfig
from gptflow.model.distributed import clip_grad_norm_, gather_full_model, shard_model
from gptflow.model.gpt import GPT
from gptflow.model.optim import build_optimizer

TRAINING = Path(__file__).with_name("ddp_training.py")
ROOT = Path(__file__).resolve().parents[2]
ONE_PROCESS = [sys.executable, str(TRAINING)]
TWO_RANKS = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(TRAINING)]
# Every run takes a global batch of 8 sequences: all 8 in one process, 4 on each of two ranks.
MICRO_BATCH = {id(ONE_PROCESS): "8", id(TWO_RANKS): "4"}
# ddp_training.py's exit code when told to die; torchrun fails with 1 when a rank dies.
DIED = {id(ONE_PROCESS): 3, id(TWO_RANKS): 1}


def _train(launcher: list[str], run_dir: Path, shards: list[str], *flags: str) -> dict[str, float]:
    """Train ddp_training.py's 20 steps (checkpoints at 10 and 20); the losses rank 0 reported."""
    losses = run_dir.with_suffix(".json")
    command = [*launcher, str(run_dir), *shards, MICRO_BATCH[id(launcher)], str(losses), *flags]
    dies = "--die-after-checkpoint" in flags
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == (DIED[id(launcher)] if dies else 0), result.stdout[-3000:] + result.stderr[-3000:]
    return {} if dies else json.loads(losses.read_text())


def _write_tokens(path: Path, tokens: np.ndarray) -> str:
    schema = pa.schema([("tokens", pa.from_numpy_dtype(tokens.dtype))])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(pa.record_batch([pa.array(tokens)], schema=schema))
    return str(path)


def _assert_same_final_weights(actual: Path, expected: Path) -> None:
    expected_weights = load_file(expected / FINAL_DIR / WEIGHTS_FILE)
    actual_weights = load_file(actual / FINAL_DIR / WEIGHTS_FILE)
    assert actual_weights.keys() == expected_weights.keys()
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(actual_weights[name], tensor, atol=1e-4, rtol=1e-4, msg=name)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> tuple[list[str], Path, dict[str, float]]:
    """Token shards, and the run directory and losses of one process training on them uninterrupted."""
    directory = tmp_path_factory.mktemp("fsdp")
    tokens = np.random.default_rng(0).integers(2, 128, size=20_000).astype(np.uint16)
    shards = [_write_tokens(directory / "train.arrow", tokens), _write_tokens(directory / "val.arrow", tokens[:2000])]
    losses = _train(ONE_PROCESS, directory / "one", shards)
    return shards, directory / "one", losses


@pytest.mark.slow
def test_two_fsdp_ranks_follow_the_one_process_loss_trajectory(one_process_run, tmp_path):
    shards, one_dir, one = one_process_run
    two = _train(TWO_RANKS, tmp_path / "fsdp", shards, "--parallelism", "fsdp")
    assert one.keys() == two.keys() and len(one) == 10
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    assert one["20"] < one["2"]  # it trained
    # The export is one whole model.safetensors, as downstream reads it.
    _assert_same_final_weights(tmp_path / "fsdp", one_dir)
    checkpoint = checkpoint_path(tmp_path / "fsdp", 20)
    files = {path.name for path in checkpoint.iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "config.json", "trainer.json", "contents.json"} <= files
    assert WEIGHTS_FILE not in files
    # Only rank 0 committed: no temporary directories left behind.
    assert [p.name for p in sorted(checkpoint.parent.iterdir())] == ["step-00000010", "step-00000020"]


@pytest.mark.slow
def test_a_checkpoint_of_two_fsdp_ranks_resumes_in_one_process(one_process_run, tmp_path):
    shards, one_dir, one = one_process_run
    run_dir = tmp_path / "run"
    _train(TWO_RANKS, run_dir, shards, "--parallelism", "fsdp", "--die-after-checkpoint", "10")
    resumed = _train(ONE_PROCESS, run_dir, shards, "--resume")
    assert sorted(resumed, key=int) == ["12", "14", "16", "18", "20"]  # continued from step 10
    assert resumed["20"] == pytest.approx(one["20"], rel=1e-4)
    _assert_same_final_weights(run_dir, one_dir)


@pytest.mark.slow
def test_a_checkpoint_of_one_process_resumes_on_two_fsdp_ranks(one_process_run, tmp_path):
    shards, one_dir, one = one_process_run
    run_dir = tmp_path / "run"
    _train(ONE_PROCESS, run_dir, shards, "--die-after-checkpoint", "10")
    resumed = _train(TWO_RANKS, run_dir, shards, "--parallelism", "fsdp", "--resume")
    assert sorted(resumed, key=int) == ["12", "14", "16", "18", "20"]
    assert resumed["20"] == pytest.approx(one["20"], rel=1e-4)
    _assert_same_final_weights(run_dir, one_dir)


def test_an_unknown_parallelism_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"train.parallelism must be one of ddp, fsdp, got 'zero3'"):
        TrainConfig(parallelism="zero3")


def test_fsdp_with_muon_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match="use train.optimizer=adamw with fsdp"):
        TrainConfig(parallelism="fsdp", optimizer="muon")


def test_a_sharded_checkpoint_loads_whole_and_an_altered_shard_is_refused(
    one_rank_group, tmp_path, tiny_config, tiny_train_config
):
    torch.manual_seed(0)
    model = shard_model(GPT(tiny_config), torch.device("cpu"))
    optimizer = build_optimizer(model, tiny_train_config, torch.device("cpu"))
    tokens = torch.randint(0, tiny_config.vocab_size, (2, tiny_config.block_size + 1))
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    optimizer.step()
    path = save_sharded_checkpoint(tmp_path, model, optimizer, TrainerState(1, 32, 0, {}), is_main=True)

    whole = GPT(tiny_config)
    assert load_checkpoint(path, whole).step == 1
    trained = gather_full_model(model, is_main=True, build=lambda: GPT(tiny_config))
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(whole.state_dict()[name], tensor, msg=name)

    shard = path / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match="__0_0.distcp does not hold the bytes written"):
        load_checkpoint(path, GPT(tiny_config))


def test_a_sharded_model_recomputing_activations_takes_the_step_of_a_plain_one(
    one_rank_group, tiny_config, tiny_train_config
):
    config = dataclasses.replace(tiny_config, dropout=0.0)
    tokens = torch.randint(0, config.vocab_size, (2, config.block_size + 1))
    weights = []
    for sharded in (False, True):
        torch.manual_seed(0)  # the same initial weights for both
        model = GPT(dataclasses.replace(config, activation_checkpointing=sharded))
        if sharded:
            model = shard_model(model, torch.device("cpu"))
        optimizer = build_optimizer(model, tiny_train_config, torch.device("cpu"))
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        clip_grad_norm_(model, 1.0)
        optimizer.step()
        weights.append(gather_full_model(model, is_main=True, build=lambda: GPT(model.config)) if sharded else model)
    for name, tensor in weights[0].state_dict().items():
        torch.testing.assert_close(weights[1].state_dict()[name], tensor, msg=name)
