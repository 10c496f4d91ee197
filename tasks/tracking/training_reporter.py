"""What a training reports while it runs, for pretraining and fine-tuning alike: batched MLflow
metrics, console and Prefect progress, the loss history and its plot, the machine's metrics; and
what a run whose training was cached shows of the training it reuses."""

from __future__ import annotations

import bisect
import contextlib
import importlib.util
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from gptflow.tasks.tracking.progress import human_count, human_duration, run_logger
from gptflow.tasks.tracking.registry import is_pending
from gptflow.tasks.tracking.run import BufferedMetrics, PipelineRun
from gptflow.tasks.tracking.runs_view import ML_VIEW

PROGRESS_LINE: tuple[tuple[str, Callable[[float], str]], ...] = (
    ("train/loss", lambda loss: f"loss {loss:.3f}"),
    ("val/loss", lambda loss: f"val {loss:.3f}"),
    ("val/accuracy", lambda accuracy: f"val acc {accuracy:.3f}"),
    ("train/lr", lambda learning_rate: f"lr {learning_rate:.2e}"),
    ("train/tokens_per_sec", lambda speed: f"{human_count(speed)} tok/s"),
    ("train/mfu", lambda mfu: f"MFU {mfu:.1%}"),
)
"""The metrics a training's progress line shows when a step reports them, in order, and how."""
LOSS_CURVE_FILE = "loss_curve.png"
HISTORY_FILE = "history.json"
"""In a training's report folder: each curve's ``[step, value]`` points, by metric name."""


class TrainingEta:
    """How long a training has left, from the wall-clock times of its progress reports: its
    seconds per step over a window of its latest steps, times the steps left. The window spans
    the longest interval seen between two validations, or between two checkpoints, so that it
    holds their time in the share they take of the whole (a shorter one would swing with each);
    until two of a kind are seen, it spans every step since the first report. Any longer, and a
    change of speed (another job taking the machine's cores) would show late."""

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps
        self.steps: list[int] = []
        self.times: list[float] = []
        """When each of ``steps`` was reported, by the reporter's clock."""
        self.pauses: dict[str, int] = {}
        """``validation`` or ``checkpoint`` → the step it last came at."""
        self.window_steps = 0

    def pause(self, kind: str, step: int) -> None:
        """A ``kind`` of pause in training (``validation``, ``checkpoint``) came at ``step``,
        before that step's report."""
        if kind in self.pauses:
            self.window_steps = max(self.window_steps, step - self.pauses[kind])
        self.pauses[kind] = step

    def seconds_left(self, step: int, now: float) -> float | None:
        """Record that ``step`` was reported at ``now``; the seconds left until ``max_steps``,
        None at the first report."""
        self.steps.append(step)
        self.times.append(now)
        start = max(bisect.bisect_right(self.steps, step - self.window_steps) - 1, 0) if self.window_steps else 0
        if self.steps[start] == step:
            return None
        seconds_per_step = (now - self.times[start]) / (step - self.steps[start])
        return seconds_per_step * (self.max_steps - step)


class TrainingReporter:
    """The training loop's callback, for pretraining and fine-tuning alike: batched MLflow metrics,
    console progress (lines begin with ``stage``, and say the ``TrainingEta``), loss history.
    ``clock`` gives the seconds of the progress lines' times (``time.monotonic``)."""

    def __init__(self, run: PipelineRun, max_steps: int, prefect_progress: bool, stage: str = "pretrain",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.metrics = BufferedMetrics(run)
        self.max_steps = max_steps
        self.stage = stage
        self.logger = run_logger()
        self.clock = clock
        self.eta = TrainingEta(max_steps)
        self.history: dict[str, list[tuple[int, float]]] = {"train/loss": [], "val/loss": []}
        # A torchrun worker has no Prefect run to attach an artifact to; its lines reach the
        # Prefect logs through the task that launched it.
        self.progress_artifact = (
            create_progress_artifact(progress=0.0, description=f"{stage}: starting") if prefect_progress else None
        )

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.add(step, metrics)
        for name, series in self.history.items():
            if name in metrics:
                series.append((step, metrics[name]))
        if any(name.startswith("val/") for name in metrics):
            self.eta.pause("validation", step)
        seconds_left = self.eta.seconds_left(step, self.clock())
        parts = [f"step {step}/{self.max_steps}"]
        parts += [shown(metrics[name]) for name, shown in PROGRESS_LINE if name in metrics]
        if seconds_left is not None:
            parts.append(f"ETA {human_duration(seconds_left)}")
        line = f"{self.stage}: " + " · ".join(parts)
        self.logger.info(line)
        if self.progress_artifact:
            update_progress_artifact(self.progress_artifact, progress=100.0 * step / self.max_steps, description=line)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.eta.pause("checkpoint", step)
        self.logger.info(f"{self.stage}: checkpoint of step {step} saved to {path}")

    def on_resume(self, step: int, path: Path) -> None:
        self.logger.info(f"{self.stage}: resuming from step {step} (checkpoint {path}, left by an earlier attempt at "
                         "these exact settings; --restart trains from step 0)")

    def on_unusable_checkpoint(self, path: Path, error: Exception, fallback: Path | None) -> None:
        instead = f"trying {fallback.name} instead" if fallback else "training from step 0"
        self.logger.warning(f"{self.stage}: cannot resume from checkpoint {path}, {instead}: {error}")

    def write_report(self, directory: Path, y_label: str = "cross-entropy (nats/token)") -> None:
        (directory / HISTORY_FILE).write_text(json.dumps(self.history, indent=1))
        plot_loss_curve(self.history, directory / LOSS_CURVE_FILE, y_label)


def log_training_report(run: PipelineRun, directory: Path) -> None:
    """The loss curve and its history (``write_report``'s) at the root of ``run``'s artifacts:
    MLflow's compare view offers only the files at the root that every compared run has, so there
    two runs' curves show side by side."""
    for name in (LOSS_CURVE_FILE, HISTORY_FILE):
        run.log_artifact(directory / name)


def plot_loss_curve(
    history: dict[str, list[tuple[int, float]]], path: Path, y_label: str = "cross-entropy (nats/token)"
) -> None:
    """Each series of ``history`` (name → (step, value)) as a line, validation ones with markers."""
    import matplotlib

    matplotlib.use("Agg")  # no display; and never pick an interactive backend inside a worker
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=110)
    for name, series in history.items():
        if series:
            steps, values = zip(*series)
            axes.plot(steps, values, label=name, marker="o" if "val" in name else None)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(y_label)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def show_reused_training(run: PipelineRun, trained_in_run: str, registered_model: str, report_dir: Path) -> None:
    """What a run whose training was cached shows of the training it reuses, so that its pages,
    charts and a sweep's comparison read as whole as that training run's: the curves of the
    training's history (in ``report_dir``), that run's model as this run's input (its Models
    column), and a paragraph of its description linking both."""
    history = json.loads((report_dir / HISTORY_FILE).read_text())
    timestamp = int(time.time() * 1000)
    run.log_metric_points([[name, value, timestamp, step]
                           for name, series in history.items() for step, value in series])
    run.log_reused_model(trained_in_run)
    name, _, version = registered_model.rpartition("/")
    model = (registered_model if is_pending(registered_model)
             else f"[{registered_model}](#/models/{name}/versions/{version}?{ML_VIEW})")
    # A run of the same flow trained it, in this run's experiment; were it another's, MLflow shows it all the same.
    trained_by = f"[{trained_in_run[:8]}](#/experiments/{run.experiment_id}/runs/{trained_in_run}?{ML_VIEW})"
    run.add_to_description(
        f"**Reused training**: run {trained_by} trained this model, "
        f"{model}, on the same data and settings, so this run trained nothing; its loss curves are copied from that "
        "run."
    )


@contextlib.contextmanager
def system_metrics(run_id: str, tracking_uri: str, node_id: str | None) -> Iterator[None]:
    """GPU utilisation, memory and power (and CPU, RAM) as MLflow ``system/*`` metrics while
    training, when the optional nvidia-ml-py and psutil are installed (``pip install gptflow[gpu]``);
    ``system/<node_id>/*`` with a ``node_id``, so that several machines' metrics stay apart."""
    if not all(importlib.util.find_spec(module) for module in ("pynvml", "psutil")):
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, tracking_uri=tracking_uri, node_id=node_id)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
