"""A training's progress lines, their ETA above all: a real reporter on a real MLflow run, fed the
reports of a training on the schedule of ``model.train`` with the times of a clock the test sets."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.tracking.run import pipeline_run
from gptflow.tasks.tracking.training_reporter import TrainingReporter

MAX_STEPS = 200
LOG_INTERVAL = 5
VAL_INTERVAL, VALIDATION_S = 20, 10.0
CHECKPOINT_INTERVAL, CHECKPOINT_S = 40, 4.0
ETA = re.compile(r"step (\d+)/\d+ .*· ETA (?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


class Clock:
    """Seconds that pass only when the test says."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _train(reporter: TrainingReporter, clock: Clock, step_s: Callable[[int], float]) -> dict[int, float]:
    """Report a training as ``model.train`` does: each step takes ``step_s(step)`` seconds, a
    validation ``VALIDATION_S`` and a checkpoint ``CHECKPOINT_S``, both before their step's
    report, and the last step has both. Returns each reported step's time, by the clock."""
    reported = {}
    for step in range(1, MAX_STEPS + 1):
        clock.now += step_s(step)
        last = step == MAX_STEPS
        validates, checkpoints = step % VAL_INTERVAL == 0 or last, step % CHECKPOINT_INTERVAL == 0 or last
        clock.now += VALIDATION_S * validates + CHECKPOINT_S * checkpoints
        metrics = {"train/loss": 5.0} if step % LOG_INTERVAL == 0 or last else {}
        if validates:
            metrics["val/loss"] = 5.1
        if metrics:
            reporter.on_metrics(step, metrics)
            reported[step] = clock.now
        if checkpoints:
            reporter.on_checkpoint(step, Path(f"checkpoints/step-{step}"))
    return reported


def _etas(lines: list[str]) -> dict[int, float]:
    """Each progress line's ETA in seconds, by its step."""
    etas = {}
    for line in lines:
        shown = ETA.search(line)
        if shown:
            step, hours, minutes, seconds = (int(part or 0) for part in shown.groups())
            etas[step] = 3600 * hours + 60 * minutes + seconds
    return etas


@pytest.fixture()
def progress_lines(tmp_path, monkeypatch, caplog) -> Callable[[Callable[[int], float]], tuple[list[str], dict]]:
    """``progress_lines(step_s)``: the lines a training whose steps take ``step_s(step)`` seconds
    prints, and the seconds each reported step truly had left."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)

    def lines(step_s: Callable[[int], float]) -> tuple[list[str], dict[int, float]]:
        clock = Clock()
        with pipeline_run(Workspace.resolve(tmp_path / "ws"), "pretrain", tags={}, name="eta") as run:
            reporter = TrainingReporter(run, MAX_STEPS, prefect_progress=False, clock=clock)
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="gptflow"):
                reported = _train(reporter, clock, step_s)
        end = reported[MAX_STEPS]
        progress = [record.getMessage() for record in caplog.records if record.getMessage().startswith("pretrain: step ")]
        return progress, {step: end - time for step, time in reported.items()}

    return lines


def _within(eta: float, left: float) -> bool:
    """Close enough: 5% off, give or take the one validation and checkpoint that a report may come
    just before or just after (and the ETA's whole seconds)."""
    return abs(eta - left) <= 0.05 * left + VALIDATION_S + CHECKPOINT_S + 1


def test_the_eta_counts_the_time_validations_and_checkpoints_take(progress_lines):
    lines, left = progress_lines(lambda step: 1.0)
    assert lines[0] == "pretrain: step 5/200 · loss 5.000"  # one report: no rate yet
    assert lines[-1].endswith("· ETA 0s")
    etas = _etas(lines)
    # From the first validation on, its time counts: steps alone would say 175 s at step 25.
    assert etas[25] == pytest.approx(left[25], rel=0.1)
    # Once two validations and two checkpoints are seen, every ETA is close.
    wrong = {step: (eta, left[step]) for step, eta in etas.items() if step >= 80 and not _within(eta, left[step])}
    assert not wrong, wrong


def test_the_eta_follows_a_change_of_speed_within_a_window(progress_lines):
    """Steps three times slower from step 100 on, as when another job takes the machine's cores:
    an average since the first step would still say about 2.2 s a step at step 145 (123 s left
    instead of 203)."""
    lines, left = progress_lines(lambda step: 1.0 if step <= 100 else 3.0)
    etas = _etas(lines)
    assert etas[95] < 0.6 * left[95]  # the slowdown is yet to come: no clock foresees it
    wrong = {step: (eta, left[step]) for step, eta in etas.items() if step >= 100 + CHECKPOINT_INTERVAL
             and not _within(eta, left[step])}
    assert not wrong, wrong
