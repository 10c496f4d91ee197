from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gptflow.data.commits import CorruptArtifactError, is_complete
from gptflow.data.loader import TokenWindows
from gptflow.model.checkpoint import (
    OPTIMIZER_FILE,
    TRAINER_FILE,
    WEIGHTS_FILE,
    latest_checkpoint,
    list_checkpoints,
    load_model,
)
from gptflow.model.evaluate import evaluate_loss
from gptflow.model.gpt import GPT
from gptflow.model.objective import Batch, TrainResult
from gptflow.model.optim import build_optimizer, learning_rate_at
from gptflow.model.pretraining import Continuation, run_pretraining
from gptflow.model.train import _dropout_seed, take_step

TINY_TRAINING = Path(__file__).with_name("tiny_training.py")


class RecordingCallback:
    def __init__(self) -> None:
        self.metrics: dict[int, dict[str, float]] = {}
        self.checkpoints: list[tuple[int, Path]] = []
        self.resumed: list[tuple[int, Path]] = []
        self.unusable: list[tuple[Path, Exception, Path | None]] = []

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics[step] = metrics

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.checkpoints.append((step, path))

    def on_resume(self, step: int, path: Path) -> None:
        self.resumed.append((step, path))

    def on_unusable_checkpoint(self, path: Path, error: Exception, fallback: Path | None) -> None:
        self.unusable.append((path, error, fallback))


def assert_same_weights(first: Path, second: Path) -> None:
    expected, actual = load_file(first / WEIGHTS_FILE), load_file(second / WEIGHTS_FILE)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_training_learns_a_repeated_phrase(tmp_path, tiny_config, tiny_train_config, pattern_shards):
    train, val = pattern_shards
    callback = RecordingCallback()
    config = dataclasses.replace(tiny_train_config, max_steps=60, learning_rate=1e-2)
    result = run_pretraining(tiny_config, config, train, val, tmp_path / "run", callback=callback)
    first_loss = callback.metrics[5]["train/loss"]
    assert first_loss > 4.0  # about ln(128) at the start
    assert result.final_train_loss < first_loss / 3
    assert result.final_val_loss < 1.5


def test_the_last_val_loss_matches_the_final_evaluation_of_a_val_split_whose_start_differs(
    tmp_path, tiny_config, tiny_train_config, pattern_shards, write_shard
):
    train, phrase_val = pattern_shards
    # The val split opens with random tokens, which no model predicts, and goes on with the phrase it learns.
    noise = np.random.default_rng(1).integers(2, tiny_config.vocab_size, size=600).astype(np.uint16)
    val = [write_shard(tmp_path / "val-noise.arrow", noise), *phrase_val]
    config = dataclasses.replace(tiny_train_config, max_steps=60, learning_rate=1e-2, val_interval=0,
                                 val_tokens=512, checkpoint_interval=60)
    callback = RecordingCallback()
    result = run_pretraining(tiny_config, config, train, val, tmp_path / "run", callback=callback)
    last_val_loss = callback.metrics[60]["val/loss"]

    model = load_model(result.final_dir)
    windows = TokenWindows(val, tiny_config.block_size, tiny_config.vocab_size)
    final_loss, scored = evaluate_loss(model, windows, max_tokens=10**9, batch_size=8, device="cpu")
    assert scored == (windows.num_tokens - 1) // tiny_config.block_size * tiny_config.block_size  # the whole split

    def window_losses(max_tokens: int) -> np.ndarray:
        with torch.no_grad():
            return np.array([model(x[[row]], y[[row]])[1].item()
                             for x, y in windows.evaluation_batches(8, max_tokens) for row in range(len(x))])

    sampled = window_losses(config.val_tokens)
    assert sampled.mean() == pytest.approx(last_val_loss, rel=1e-5)  # the windows the curve's point scored
    standard_error = sampled.std(ddof=1) / math.sqrt(len(sampled))
    assert abs(last_val_loss - final_loss) < 3 * standard_error
    # Scoring the first val_tokens instead, as validation once did, lands far off: all noise.
    prefix_loss = window_losses(10**9)[: len(sampled)].mean()
    assert abs(prefix_loss - final_loss) > 3 * standard_error


def test_bfloat16_autocast_trains_on_cpu(tmp_path, tiny_config, tiny_train_config, pattern_shards):
    callback = RecordingCallback()
    config = dataclasses.replace(tiny_train_config, dtype="bfloat16", max_steps=30, learning_rate=1e-2)
    result = run_pretraining(tiny_config, config, *pattern_shards, tmp_path / "run", callback=callback)
    assert result.final_train_loss < callback.metrics[5]["train/loss"] - 1.0
    assert load_model(result.final_dir).lm_head.weight.dtype == torch.float32  # master weights stay float32


def test_reports_metrics_checkpoints_and_the_export(tmp_path, tiny_config, tiny_train_config, pattern_shards):
    train, val = pattern_shards
    callback = RecordingCallback()
    result = run_pretraining(tiny_config, tiny_train_config, train, val, tmp_path / "run", callback=callback)

    assert sorted(callback.metrics) == [5, 10, 15, 20, 25, 30]
    tokens_per_step = 4 * 2 * 16
    for step, metrics in callback.metrics.items():
        assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/tokens", "train/elapsed_s"} <= metrics.keys()
        assert "train/mfu" not in metrics  # no known peak on a CPU
        assert metrics["train/tokens"] == step * tokens_per_step
        assert metrics["train/lr"] == learning_rate_at(step - 1, tiny_train_config)
        assert ("val/loss" in metrics) == (step % 10 == 0)
        assert all(math.isfinite(value) for value in metrics.values())
    assert [step for step, _ in callback.checkpoints] == [10, 20, 30]
    assert [path.name for path in list_checkpoints(tmp_path / "run")] == ["step-00000020", "step-00000030"]
    trainer = json.loads((tmp_path / "run/checkpoints/step-00000030" / TRAINER_FILE).read_text())
    assert trainer["step"] == 30 and trainer["tokens_seen"] == 30 * tokens_per_step
    assert trainer["sequences_seen"] == 30 * 4 * 2  # where in the data a resumed run goes on
    assert trainer["train_config"]["max_steps"] == 30

    assert result == TrainResult(
        final_dir=tmp_path / "run" / "final",
        steps=30,
        tokens_seen=30 * tokens_per_step,
        final_train_loss=callback.metrics[30]["train/loss"],
        final_val_loss=callback.metrics[30]["val/loss"],
        elapsed_s=result.elapsed_s,
        resumed_from_step=None,
        peak_memory_bytes=None,
        trainable_parameters=GPT(tiny_config).num_parameters(),
        total_parameters=GPT(tiny_config).num_parameters(),
        precision="float32",  # train.dtype=auto, on a CPU
    )
    assert TrainResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    assert_same_weights(result.final_dir, tmp_path / "run/checkpoints/step-00000030")
    assert load_model(result.final_dir).config == tiny_config


def test_resuming_from_a_checkpoint_matches_an_uninterrupted_run(tmp_path, tiny_config, tiny_train_config, pattern_shards):
    train, val = pattern_shards
    config = dataclasses.replace(tiny_train_config, keep_checkpoints=3)
    uninterrupted = run_pretraining(tiny_config, config, train, val, tmp_path / "uninterrupted")

    interrupted = tmp_path / "interrupted"
    assert run_pretraining(tiny_config, config, train, val, interrupted, resume=True).resumed_from_step is None
    for later in ("checkpoints/step-00000020", "checkpoints/step-00000030", "final"):
        shutil.rmtree(interrupted / later)
    resumed = run_pretraining(tiny_config, config, train, val, interrupted, resume=True)
    assert resumed.resumed_from_step == 10
    assert resumed.tokens_seen == uninterrupted.tokens_seen
    assert resumed.final_val_loss == uninterrupted.final_val_loss
    assert_same_weights(uninterrupted.final_dir, resumed.final_dir)

    finished = run_pretraining(tiny_config, config, train, val, interrupted, resume=True)
    assert finished.resumed_from_step == 30 and finished.steps == 30
    assert_same_weights(uninterrupted.final_dir, finished.final_dir)


def test_resuming_skips_an_altered_checkpoint_for_the_one_before_it(
    tmp_path, tiny_config, tiny_train_config, pattern_shards
):
    train, val = pattern_shards
    config = dataclasses.replace(tiny_train_config, keep_checkpoints=3)
    uninterrupted = run_pretraining(tiny_config, config, train, val, tmp_path / "uninterrupted")
    interrupted = tmp_path / "interrupted"
    run_pretraining(tiny_config, config, train, val, interrupted)
    for later in ("checkpoints/step-00000030", "final"):
        shutil.rmtree(interrupted / later)
    # Bytes changed behind an unchanged size and mtime: listed as complete, refused when loaded.
    altered = interrupted / "checkpoints/step-00000020" / WEIGHTS_FILE
    stat = altered.stat()
    with open(altered, "r+b") as file:
        file.seek(stat.st_size // 2)
        file.write(b"\xff\xff")
    os.utime(altered, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    callback = RecordingCallback()
    resumed = run_pretraining(tiny_config, config, train, val, interrupted, callback=callback, resume=True)
    [(path, error, fallback)] = callback.unusable
    assert (path, fallback) == (altered.parent, interrupted / "checkpoints/step-00000010")
    assert isinstance(error, CorruptArtifactError) and str(altered) in str(error)
    assert callback.resumed == [(10, fallback)] and resumed.resumed_from_step == 10
    assert_same_weights(uninterrupted.final_dir, resumed.final_dir)
    # The altered checkpoint was replaced by the resumed run's own, not kept.
    assert is_complete(altered.parent)
    assert_same_weights(tmp_path / "uninterrupted/checkpoints/step-00000020", altered.parent)


def test_a_checkpoint_that_loads_only_in_part_is_skipped_for_step_0(
    tmp_path, tiny_config, tiny_train_config, pattern_shards
):
    """Its weights load, then its optimizer state does not fit: training starts from fresh weights."""
    train, val = pattern_shards
    muon = dataclasses.replace(tiny_train_config, optimizer="muon")
    reference = run_pretraining(tiny_config, muon, train, val, tmp_path / "reference")
    run_dir = tmp_path / "run"
    run_pretraining(tiny_config, dataclasses.replace(tiny_train_config, max_steps=10), train, val, run_dir)
    shutil.rmtree(run_dir / "final")

    callback = RecordingCallback()
    result = run_pretraining(tiny_config, muon, train, val, run_dir, callback=callback, resume=True)
    [(path, error, fallback)] = callback.unusable
    assert (path, fallback) == (run_dir / "checkpoints/step-00000010", None)
    assert "train.optimizer=muon" in str(error)
    assert callback.resumed == [] and result.resumed_from_step is None
    assert_same_weights(reference.final_dir, result.final_dir)


def test_starting_over_discards_the_previous_run(tmp_path, tiny_config, tiny_train_config, pattern_shards):
    train, val = pattern_shards
    longer = dataclasses.replace(tiny_train_config, max_steps=40, seed=1)
    run_pretraining(tiny_config, longer, train, val, tmp_path / "run")
    result = run_pretraining(tiny_config, tiny_train_config, train, val, tmp_path / "run", resume=False)
    assert result.resumed_from_step is None
    assert [path.name for path in list_checkpoints(tmp_path / "run")] == ["step-00000020", "step-00000030"]
    fresh = run_pretraining(tiny_config, tiny_train_config, train, val, tmp_path / "fresh")
    assert_same_weights(fresh.final_dir, result.final_dir)


def test_killed_runs_resume_to_bit_identical_weights(tmp_path, pattern_shards, kill_repeatedly):
    """SIGKILL at random moments (mostly mid-checkpoint: the helper saves every step), then resume:
    every kill leaves a loadable latest checkpoint, and the end result equals an unkilled run."""
    train, val = pattern_shards
    shards = [str(train[0]), str(val[0])]
    reference = subprocess.Popen([sys.executable, str(TINY_TRAINING), str(tmp_path / "reference"), *shards])
    run_dir = tmp_path / "killed"
    kill_repeatedly([sys.executable, str(TINY_TRAINING), str(run_dir), *shards], run_dir, kills=3)
    assert reference.wait() == 0
    assert_same_weights(tmp_path / "reference" / "final", run_dir / "final")
    assert_same_weights(tmp_path / "reference/checkpoints/step-00000050", run_dir / "checkpoints/step-00000050")
    reference_optimizer = torch.load(tmp_path / "reference/checkpoints/step-00000050" / OPTIMIZER_FILE, weights_only=True)
    resumed_optimizer = torch.load(run_dir / "checkpoints/step-00000050" / OPTIMIZER_FILE, weights_only=True)
    for index, expected in reference_optimizer["state"].items():
        for key, value in expected.items():
            assert torch.equal(value, resumed_optimizer["state"][index][key]), (index, key)


def test_zero_grad_clip_disables_clipping(tmp_path, tiny_config, tiny_train_config, pattern_shards):
    train, _ = pattern_shards
    finals = {}
    for grad_clip in (0.0, 1e9, 0.01):
        config = dataclasses.replace(tiny_train_config, max_steps=5, grad_clip=grad_clip)
        finals[grad_clip] = run_pretraining(tiny_config, config, train, [], tmp_path / str(grad_clip)).final_dir
    assert_same_weights(finals[0.0], finals[1e9])
    with pytest.raises(AssertionError):
        assert_same_weights(finals[0.0], finals[0.01])


def test_without_validation_shards_there_is_no_val_loss(tmp_path, tiny_config, tiny_train_config, pattern_shards):
    callback = RecordingCallback()
    config = dataclasses.replace(tiny_train_config, max_steps=10)
    result = run_pretraining(tiny_config, config, pattern_shards[0], [], tmp_path / "run", callback=callback)
    assert result.final_val_loss is None
    assert not any("val/loss" in metrics for metrics in callback.metrics.values())


def test_continuation_starts_from_the_earlier_checkpoint_and_learns_the_new_data(
    tmp_path, tiny_config, tiny_train_config, pattern_shards, write_shard
):
    train, val = pattern_shards
    first = run_pretraining(tiny_config, tiny_train_config, train, val, tmp_path / "first")
    checkpoint = latest_checkpoint(tmp_path / "first")
    new_phrase = np.random.default_rng(1).integers(2, 128, size=40)
    new_shard = write_shard(tmp_path / "new.arrow", np.tile(new_phrase, 150).astype(np.uint16))

    # A near-zero learning rate leaves the weights where the continuation loaded them.
    frozen = dataclasses.replace(tiny_train_config, max_steps=5, learning_rate=1e-12, warmup_steps=0)
    continued = run_pretraining(
        tiny_config, frozen, train, val, tmp_path / "frozen",
        continuation=Continuation(checkpoint, [new_shard], new_data_fraction=0.5),
    )
    start = load_model(first.final_dir).state_dict()
    for name, tensor in load_model(continued.final_dir).state_dict().items():
        torch.testing.assert_close(tensor, start[name], atol=1e-6, rtol=0)

    def loss_on(model_dir: Path, shards: list[Path]) -> float:
        return evaluate_loss(load_model(model_dir), TokenWindows(shards, 16, tiny_config.vocab_size), 256, 4, "cpu")[0]

    assert loss_on(first.final_dir, [new_shard]) > 4.0  # the first run never saw the new phrase
    learning = dataclasses.replace(tiny_train_config, max_steps=60, learning_rate=1e-2)
    learned = run_pretraining(
        tiny_config, learning, train, val, tmp_path / "learning",
        continuation=Continuation(checkpoint, [new_shard], new_data_fraction=0.5),
    )
    assert loss_on(learned.final_dir, [new_shard]) < 2.0  # the new phrase is learned...
    assert loss_on(learned.final_dir, val) < 2.0  # ...and the old one, replayed at half the windows, is kept


def test_continuation_from_a_different_model_shape_is_refused(tmp_path, tiny_config, tiny_train_config, pattern_shards):
    train, val = pattern_shards
    run_pretraining(tiny_config, tiny_train_config, train, val, tmp_path / "small")
    wider = dataclasses.replace(tiny_config, n_embd=64)
    with pytest.raises(ValueError, match="differs"):
        run_pretraining(wider, tiny_train_config, train, val, tmp_path / "wide",
                 continuation=Continuation(latest_checkpoint(tmp_path / "small"), train, new_data_fraction=0.5))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_a_steps_dropout_masks_come_from_its_seed_and_step_alone(device, tiny_config, tiny_train_config):
    """take_step seeds dropout with (seed, step) whatever the global RNG held before: each step's
    loss is the one its batch has under the masks ``torch.manual_seed(_dropout_seed(seed, step))`` draws."""
    device = torch.device(device)
    train_config = dataclasses.replace(tiny_train_config, grad_accum_steps=1)
    torch.manual_seed(0)
    model = GPT(tiny_config).to(device).train()
    optimizer = build_optimizer(model, train_config, device)

    def loss_of(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch.inputs, batch.targets, return_logits=False)[1]

    for step in range(3):
        # Drawing the batch also moves the global streams away from any seed.
        tokens = torch.randint(tiny_config.vocab_size, (2, 4, tiny_config.block_size), device=device)
        batch = Batch(tokens[0], tokens[1], tokens[0].numel())
        before_step = copy.deepcopy(model)
        taken = take_step(loss_of, model, model, model, optimizer, iter([batch]), step, train_config, device, None)
        torch.manual_seed(_dropout_seed(train_config.seed, step))
        assert torch.equal(taken.loss_sum, loss_of(before_step, batch).detach()), step
