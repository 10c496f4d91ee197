"""Stage 4, pretrain: token shards → a trained GPT (checkpoints, final model, loss curve)."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from prefect import task

import data.loader
import model.checkpoint
import model.device
import model.evaluate
import model.gpt
import model.optim
import model.train
from data.store import atomic_directory, is_complete, read_contents_hash
from data.tokenize import TokenManifest
from data.tokenizer import TokenizerArtifact
from model.config import ModelConfig, TrainConfig, pad_vocab_size
from tasks.caching import run_stage, stage_key
from tasks.progress import human_count, human_duration, run_logger
from tasks.tracking import BufferedMetrics, PipelineRun
from tasks.workspace import Workspace

CODE = (
    data.loader, model.checkpoint, model.device, model.evaluate, model.gpt, model.optim, model.train,
    sys.modules[__name__],
)
REPORT_DIR = "report"


@dataclass
class TrainedModel:
    run_dir: str
    final_dir: str
    """``model.safetensors`` + ``config.json``: ``model.checkpoint.load_model`` loads it."""
    report_dir: str
    """``loss_curve.png`` + ``history.json``."""
    weights_hash: str
    """Content hash of the final model: the input key of everything evaluated on it."""
    model_config: dict
    steps: int
    tokens_seen: int
    final_train_loss: float | None
    final_val_loss: float | None
    elapsed_s: float
    trained_in_mlflow_run: str
    """The MLflow run that executed the training (later cached runs point back to it)."""


class TrainingReporter:
    """The training loop's callback: batched MLflow metrics, console progress, loss history."""

    def __init__(self, run: PipelineRun, max_steps: int) -> None:
        self.metrics = BufferedMetrics(run)
        self.max_steps = max_steps
        self.logger = run_logger()
        self.started = time.monotonic()
        self.first_step: int | None = None
        self.history: dict[str, list[tuple[int, float]]] = {"train/loss": [], "val/loss": []}

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.add(step, metrics)
        for name, series in self.history.items():
            if name in metrics:
                series.append((step, metrics[name]))
        if self.first_step is None:
            self.first_step, self.started = step, time.monotonic()
            eta = ""
        else:
            seconds_per_step = (time.monotonic() - self.started) / (step - self.first_step)
            eta = f" · ETA {human_duration(seconds_per_step * (self.max_steps - step))}"
        parts = [f"step {step}/{self.max_steps}"]
        if "train/loss" in metrics:
            parts.append(f"loss {metrics['train/loss']:.3f}")
        if "val/loss" in metrics:
            parts.append(f"val {metrics['val/loss']:.3f}")
        if "train/lr" in metrics:
            parts.append(f"lr {metrics['train/lr']:.2e}")
        if "train/tokens_per_sec" in metrics:
            parts.append(f"{human_count(metrics['train/tokens_per_sec'])} tok/s")
        if "train/mfu" in metrics:
            parts.append(f"MFU {metrics['train/mfu']:.1%}")
        self.logger.info("pretrain: " + " · ".join(parts) + eta)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.logger.info(f"pretrain: checkpoint of step {step} saved to {path}")

    def write_report(self, directory: Path) -> None:
        (directory / "history.json").write_text(json.dumps(self.history, indent=1))
        _plot_loss_curve(self.history, directory / "loss_curve.png")


@task(name="pretrain-model")
def pretrain_model_task(
    model_config: ModelConfig,
    train_config: TrainConfig,
    tokens: TokenManifest,
    run_dir: str,
    tracking_uri: str,
    mlflow_run_id: str,
    resume: bool,
) -> TrainedModel:
    run = PipelineRun.attach(tracking_uri, mlflow_run_id)
    reporter = TrainingReporter(run, train_config.max_steps)
    result = model.train.pretrain(
        model_config, train_config, tokens.paths("train"), tokens.paths("val"), Path(run_dir),
        callback=reporter, resume=resume,
    )
    reporter.metrics.flush()
    with atomic_directory(Path(run_dir) / REPORT_DIR) as report_dir:
        reporter.write_report(report_dir)
    return TrainedModel(
        run_dir=run_dir,
        final_dir=str(result.final_dir),
        report_dir=str(Path(run_dir) / REPORT_DIR),
        weights_hash=read_contents_hash(result.final_dir),
        model_config=dataclasses.asdict(model_config),
        steps=result.steps,
        tokens_seen=result.tokens_seen,
        final_train_loss=result.final_train_loss,
        final_val_loss=result.final_val_loss,
        elapsed_s=result.elapsed_s,
        trained_in_mlflow_run=mlflow_run_id,
    )


def train_model(
    tokens: TokenManifest,
    tokenizer: TokenizerArtifact,
    model_config: ModelConfig,
    train_config: TrainConfig,
    workspace: Workspace,
    run: PipelineRun,
    resume: bool = False,
) -> TrainedModel:
    model_config = dataclasses.replace(model_config, vocab_size=pad_vocab_size(tokenizer.vocab_size))
    key = stage_key(
        "pretrain",
        config={"model": dataclasses.asdict(model_config), "train": dataclasses.asdict(train_config)},
        modules=CODE,
        inputs={"tokens": tokens.fingerprint, "tokenizer": tokenizer.hash},
    )
    outcome = run_stage(
        pretrain_model_task,
        key=key,
        workspace=workspace,
        is_valid=lambda trained: is_complete(Path(trained.final_dir)) and is_complete(Path(trained.report_dir)),
        model_config=model_config,
        train_config=train_config,
        tokens=tokens,
        run_dir=str(workspace.store / "runs" / key),
        tracking_uri=workspace.tracking_uri,
        mlflow_run_id=run.run_id,
        resume=resume,
    )
    trained = outcome.result
    run.record_stage("pretrain", outcome.status)
    run.log_params({"model.padded_vocab_size": model_config.vocab_size})
    run.set_tags({"gptflow.trained_in_run": trained.trained_in_mlflow_run})
    run.log_artifact(Path(trained.report_dir), "plots")
    if outcome.status == "executed":
        run.log_artifact(Path(trained.final_dir), "model")
    # A cached model is not uploaded again: the tag above names the run whose artifacts hold it.
    return trained


def _plot_loss_curve(history: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; and never pick an interactive backend inside a worker
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=110)
    for name, series in history.items():
        if series:
            steps, values = zip(*series)
            axes.plot(steps, values, label=name, marker="o" if name.startswith("val") else None)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy (nats/token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
