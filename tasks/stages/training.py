"""Stage 4, pretrain: token shards → a trained GPT (checkpoints, final model, loss curve).

``plan_training`` decides from the corpus's lineage (``tasks.lineage``) what to train: the same
data as an earlier compatible model (same ``ModelConfig`` and tokenizer: ``compatibility_key``)
plans as it was planned then (a cache hit unless settings changed); data that grew continues the
latest compatible model from its last checkpoint (``model.pretraining.Continuation``: new token
units drawn at ``incremental.new_data_fraction``, the rest replayed, a fresh warmup and cosine
over ``incremental.extra_tokens``); only removals keep that model; no compatible model trains from
scratch, with a note naming what changed. ``--from-scratch`` and a data mixture always train from
scratch; ``--init-from`` starts from another model's weights (not its optimizer state).

The key (``_key_settings``, with ``stage_key``) holds the ``ModelConfig``,
``TrainConfig.trained_settings()`` (the global micro-batch in place of ``micro_batch_size`` and
``nproc``, and no ``parallelism``, so another ``--nproc`` keeping the product keeps the key and
resumes from its checkpoints), the continued checkpoint's weights hash and the data it had seen, a mixture's parts,
and as inputs the token fingerprint, the tokenizer hash and an ``--init-from`` model's weights
hash; its code is this module's and the MLflow model's (``tasks.mlflow_models.text_generator``).
Where ranks run (a rendezvous) is not in it. Before a key trains, a ``TrainingAttempt`` is put in
the lineage, and the latest unfinished attempt under another key is logged with each setting that
differs, so a user sees why its checkpoints are not resumed. ``--restart`` executes the stage even
when cached and trains from step 0, deleting the key's checkpoints and final model first.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task

from gptflow.data.code_version import code_version
from gptflow.data.commits import read_contents_hash
from gptflow.data.hashing import hash_json
from gptflow.data.mixture import MixturePart
from gptflow.data.store import ArtifactStore
from gptflow.data.tokenize import TokenManifest
from gptflow.data.tokenizer import TOKENIZER_FILE, TokenizerArtifact
from gptflow.model.checkpoint import CHECKPOINTS_DIR, FINAL_DIR, latest_checkpoint
from gptflow.model.config import IncrementalConfig, ModelConfig, TrainConfig, pad_vocab_size
from gptflow.model.pretraining import Continuation
from gptflow.tasks.lineage import ContinuationSource, Lineage, ModelRecord, TrainingAttempt
from gptflow.tasks.runtime.caching import run_stage, stage_key
from gptflow.tasks.runtime.rendezvous import Rendezvous
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.stages.training_job import TrainedModel, TrainingJob
from gptflow.tasks.tracking.progress import run_logger
from gptflow.tasks.tracking.registry import (
    GENERATOR_MODULE,
    REGISTERED_MODEL_TAG,
    pretrained_description,
    version_holding,
)
from gptflow.tasks.tracking.run import PipelineRun
from gptflow.tasks.tracking.training_reporter import show_reused_training

HASHED_SETTINGS = {
    "continuation": "another starting point (continued model or data it had seen)",
    "tokens": "other training data",
    "mixture": "other --corpus weights",
    "tokenizer": "a different tokenizer",
    "initial_weights": "another --init-from model",
    "code": "other code (gptflow's training code or torch)",
}
"""The parts of a pretrain key named as a whole when they differ (hashes, or a structure)."""


@task(name="pretrain-model")
def pretrain_model_task(job: TrainingJob) -> TrainedModel:
    # Each rank checks each shard's content hash when it first reads it (job.run's verify_shards),
    # which catches bytes altered behind an unchanged size and mtime that the cache check
    # (is_complete) lets through, without reading the corpus before the first step.
    nproc = job.train_config["nproc"]
    return job.run(prefect_progress=True) if nproc == 1 else job.run_with_torchrun(nproc)


@dataclass(frozen=True)
class InitialModel:
    """A trained model whose weights a pretraining starts from (``--init-from``)."""

    source: str
    """As the user named it (a registry URI, a run id, a folder)."""
    model_dir: Path
    weights_hash: str


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
    lineage: Lineage, model_config: dict[str, Any], tokenizer_hash: str, tokens: TokenManifest, from_scratch: bool,
    artifacts: ArtifactStore,
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
    checkpoint = latest_checkpoint(Path(previous.trained["run_dir"]), artifacts)
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
    restart: bool = False,
    from_scratch: bool = False,
    mixture: list[MixturePart] | None = None,
    rendezvous: Rendezvous | None = None,
    init_from: InitialModel | None = None,
) -> TrainedModel:
    """Train the model the lineage's plan calls for, or return it cached. A training of this exact
    key that stopped early resumes from its latest checkpoint; ``restart`` trains it again from
    step 0, even when it had finished. ``mixture`` draws the training windows by source (a data
    mixture): such a model is trained from scratch, never continued or kept from another.
    ``rendezvous``: the ``train.nproc`` ranks span several machines, which meet there.
    ``init_from``: a model trained from scratch starts from that model's weights instead (its config
    is ``model_config``); one of its own earlier trainings on this corpus is continued on new data
    as any other is."""
    if init_from is None:
        model_config = dataclasses.replace(model_config, vocab_size=pad_vocab_size(tokenizer.vocab_size))
    plan = _announced_plan(lineage, model_config, tokenizer, tokens, from_scratch, mixture, workspace.artifacts)
    run.log_params({"model.padded_vocab_size": model_config.vocab_size})
    if plan.keep is not None:
        return _kept_model(plan.keep, registered_model_name, run, workspace.artifacts)

    train_paths, continuation = tokens.paths("train"), None
    if plan.continue_from is not None:
        old_units = _unit_keys(plan.continue_from.tokens_manifest)
        train_paths = [path for unit, path in _train_shards(tokens) if unit in old_units]
        new_paths = [path for unit, path in _train_shards(tokens) if unit not in old_units]
        continuation = Continuation(Path(plan.continue_from.checkpoint), new_paths, incremental.new_data_fraction)
        train_config = _continuation_schedule(train_config, incremental, tokens, new_paths, model_config)
    settings = _key_settings(model_config, train_config, plan.continue_from if continuation else None,
                             incremental, mixture, tokens)
    inputs = {"tokens": tokens.fingerprint, "tokenizer": tokenizer.hash}
    if init_from is not None:
        inputs["initial_weights"] = init_from.weights_hash
    modules = (__name__, GENERATOR_MODULE)
    key = stage_key("pretrain", config=settings, modules=modules, inputs=inputs)
    run_dir = workspace.store / "runs" / key
    if restart or not workspace.artifacts.is_complete(run_dir / FINAL_DIR):  # this key is about to train
        attempt = TrainingAttempt(key, str(run_dir), {**settings, **inputs, "code": code_version(*modules)}, run.run_id)
        if note := _unresumed_attempt_note(lineage, attempt, workspace.artifacts):
            run_logger().warning(note)
        lineage.record_attempt(workspace, attempt)
    if restart:
        trained_before = any((run_dir / name).exists() for name in (CHECKPOINTS_DIR, FINAL_DIR))
        run_logger().info("pretrain: --restart: training from step 0"
                          + (f", deleting the checkpoints and model in {run_dir}" if trained_before else ""))
    job = TrainingJob(
        model_config=dataclasses.asdict(model_config),
        train_config=dataclasses.asdict(train_config),
        train_paths=[str(path) for path in train_paths],
        val_paths=[str(path) for path in tokens.paths("val")],
        continuation=None if continuation is None else continuation.to_json(),
        run_dir=str(run_dir),
        tokenizer_file=tokenizer.path,
        registered_model_name=registered_model_name,
        workspace=str(workspace.root),
        tracking_uri=workspace.tracking_uri,
        mlflow_run_id=run.run_id,
        restart=restart,
        mixture=[part.to_json() for part in mixture or ()],
        rendezvous=None if rendezvous is None else dataclasses.asdict(rendezvous),
        initial_weights=str(init_from.model_dir) if init_from is not None else None,
    )
    job.shard_tokens = _shard_tokens(tokens, job.token_paths())
    outcome = run_stage(
        pretrain_model_task,
        key=key,
        workspace=workspace,
        is_valid=lambda trained, artifacts: all(artifacts.are_complete([Path(trained.final_dir), Path(trained.report_dir)])),
        recompute=restart,
        job=job,
    )
    trained = outcome.result
    if outcome.status == "cached":
        trained = _registered_in_tracking_store(trained, registered_model_name, run, workspace.artifacts)
    run.record_stage("pretrain", outcome.status)
    _tag_training(run, trained, plan, init_from)
    lineage.add_model(ModelRecord(
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


def _key_settings(model_config: ModelConfig, train_config: TrainConfig, continued: ContinuationSource | None,
                  incremental: IncrementalConfig, mixture: list[MixturePart] | None,
                  tokens: TokenManifest) -> dict[str, Any]:
    """What a training's key holds of its settings: the model, what shapes training, the model it
    continues and the data mixture."""
    return {
        "model": dataclasses.asdict(model_config),
        "train": train_config.trained_settings(),
        "continuation": None if continued is None else {
            "weights": continued.weights_hash,
            "seen_tokens": continued.tokens_fingerprint,
            "new_data_fraction": incremental.new_data_fraction,
        },
        "mixture": _mixture_setting(mixture, tokens),
    }


def _announced_plan(lineage: Lineage, model_config: ModelConfig, tokenizer: TokenizerArtifact, tokens: TokenManifest,
                    from_scratch: bool, mixture: list[MixturePart] | None, artifacts: ArtifactStore) -> TrainingPlan:
    """``plan_training``'s plan, from scratch with a data mixture; its note logged."""
    plan = plan_training(lineage, dataclasses.asdict(model_config), tokenizer.hash, tokens, from_scratch, artifacts)
    if mixture and (plan.continue_from or plan.keep):
        plan = TrainingPlan(note="pretrain: --corpus weights train a new model from scratch (continuing the earlier "
                                 "model on the data added since would draw by old and new files, not by source)")
    if plan.note:
        run_logger().warning(plan.note) if plan.keep is None else run_logger().info(plan.note)
    return plan


def _kept_model(kept: ModelRecord, registered_model_name: str, run: PipelineRun,
                artifacts: ArtifactStore) -> TrainedModel:
    """The lineage's model, kept as it is (no new training data since it was trained)."""
    trained = _registered_in_tracking_store(TrainedModel(**kept.trained), registered_model_name, run, artifacts)
    run.record_stage("pretrain", "cached")
    run.set_tags({"gptflow.training": "kept", REGISTERED_MODEL_TAG: trained.registered_model})
    _show_training_reused(run, trained)
    return trained


def _tag_training(run: PipelineRun, trained: TrainedModel, plan: TrainingPlan, init_from: InitialModel | None) -> None:
    """How the model was trained and its registered version; and its loss curves. The model
    itself was logged and registered by the run that trained it: a cached run does not upload it
    again, and shows the training it reused (``_show_training_reused``)."""
    tags = {
        "gptflow.training": "continued" if plan.continue_from else "initialized" if init_from else "from_scratch",
        REGISTERED_MODEL_TAG: trained.registered_model,
    }
    if plan.continue_from is not None:
        tags["gptflow.continues_run"] = plan.continue_from.mlflow_run_id
    if init_from is not None:
        tags["gptflow.init_from"] = init_from.source
    run.set_tags(tags)
    _show_training_reused(run, trained)


def _show_training_reused(run: PipelineRun, trained: TrainedModel) -> None:
    """A run whose model an earlier run trained: that run in ``gptflow.trained_in_run``, and in
    MLflow's pages its model, curves and a line saying so (``show_reused_training``)."""
    if trained.trained_in_mlflow_run != run.run_id:
        run.set_tags({"gptflow.trained_in_run": trained.trained_in_mlflow_run})
        show_reused_training(run, trained.trained_in_mlflow_run, trained.registered_model, Path(trained.report_dir))


def _run_tokenizer(trained: TrainedModel, artifacts: ArtifactStore) -> Path:
    """The tokenizer file kept beside a run's checkpoints (fetched when its workspace is on an object store)."""
    path = Path(trained.run_dir) / TOKENIZER_FILE
    artifacts.pull(path)
    return path


def _registered_in_tracking_store(trained: TrainedModel, name: str, run: PipelineRun,
                                  artifacts: ArtifactStore) -> TrainedModel:
    """``trained`` with the run and registered version the tracking store holds it under (see
    ``tasks.tracking.registry.version_holding``: a lost model is logged and registered again by ``run``)."""
    registered, trained_in = version_holding(
        run, name, trained.weights_hash, trained.registered_model, trained.trained_in_mlflow_run,
        log_again=lambda: run.log_text_generator(
            Path(trained.final_dir), _run_tokenizer(trained, artifacts), name,
            pretrained_description(ModelConfig(**trained.model_config), trained.steps, trained.tokens_seen)),
    )
    return dataclasses.replace(trained, registered_model=registered, trained_in_mlflow_run=trained_in)


def _mixture_setting(mixture: list[MixturePart] | None, tokens: TokenManifest) -> list[list[Any]] | None:
    """What a data mixture adds to the pretrain key: each part's probability and the units it draws
    from (by key, so the same mixture keys the same wherever the store lies)."""
    if not mixture:
        return None
    unit_of_shard = {path: unit for unit, path in _train_shards(tokens)}
    return [[hash_json([unit_of_shard[path] for path in part.train_paths]), part.probability] for part in mixture]


def _shard_tokens(tokens: TokenManifest, paths: list[str]) -> list[int]:
    """The token count of each shard of ``paths``, as the manifest has it."""
    counts = {str(Path(unit.directory) / f"{split}.arrow"): unit.n_tokens[split]
              for unit in tokens.units for split in unit.n_tokens}
    return [counts[path] for path in paths]


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
    changes = _field_changes("model", previous.model_config, model_config)
    if previous.tokenizer_hash != tokenizer_hash:
        changes.append("a different tokenizer")
    return ", ".join(changes)


def _unresumed_attempt_note(lineage: Lineage, attempt: TrainingAttempt, artifacts: ArtifactStore) -> str | None:
    """The latest training of this corpus under another key that stopped before its end: its
    checkpoints stay where they are, and the log says why this run does not resume from them."""
    for earlier in reversed(lineage.attempts):
        run_dir = Path(earlier.run_dir)
        checkpoint = latest_checkpoint(run_dir, artifacts)
        if earlier.stage_key != attempt.stage_key and checkpoint and not artifacts.is_complete(run_dir / FINAL_DIR):
            changes = [
                *_field_changes("model", earlier.settings["model"], attempt.settings["model"]),
                *_field_changes("train", earlier.settings["train"], attempt.settings["train"]),
                # An attempt recorded before data mixtures existed has no "mixture": it had none.
                *(description for name, description in HASHED_SETTINGS.items()
                  if earlier.settings.get(name) != attempt.settings.get(name)),
            ]
            return (f"pretrain: run {earlier.mlflow_run_id} of this corpus stopped at {checkpoint}; this run does not "
                    f"resume from it, as the settings differ: {', '.join(changes)} (its checkpoints are kept)")
    return None


def _field_changes(section: str, before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return [f"{section}.{name} {before.get(name)} → {value}" for name, value in after.items() if before.get(name) != value]
