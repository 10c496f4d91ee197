"""The training callback of the scripts the model tests run in processes of their own
(``ddp_training.py``, ``tiny_finetune.py``): it records each reported train loss."""

from __future__ import annotations

import os
from pathlib import Path


class RecordLosses:
    """Records ``train/loss`` by step; ``die_after_checkpoint``: end the process abruptly once that
    step's checkpoint is committed, as a kill would."""

    def __init__(self, die_after_checkpoint: int | None = None) -> None:
        self.losses: dict[int, float] = {}
        self.die_after_checkpoint = die_after_checkpoint

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if "train/loss" in metrics:
            self.losses[step] = metrics["train/loss"]

    def on_checkpoint(self, step: int, path: Path) -> None:
        if step == self.die_after_checkpoint:
            os._exit(3)

    def on_resume(self, step: int, path: Path) -> None:
        pass

    def on_unusable_checkpoint(self, path: Path, error: Exception, fallback: Path | None) -> None:
        raise AssertionError(f"checkpoint {path} did not load: {error}")
