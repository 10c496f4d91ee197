"""Stage 4, pretrain: token shards → a trained GPT (checkpoints, final model, loss curve)."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

import data.loader
import model.checkpoint
import model.device
import model.evaluate
import model.gpt
import model.optim
import model.train
from data.store import atomic_directory, hash_json, is_complete, read_contents_hash
from data.tokenize import TokenManifest
from data.tokenizer import TokenizerArtifact
from model.checkpoint import latest_checkpoint
from model.config import ModelConfig, TrainConfig, pad_vocab_size
from model.train import Continuation
from tasks.caching import run_stage, stage_key
from tasks.config import IncrementalConfig
from tasks.lineage import ContinuationSource, Lineage, ModelRecord
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
    registered_model: str
    """``name/version`` in the MLflow model registry; the version's source is that run's
    ``model`` artifact, an MLflow pyfunc model that generates text."""


class TrainingReporter:
    """The training loop's callback: batched MLflow metrics, console progress, loss history."""

    def __init__(self, run: PipelineRun, max_steps: int) -> None:
        self.metrics = BufferedMetrics(run)
        self.max_steps = max_steps
        self.logger = run_logger()
        self.started = time.monotonic()
        self.first_step: int | None = None
        self.history: dict[str, list[tuple[int, float]]] = {"train/loss": [], "val/loss": []}
        self.progress_artifact = create_progress_artifact(progress=0.0, description="pretrain: starting")

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
        line = "pretrain: " + " · ".join(parts) + eta
        self.logger.info(line)
        update_progress_artifact(self.progress_artifact, progress=100.0 * step / self.max_steps, description=line)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.logger.info(f"pretrain: checkpoint of step {step} saved to {path}")

    def write_report(self, directory: Path) -> None:
        (directory / "history.json").write_text(json.dumps(self.history, indent=1))
        _plot_loss_curve(self.history, directory / "loss_curve.png")


@task(name="pretrain-model")
def pretrain_model_task(
    model_config: ModelConfig,
    train_config: TrainConfig,
    train_paths: list[Path],
    val_paths: list[Path],
    continuation: Continuation | None,
    run_dir: str,
    tokenizer_file: str,
    registered_model_name: str,
    tracking_uri: str,
    mlflow_run_id: str,
    resume: bool,
) -> TrainedModel:
    run = PipelineRun.attach(tracking_uri, mlflow_run_id)
    reporter = TrainingReporter(run, train_config.max_steps)
    result = model.train.pretrain(
        model_config, train_config, train_paths, val_paths, Path(run_dir),
        callback=reporter, resume=resume, continuation=continuation,
    )
    reporter.metrics.flush()
    with atomic_directory(Path(run_dir) / REPORT_DIR) as report_dir:
        reporter.write_report(report_dir)
    version = run.log_text_generator(result.final_dir, Path(tokenizer_file), registered_model_name)
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
        registered_model=f"{registered_model_name}/{version}",
    )


@dataclass
class TrainingPlan:
    """From scratch, continuing an earlier model, or keeping one (nothing new to learn)."""

    continue_from: ContinuationSource | None = None
    keep: ModelRecord | None = None
    note: str | None = None
    """Why the plan is what it is, when the user might have expected otherwise."""


def compatibility_key(model_config: dict[str, Any], tokenizer_hash: str) -> str:
    """Models agreeing on this can continue one another: same shapes, same token ids."""
    return hash_json({"model": model_config, "tokenizer": tokenizer_hash})


def plan_training(
    lineage: Lineage, model_config: dict[str, Any], tokenizer_hash: str, tokens: TokenManifest, from_scratch: bool
) -> TrainingPlan:
    if from_scratch or not lineage.models:
        return TrainingPlan()
    compatibility = compatibility_key(model_config, tokenizer_hash)
    compatible = [record for record in lineage.models if record.compatibility == compatibility]
    same_data = [record for record in compatible if record.tokens_fingerprint == tokens.fingerprint]
    if same_data:
        # This exact data was trained on before: plan the same way again (a cache hit, unless
        # the training settings changed).
        return TrainingPlan(continue_from=same_data[-1].continued_from)
    if not compatible:
        latest = lineage.models[-1]
        if latest.tokens_fingerprint == tokens.fingerprint:
            return TrainingPlan()  # same data, new model settings: an ordinary new model
        changed = _describe_difference(latest, model_config, tokenizer_hash)
        return TrainingPlan(note=f"pretrain: the previous model of this corpus cannot be continued on the new "
                                 f"data ({changed}); training from scratch")
    previous = compatible[-1]
    checkpoint = latest_checkpoint(Path(previous.trained["run_dir"]))
    if checkpoint is None or not Path(previous.tokens_manifest).exists():
        return TrainingPlan(note=f"pretrain: the checkpoints or data manifest of run "
                                 f"{previous.trained['trained_in_mlflow_run']} are gone from the store, so it cannot "
                                 "be continued; training from scratch")
    old_units = _unit_keys(previous.tokens_manifest)
    if all(unit.key in old_units for unit in tokens.units if unit.n_tokens["train"]):
        return TrainingPlan(keep=previous, note="pretrain: no new training data since run "
                            f"{previous.trained['trained_in_mlflow_run']}; keeping its model")
    return TrainingPlan(continue_from=ContinuationSource(
        checkpoint=str(checkpoint),
        weights_hash=read_contents_hash(checkpoint),
        tokens_manifest=previous.tokens_manifest,
        tokens_fingerprint=previous.tokens_fingerprint,
        mlflow_run_id=previous.trained["trained_in_mlflow_run"],
    ))


def train_model(
    tokens: TokenManifest,
    tokenizer: TokenizerArtifact,
    model_config: ModelConfig,
    train_config: TrainConfig,
    incremental: IncrementalConfig,
    workspace: Workspace,
    run: PipelineRun,
    lineage: Lineage,
    registered_model_name: str,
    resume: bool = False,
    from_scratch: bool = False,
) -> TrainedModel:
    model_config = dataclasses.replace(model_config, vocab_size=pad_vocab_size(tokenizer.vocab_size))
    plan = plan_training(lineage, dataclasses.asdict(model_config), tokenizer.hash, tokens, from_scratch)
    if plan.note:
        run_logger().warning(plan.note) if plan.keep is None else run_logger().info(plan.note)
    run.log_params({"model.padded_vocab_size": model_config.vocab_size})

    if plan.keep is not None:
        trained = TrainedModel(**plan.keep.trained)
        run.record_stage("pretrain", "cached")
        run.set_tags({"gptflow.training": "kept", "gptflow.trained_in_run": trained.trained_in_mlflow_run,
                      "gptflow.registered_model": trained.registered_model})
        return trained

    train_paths, continuation = tokens.paths("train"), None
    if plan.continue_from is not None:
        old_units = _unit_keys(plan.continue_from.tokens_manifest)
        train_paths = [path for unit, path in _train_shards(tokens) if unit in old_units]
        new_paths = [path for unit, path in _train_shards(tokens) if unit not in old_units]
        continuation = Continuation(Path(plan.continue_from.checkpoint), new_paths, incremental.new_data_fraction)
        train_config = _continuation_schedule(train_config, incremental, tokens, new_paths, model_config)
    key = stage_key(
        "pretrain",
        config={
            "model": dataclasses.asdict(model_config),
            "train": dataclasses.asdict(train_config),
            "continuation": None if continuation is None else {
                "weights": plan.continue_from.weights_hash,
                "seen_tokens": plan.continue_from.tokens_fingerprint,
                "new_data_fraction": incremental.new_data_fraction,
            },
        },
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
        train_paths=train_paths,
        val_paths=tokens.paths("val"),
        continuation=continuation,
        run_dir=str(workspace.store / "runs" / key),
        tokenizer_file=tokenizer.path,
        registered_model_name=registered_model_name,
        tracking_uri=workspace.tracking_uri,
        mlflow_run_id=run.run_id,
        resume=resume,
    )
    trained = outcome.result
    run.record_stage("pretrain", outcome.status)
    tags = {
        "gptflow.training": "continued" if continuation else "from_scratch",
        "gptflow.trained_in_run": trained.trained_in_mlflow_run,
        "gptflow.registered_model": trained.registered_model,
    }
    if plan.continue_from is not None:
        tags["gptflow.continues_run"] = plan.continue_from.mlflow_run_id
    run.set_tags(tags)
    # The model itself was logged and registered by the run that trained it (the tags name it);
    # a cached run does not upload it again.
    run.log_artifact(Path(trained.report_dir), "plots")
    # The latest record of a key is the one to continue from; reruns move it to the end.
    lineage.models = [record for record in lineage.models if record.stage_key != key]
    lineage.models.append(ModelRecord(
        stage_key=key,
        compatibility=compatibility_key(dataclasses.asdict(model_config), tokenizer.hash),
        model_config=dataclasses.asdict(model_config),
        tokenizer_hash=tokenizer.hash,
        tokens_fingerprint=tokens.fingerprint,
        tokens_manifest=tokens.path,
        trained=dataclasses.asdict(trained),
        continued_from=plan.continue_from,
    ))
    return trained


def _train_shards(tokens: TokenManifest) -> list[tuple[str, Path]]:
    return [(unit.key, Path(unit.directory) / "train.arrow") for unit in tokens.units if unit.n_tokens["train"]]


def _unit_keys(tokens_manifest: str) -> set[str]:
    return {unit["key"] for unit in json.loads(Path(tokens_manifest).read_text())["units"]}


def _continuation_schedule(
    train_config: TrainConfig,
    incremental: IncrementalConfig,
    tokens: TokenManifest,
    new_paths: list[Path],
    model_config: ModelConfig,
) -> TrainConfig:
    """Steps for the extra tokens; by default enough to show each new token about once."""
    new_tokens = sum(unit.n_tokens["train"] for unit in tokens.units
                     if Path(unit.directory) / "train.arrow" in set(new_paths))
    extra_tokens = incremental.extra_tokens or round(new_tokens / incremental.new_data_fraction)
    tokens_per_step = train_config.micro_batch_size * train_config.grad_accum_steps * model_config.block_size
    steps = max(1, math.ceil(extra_tokens / tokens_per_step))
    return dataclasses.replace(train_config, max_steps=steps, warmup_steps=min(train_config.warmup_steps, steps // 10))


def _describe_difference(previous: ModelRecord, model_config: dict[str, Any], tokenizer_hash: str) -> str:
    changes = [
        f"model.{name} {previous.model_config.get(name)} → {value}"
        for name, value in model_config.items()
        if previous.model_config.get(name) != value
    ]
    if previous.tokenizer_hash != tokenizer_hash:
        changes.append("a different tokenizer")
    return ", ".join(changes)


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
