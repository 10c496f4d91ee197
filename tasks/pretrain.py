"""Stage 4, pretrain: token shards → a trained GPT (checkpoints, final model, loss curve)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task

from gptflow.data.store import hash_json, is_complete, read_contents_hash, verify_files
from gptflow.data.tokenize import TokenManifest
from gptflow.data.tokenizer import TokenizerArtifact
from gptflow.model.checkpoint import latest_checkpoint
from gptflow.model.config import ModelConfig, TrainConfig, pad_vocab_size
from gptflow.model.train import Continuation
from gptflow.tasks.caching import run_stage, stage_key
from gptflow.tasks.config import IncrementalConfig
from gptflow.tasks.lineage import ContinuationSource, Lineage, ModelRecord
from gptflow.tasks.progress import run_logger
from gptflow.tasks.tracking import GENERATOR_MODULE, REGISTERED_MODEL_TAG, PipelineRun
from gptflow.tasks.training_job import TrainedModel, TrainingJob
from gptflow.tasks.workspace import Workspace



@task(name="pretrain-model")
def pretrain_model_task(job: TrainingJob) -> TrainedModel:
    # Training reads every shard many times over, so re-hashing them first costs little, and it
    # catches bytes altered behind an unchanged size and mtime, which the cache check (is_complete)
    # lets through. Here, once, rather than in each torchrun rank.
    verify_files(job.token_paths())
    nproc = job.train_config["nproc"]
    return job.run(prefect_progress=True) if nproc == 1 else job.run_with_torchrun(nproc)


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
        trained = _registered(TrainedModel(**plan.keep.trained), run)
        run.record_stage("pretrain", "cached")
        run.set_tags({"gptflow.training": "kept", "gptflow.trained_in_run": trained.trained_in_mlflow_run,
                      REGISTERED_MODEL_TAG: trained.registered_model})
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
        modules=(__name__, GENERATOR_MODULE),
        inputs={"tokens": tokens.fingerprint, "tokenizer": tokenizer.hash},
    )
    job = TrainingJob(
        model_config=dataclasses.asdict(model_config),
        train_config=dataclasses.asdict(train_config),
        train_paths=[str(path) for path in train_paths],
        val_paths=[str(path) for path in tokens.paths("val")],
        continuation=None if continuation is None else {
            "checkpoint": str(continuation.checkpoint),
            "new_train_paths": [str(path) for path in continuation.new_train_paths],
            "new_data_fraction": continuation.new_data_fraction,
        },
        run_dir=str(workspace.store / "runs" / key),
        tokenizer_file=tokenizer.path,
        registered_model_name=registered_model_name,
        workspace=str(workspace.root),
        tracking_uri=workspace.tracking_uri,
        mlflow_run_id=run.run_id,
        resume=resume,
    )
    outcome = run_stage(
        pretrain_model_task,
        key=key,
        workspace=workspace,
        is_valid=lambda trained: is_complete(Path(trained.final_dir)) and is_complete(Path(trained.report_dir)),
        job=job,
    )
    trained = _registered(outcome.result, run)
    run.record_stage("pretrain", outcome.status)
    tags = {
        "gptflow.training": "continued" if continuation else "from_scratch",
        "gptflow.trained_in_run": trained.trained_in_mlflow_run,
        REGISTERED_MODEL_TAG: trained.registered_model,
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


def _registered(trained: TrainedModel, run: PipelineRun) -> TrainedModel:
    """``trained``, with the version its model got since, if the cached or kept record says pending."""
    return dataclasses.replace(
        trained, registered_model=run.resolve_registered(trained.registered_model, trained.trained_in_mlflow_run))


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
