"""Checks of the CUDA path: bf16 autocast, fused AdamW, pinned batches, torch.compile."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from gptflow.data.loader import TokenWindows
from gptflow.model.config import TrainConfig
from gptflow.model.device import resolve_autocast_dtype, resolve_device
from gptflow.model.gpt import GPT
from gptflow.model.optim import build_optimizer
from gptflow.model.pretraining import run_pretraining

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class MetricsLog:
    def __init__(self) -> None:
        self.metrics: dict[int, dict[str, float]] = {}

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics[step] = metrics

    def on_checkpoint(self, step, path) -> None:
        pass


def test_auto_resolves_to_cuda_and_bfloat16():
    device = resolve_device("auto")
    assert device.type == "cuda"
    assert resolve_autocast_dtype("auto", device) is torch.bfloat16


def test_optimizer_is_fused_on_cuda(tiny_config):
    model = GPT(tiny_config).cuda()
    optimizer = build_optimizer(model, TrainConfig(), torch.device("cuda"))
    assert optimizer.defaults["fused"]


def test_batches_can_be_pinned(pattern_shards, tiny_config):
    windows = TokenWindows(pattern_shards[0], tiny_config.block_size, tiny_config.vocab_size)
    inputs, targets = windows.batch(0, np.arange(4), pin_memory=True)
    assert inputs.is_pinned() and targets.is_pinned()


@pytest.mark.parametrize("compile_model", [False, True])
def test_bf16_training_on_cuda_learns_and_reports_memory(tmp_path, tiny_config, tiny_train_config, pattern_shards, compile_model):
    train, val = pattern_shards
    log = MetricsLog()
    config = dataclasses.replace(
        tiny_train_config, device="auto", dtype="auto", compile=compile_model, max_steps=60, learning_rate=1e-2
    )
    result = run_pretraining(tiny_config, config, train, val, tmp_path / "run", callback=log)
    assert result.final_val_loss < 1.5
    assert result.peak_memory_bytes > 0
    final_metrics = log.metrics[60]
    assert all(math.isfinite(value) for value in final_metrics.values())
    if "H200" in torch.cuda.get_device_name() or "H100" in torch.cuda.get_device_name():
        assert 0 < final_metrics["train/mfu"] < 1
