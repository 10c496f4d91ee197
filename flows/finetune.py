"""The ``finetune`` flow: a pretrained gptflow model tuned to follow instructions (objective
``sft``), to classify texts (``classification``) or to tag spans of them (``tagging``), fully or
with LoRA: demo data → prepare →
finetune → evaluate, each stage cached; the fine-tuned model logged to MLflow as a pyfunc model
and registered."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from gptflow.data.chat import ChatTemplate
from gptflow.data.finetune_inputs import OBJECTIVES
from gptflow.flows.checks import check_finetune
from gptflow.flows.summaries import FlowSummary, end_log_of_deployment_run, model_cell, model_line, of_run
from gptflow.flows.user_errors import hide_tracebacks_of_user_errors
from gptflow.model.finetune_config import FinetuneConfig
from gptflow.tasks.model_source import ResolvedModel, resolve_model
from gptflow.tasks.runtime.caching import pipeline_code_version
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.settings import ConfigError, FinetuneSettings
from gptflow.tasks.stages.finetuning import (
    FinetunedModel,
    FinetuneReport,
    PreparedData,
    demo_data,
    evaluate_finetuned,
    finetune_model,
    prepare_data,
)
from gptflow.tasks.stages.tagging import summary_line as tagging_summary
from gptflow.tasks.tracking.naming import run_name, source_label
from gptflow.tasks.tracking.progress import human_count, run_logger
from gptflow.tasks.tracking.registry import default_base_model
from gptflow.tasks.tracking.run import PipelineRun, pipeline_run
from gptflow.tasks.tracking.training_reporter import log_training_report

# A Literal, so a deployment's `objective` parameter is validated and offered as a choice in the Prefect UI.
Objective = Literal[OBJECTIVES]
DEMO_DESCRIPTIONS = {
    "sft": "built-in demo: docstring → function, from the standard library's source",
    "classification": "built-in demo: which standard-library package a function is from",
    "tagging": "built-in demo: the Python token kind of each span of standard-library functions",
}


@dataclass
class FinetuneSummary(FlowSummary):
    """What a user wants to read when the flow ends."""

    objective: str
    base_model: str
    base_weights_hash: str
    data: str
    stages: dict[str, str]
    examples: dict[str, int]
    truncated: int
    skipped: str
    """``SkipReport.summary()`` of the prepared data."""
    steps: int
    lora_rank: int
    trainable_parameters: int
    total_parameters: int
    initial_val_loss: float
    final_val_loss: float
    metrics: dict[str, float]
    registered_model: str
    samples: list[dict[str, str]] = field(default_factory=list)

    @property
    def model_uri(self) -> str:
        return "models:/" + self.registered_model

    def markdown(self, mlflow_run_url: str | None) -> str:
        """The flow run's Prefect artifact: what ran, what it scored, where the model is."""
        rows = [
            f"| objective | {self.objective} |",
            f"| base model | `{self.base_model}` (weights {self.base_weights_hash[:12]}) |",
            f"| data | {self.data} |",
            *(f"| stage: {name} | {status} |" for name, status in self.stages.items()),
            f"| train / val examples | {self.examples['train']:,} / {self.examples['val']:,} |",
            f"| truncated / skipped | {self.truncated:,} / {self.skipped} |",
            f"| training | {self.steps} steps, {self._method()} |",
            f"| val loss | {self.initial_val_loss:.4f} → {self.final_val_loss:.4f} |",
            # Overall figures; the per-label ones (eval/f1/<label>, ...) are in MLflow.
            *(f"| {name} | {value:.4f} |" for name, value in self.metrics.items() if name.count("/") == 1),
            f"| registered model | {model_cell(self.registered_model, mlflow_run_url)} |",
        ]
        return self.table("finetune", rows, mlflow_run_url)

    def render(self, sample: bool = True) -> str:
        lines = [
            "",
            f"stages      {', '.join(f'{name} {status}' for name, status in self.stages.items())}",
            f"base model  {self.base_model} (weights {self.base_weights_hash[:8]})",
            f"data        {self.data}: {self.examples['train']:,} train / {self.examples['val']:,} val examples, "
            f"{self.truncated:,} truncated; {self.skipped}",
            f"training    {self.steps} steps, {self._method()}",
        ]
        if self.objective == "classification":
            lines += [
                f"val loss    {self.initial_val_loss:.3f} → {self.final_val_loss:.3f} nats/example",
                f"accuracy    {self.metrics['eval/accuracy']:.3f}, macro-F1 {self.metrics['eval/macro_f1']:.3f} "
                f"(majority baseline {self.metrics['eval/majority_accuracy']:.3f})",
            ]
        elif self.objective == "tagging":
            lines += [
                f"val loss    {self.initial_val_loss:.3f} → {self.final_val_loss:.3f} nats/tagged token",
                f"spans       {tagging_summary(self.metrics, 'val')}; per label in the run's eval/ folder",
            ]
        else:
            lines.append(f"val loss    {self.initial_val_loss:.3f} (base model) → {self.final_val_loss:.3f} "
                         "nats/response token")
        lines += [
            model_line(self.registered_model, 'mlflow.pyfunc.load_model("{uri}").predict([...])'),
        ]
        if sample and self.samples:
            prompt, response = self.samples[0]["prompt"], self.samples[0]["response"]
            lines.append("sample      " + "\n            ".join(
                [*prompt.strip().splitlines()[-4:], *response.strip().splitlines()[:8]]))
        return "\n".join(lines + self.closing_lines())

    def _method(self) -> str:
        trained = (f"{human_count(self.trainable_parameters)} of {human_count(self.total_parameters)} parameters "
                   "trained")
        return f"LoRA rank {self.lora_rank}, {trained}" if self.lora_rank else f"full fine-tune, {trained}"


def _flow_run_name() -> str:
    """``lora_rank=0 · finetune sft gptflow-cpu/1 pairs.jsonl``: settings, objective, base model, data."""
    parameters = flow_run.parameters
    data = parameters.get("data")
    return run_name("finetune", parameters.get("overrides"), parameters.get("objective", "sft"),
                    source_label(parameters.get("model")), source_label(data) if data else "demo")


@flow(name="finetune", flow_run_name=_flow_run_name, log_prints=True)
def finetune(
    objective: Objective = "sft",
    model: str | None = None,
    data: str | None = None,
    val_data: str | None = None,
    tokenizer: str | None = None,
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    workspace: str | None = None,
    restart: bool = False,
) -> FinetuneSummary:
    """Fine-tune a pretrained gptflow model for instructions (``sft``), text ``classification`` or
    ``tagging`` (token classification, e.g. named entities).

    Args:
        objective: sft: prompt/response pairs or chats, loss on the responses; classification: texts
            with labels, a linear head on the last token; tagging: texts with labelled character spans
            (or CoNLL files), a linear head on every token.
        model: the base model: models:/name/version, runs:/<run id>/model, an MLflow run id, or a
            directory holding model.safetensors and config.json. Default: the newest version of any
            model ``gptflow pretrain`` registered (gptflow-<preset>), named in the log.
        data: .jsonl, .json, .csv (gzip/zstd too) or .parquet. sft: {"prompt": ..., "response": ...}
            or {"messages": [{"role": ..., "content": ...}, ...]} per record; classification: text and
            label fields; tagging: {"text": ..., "spans": [[start, end, label], ...]} per record, or a
            CoNLL file (.conll, .iob, .bio: a word and its tag per line). Default: the objective's
            built-in demo, from the Python standard library's source (docstring → function; which
            standard-library package a function is from; the Python token kind of each span of a
            function).
        val_data: validation examples in the same format; default: data.val_fraction of
            ``data``, chosen by record hash.
        tokenizer: the base model's tokenizer.json, for a model directory without one beside or above
            it.
        config_file: a TOML or JSON file with [finetune], [train] and [sampling] tables of settings.
        overrides: finetune.*, train.* or sampling.* settings applied last: finetune.lora_rank=0 (a
            full fine-tune) or train.max_steps=300 on the command line, ``{"finetune.lora_rank": 0}``
            as a flow parameter.
        workspace: the artifact store and MLflow database: a folder, or an S3 prefix mirrored in
            $GPTFLOW_CACHE (default: $GPTFLOW_HOME or ./.gptflow).
        restart: fine-tune from step 0, deleting the checkpoints of an earlier attempt at these exact
            settings; without it, a fine-tuning that stopped early resumes from its latest checkpoint.
    """
    started = time.monotonic()
    hide_tracebacks_of_user_errors()
    # Bad input fails here, before a model is fetched.
    inputs = check_finetune(data, val_data, config_file, overrides)
    train_file, val_file = inputs.train_file, inputs.val_file
    workspace_dir = Workspace.resolve(workspace)
    if model is None:
        model, choice = default_base_model(workspace_dir)
        run_logger().info(choice)
    base = resolve_model(model, workspace_dir, tokenizer)
    settings = dataclasses.replace(inputs.settings,
                                   finetune=_with_max_length(inputs.settings.finetune, base.config.block_size))
    # A model fine-tuned before keeps its conversation format.
    template = base.chat_template or ChatTemplate()
    data_description = str(train_file) if train_file else DEMO_DESCRIPTIONS[objective]

    tags = {"gptflow.flow": "finetune", "gptflow.objective": objective}
    with pipeline_run(workspace_dir, "finetune", tags=tags) as run:
        run.log_params({
            "code_version": pipeline_code_version(),
            "objective": objective,
            "base_model": base.source,
            "base_weights_hash": base.weights_hash,
            "base_tokenizer_hash": base.tokenizer_hash,
            "data": data_description,
            "val_data": str(val_file or ""),
            **{f"model.{name}": value for name, value in dataclasses.asdict(base.config).items()},
            **settings.flatten(),
        })
        train_file = train_file or demo_data(objective, workspace_dir, run)
        prepared = prepare_data(objective, train_file, val_file, base, template, settings, workspace_dir, run)
        _log_dataset(run, objective, data, train_file, val_file, prepared)
        tuned = finetune_model(objective, base, template, prepared, settings, workspace_dir, run, restart)
        log_training_report(run, Path(tuned.report_dir))
        report = evaluate_finetuned(tuned, prepared, settings, workspace_dir, run)

    summary = _summary(objective, base, data_description, settings, run, prepared, tuned, report,
                       time.monotonic() - started)
    create_markdown_artifact(key="finetune-summary", markdown=summary.markdown(run.url),
                             description="Data, training, evaluation and the registered model of this run")
    end_log_of_deployment_run(summary.render(sample=False))
    return summary


def _log_dataset(run: PipelineRun, objective: str, data: str | None, train_file: Path, val_file: Path | None,
                 prepared: PreparedData) -> None:
    """The fine-tuning data as the run's MLflow dataset (the runs table's Dataset column, and the
    fine-tuned model's page): named after its file, its fingerprint's first eight characters as the digest."""
    run.log_dataset(
        name=source_label(data) if data else f"{objective} demo", digest=prepared.fingerprint[:8],
        sources=[str(path) for path in (train_file, val_file) if path is not None], context="training",
        profile={"fingerprint": prepared.fingerprint, "labels": len(prepared.labels),
                 **{f"{split}_examples": count for split, count in prepared.examples.items()}},
    )


def _summary(objective: str, base: ResolvedModel, data: str, settings: FinetuneSettings, run: PipelineRun,
             prepared: PreparedData, tuned: FinetunedModel, report: FinetuneReport,
             elapsed_s: float) -> FinetuneSummary:
    return FinetuneSummary(
        objective=objective,
        base_model=base.source,
        base_weights_hash=base.weights_hash,
        data=data,
        stages=dict(run.stage_statuses),
        examples=prepared.examples,
        truncated=sum(prepared.truncated.values()),
        skipped=prepared.skip_report().summary(),
        steps=tuned.steps,
        lora_rank=settings.finetune.lora_rank,
        trainable_parameters=tuned.trainable_parameters,
        total_parameters=tuned.total_parameters,
        initial_val_loss=tuned.initial_val_loss,
        final_val_loss=tuned.final_val_loss,
        metrics=report.metrics,
        registered_model=tuned.registered_model,
        **of_run(run, elapsed_s),
        samples=report.samples,
    )


def _with_max_length(config: FinetuneConfig, block_size: int) -> FinetuneConfig:
    """``config`` with ``max_length`` resolved against the base model's context."""
    if config.max_length is None:
        return dataclasses.replace(config, max_length=block_size)
    if config.max_length > block_size:
        raise ConfigError(f"finetune.max_length={config.max_length} exceeds the base model's context of {block_size} "
                          "tokens (its block_size): lower it, or leave it unset to use the whole context.")
    return config
