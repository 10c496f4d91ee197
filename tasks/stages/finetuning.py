"""Fine-tuning stages: demo data, prepare (records → token examples), finetune (train, then log
and register the MLflow model), evaluate (validation metrics and plots, or sample answers).

Each stage runs through ``tasks.runtime.caching.run_stage``. Keys: the demo on the interpreter and the
demo code; prepare on the data files' contents, the tokenizer, the chat template and the data
settings; finetune on the base weights, the prepared data and the training settings; evaluate on
the fine-tuned weights, the prepared data and the sampling settings. So the same base model, data
and settings are a cache hit, and changing only the learning rate reprepares nothing.

The base is any model ``tasks.model_source.resolve_model`` resolves (default: the newest
pretrained one, ``tasks.tracking.registry.default_base_model``), tuned with its own tokenizer and
chat template. The finetune task runs a ``tasks.stages.finetune_job.FinetuneJob`` in its process or on
``train.nproc`` torchrun ranks of one machine (``train.parallelism=fsdp`` shards the frozen base
with the adapters), with checkpoints under ``store/finetunes/<key>/checkpoints/`` that a rerun of
the key resumes. It logs the objective's MLflow model from code (``MLFLOW_MODEL_MODULES``, its
module part of the key) with ``final/``, the tokenizer, and the chat template or the
``classifier/`` head, and registers it as ``REGISTERED_MODELS[objective]``, described by
``tasks.tracking.registry.finetuned_description``; a cached run tags the run and version that did,
and shows that run's curves and model (``tasks.tracking.training_reporter.show_reused_training``).
The layout is a pretrained model's, so a fine-tuned model is itself a model source (evaluate it,
export it, tune it again). Besides the settings, the run's params hold the data counts
(``dataset.*``) and the parameter counts; its metrics are the loop's ``train/*``, ``val/loss``
(step 0 = the base model), ``val/accuracy`` and the evaluation's ``eval/*``, which are the model's
metrics too (its MLflow page shows them).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import task

from gptflow.data.chat import CHAT_TEMPLATE_FILE, ChatTemplate
from gptflow.data.commits import read_contents_hash, write_report
from gptflow.data.finetune_data import PREPARED_FILE, PreparedData, PreparedSplit, prepare_examples, read_split
from gptflow.data.finetune_demo import write_demo
from gptflow.data.hashing import hash_file, hash_json
from gptflow.data.sources import builtin_corpus_root
from gptflow.data.store import ArtifactStore
from gptflow.data.tokenizer import PAD_TOKEN, TOKENIZER_FILE, load_tokenizer
from gptflow.model.checkpoint import load_model
from gptflow.model.classifier import load_classifier
from gptflow.model.config import SamplingConfig, TrainConfig
from gptflow.model.device import resolve_device
from gptflow.model.finetune import FinetuneOutcome, generate_response, score_examples
from gptflow.model.finetune_config import FinetuneConfig
from gptflow.model.gpt import GPT
from gptflow.tasks.model_source import ResolvedModel
from gptflow.tasks.runtime.caching import directory_is_complete, run_stage, stage_key
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.settings import FinetuneSettings, build_config
from gptflow.tasks.stages.classification import classify_and_report, most_common_label
from gptflow.tasks.stages.finetune_job import FinetuneJob
from gptflow.tasks.stages.tagging import summary_line as tagging_summary
from gptflow.tasks.stages.tagging import tag_and_report
from gptflow.tasks.stages.training_job import REPORT_DIR
from gptflow.tasks.tracking.progress import human_count, run_logger
from gptflow.tasks.tracking.registry import REGISTERED_MODEL_TAG, finetuned_description, version_holding
from gptflow.tasks.tracking.run import PipelineRun
from gptflow.tasks.tracking.training_reporter import show_reused_training

REGISTERED_MODELS = {"sft": "gptflow-finetune-sft", "classification": "gptflow-finetune-classification",
                     "tagging": "gptflow-finetune-tagging"}
"""The model registry name of each objective's fine-tuned models."""
MLFLOW_MODEL_MODULES = {"sft": "gptflow.tasks.mlflow_models.chat_generator", "classification": "gptflow.tasks.mlflow_models.text_classifier",
                        "tagging": "gptflow.tasks.mlflow_models.span_tagger"}
"""Each objective's MLflow model from code: run from its file when the model loads, never imported here."""
TOKENIZER_DIR = "tokenizer"


# --- demo data ------------------------------------------------------------------------------


@task(name="write-demo-data")
def write_demo_task(objective: str, out_dir: str, artifacts: ArtifactStore) -> str:
    with artifacts.commit(Path(out_dir)) as tmp:
        count = write_demo(objective, tmp / f"{objective}.jsonl")
    run_logger().info(f"demo-data: {count:,} {objective} records extracted from the standard library's source")
    return str(Path(out_dir) / f"{objective}.jsonl")


def demo_data(objective: str, workspace: Workspace, run: PipelineRun) -> Path:
    """The built-in demo of ``objective`` as a JSONL file in the store (see ``data.finetune_demo``)."""
    key = stage_key("finetune-demo", config={"objective": objective, "python": sys.version,
                                             "stdlib": str(builtin_corpus_root())},
                    modules=(__name__,), inputs={})
    outcome = run_stage(write_demo_task, key=key, workspace=workspace,
                        is_valid=lambda path, artifacts: artifacts.is_complete(Path(path).parent),
                        objective=objective, out_dir=str(workspace.store / "finetune-demo" / key),
                        artifacts=workspace.artifacts)
    run.record_stage("demo-data", outcome.status)
    return Path(outcome.result)


# --- prepare --------------------------------------------------------------------------------


@task(name="prepare-finetune-data")
def prepare_task(objective: str, train_file: str, val_file: str | None, tokenizer_file: str,
                 template: ChatTemplate, settings: dict[str, Any], out_dir: str, artifacts: ArtifactStore) -> PreparedData:
    return prepare_examples(objective, Path(train_file), Path(val_file) if val_file else None,
                            Path(tokenizer_file), Path(out_dir), template=template, artifacts=artifacts, **settings)


def prepare_data(
    objective: str, train_file: Path, val_file: Path | None, base: ResolvedModel, template: ChatTemplate,
    settings: FinetuneSettings, workspace: Workspace, run: PipelineRun,
) -> PreparedData:
    """The ``prepare`` stage: tokenized train and val examples; logs their counts and skips."""
    data_settings = settings.data_settings(objective)
    key = stage_key(
        "finetune-prepare",
        config={"objective": objective, **data_settings,
                "template": dataclasses.asdict(template) if objective == "sft" else None},
        modules=(__name__,),
        inputs={"train": hash_file(train_file), "val": hash_file(val_file) if val_file else None,
                "tokenizer": base.tokenizer_hash},
    )
    outcome = run_stage(
        prepare_task, key=key, workspace=workspace, is_valid=directory_is_complete,
        objective=objective, train_file=str(train_file), val_file=str(val_file) if val_file else None,
        tokenizer_file=str(base.tokenizer_file), template=template, settings=data_settings,
        out_dir=str(workspace.store / "finetune-data" / key), artifacts=workspace.artifacts,
    )
    prepared = outcome.result
    run.record_stage("prepare", outcome.status)
    skips = prepared.skip_report()
    # Counts, not measurements over time: params, so the run's charts start with its loss curves.
    run.log_params({
        **{f"dataset.{split}_examples": count for split, count in prepared.examples.items()},
        **{f"dataset.{split}_tokens": count for split, count in prepared.tokens.items()},
        **{f"dataset.{split}_truncated": count for split, count in prepared.truncated.items()},
        "dataset.skipped": skips.total,
        "data_fingerprint": prepared.fingerprint,
    })
    if objective == "tagging":
        run.log_params({f"dataset.{split}_{name}_spans" if name != "total" else f"dataset.{split}_spans": count
                        for split, counts in prepared.spans.items() for name, count in counts.items()})
    run.log_artifact(Path(prepared.directory) / PREPARED_FILE, "data")
    logger = run_logger()
    logger.info(f"prepare: {prepared.examples['train']:,} train / {prepared.examples['val']:,} val examples, "
                f"{human_count(prepared.tokens['train'])} train tokens"
                + (f"; labels {', '.join(prepared.labels)}" if prepared.labels else ""))
    misaligned = sum(counts["misaligned"] for counts in prepared.spans.values())
    if misaligned:
        logger.warning(f"prepare: {misaligned:,} spans begin or end inside a BPE token; they are trained and "
                       "scored at the edges of the tokens they overlap (data/prepared.json counts them per split)")
    truncated = sum(prepared.truncated.values())
    if truncated:
        logger.warning(f"prepare: {truncated:,} examples longer than max_length={prepared.max_length} tokens were "
                       "truncated (finetune.overlong=skip leaves them out instead)")
    if skips.total:
        logger.warning(f"prepare: {skips.summary()}")
    return prepared


# --- finetune -------------------------------------------------------------------------------


@dataclass
class FinetunedModel(FinetuneOutcome):
    run_dir: str
    model_dir: str
    """The fine-tuned GPT, LoRA merged: ``model.checkpoint.load_model`` loads it."""
    classifier_dir: str | None
    """Classification and tagging: the head and its labels."""
    tokenizer_dir: str
    """``tokenizer.json``, and ``chat_template.json`` for sft."""
    report_dir: str
    """``history.json`` + ``loss_curve.png``."""
    weights_hash: str
    """Content hash of the model (and head): the input key of its evaluation."""
    objective: str
    trained_in_mlflow_run: str
    registered_model: str
    """``name/version`` in the MLflow model registry; the version is ``pending`` while the run's
    outbox keeps the model."""


@task(name="finetune-model")
def train_task(
    objective: str, base: ResolvedModel, template: ChatTemplate, prepared: PreparedData, config: FinetuneConfig,
    train: TrainConfig, run_dir: str, workspace_root: str, tracking_uri: str, mlflow_run_id: str, restart: bool,
) -> FinetunedModel:
    run_dir_path = Path(run_dir)
    job = FinetuneJob(
        objective=objective, base_dir=str(base.model_dir), labels=prepared.labels,
        finetune_config=dataclasses.asdict(config), train_config=dataclasses.asdict(train),
        prepared_dir=prepared.directory, pad_id=base.tokenizer.pad_id, max_length=prepared.max_length,
        run_dir=run_dir, workspace=workspace_root, tracking_uri=tracking_uri, mlflow_run_id=mlflow_run_id,
        restart=restart,
    )
    result = job.run(prefect_progress=True) if train.nproc == 1 else job.run_with_torchrun(train.nproc)
    with Workspace(Path(workspace_root)).artifacts.replace(run_dir_path / TOKENIZER_DIR) as tokenizer_dir:
        shutil.copyfile(base.tokenizer_file, tokenizer_dir / TOKENIZER_FILE)
        if objective == "sft":
            template.save(tokenizer_dir)
    weights_hash = read_contents_hash(result.model_dir)
    if result.classifier_dir:
        weights_hash = hash_json([weights_hash, read_contents_hash(result.classifier_dir)])
    run = PipelineRun.attach(workspace_root, tracking_uri, mlflow_run_id)
    description = finetuned_description(objective, base.source, prepared.labels, config.lora_rank, result.steps)
    registered_model = _log_model(run, objective, result.model_dir, result.classifier_dir, run_dir_path / TOKENIZER_DIR,
                                  weights_hash, description)
    return FinetunedModel(
        run_dir=run_dir, model_dir=str(result.model_dir),
        classifier_dir=str(result.classifier_dir) if result.classifier_dir else None,
        tokenizer_dir=str(run_dir_path / TOKENIZER_DIR), report_dir=str(run_dir_path / REPORT_DIR),
        weights_hash=weights_hash, objective=objective, trained_in_mlflow_run=mlflow_run_id, **result.outcome(),
        registered_model=registered_model,
    )


def finetune_model(
    objective: str, base: ResolvedModel, template: ChatTemplate, prepared: PreparedData, settings: FinetuneSettings,
    workspace: Workspace, run: PipelineRun, restart: bool = False,
) -> FinetunedModel:
    """The ``finetune`` stage: the fine-tuned model, logged as an MLflow pyfunc model and
    registered by the run that trained it (a cached run tags that run and version). A training
    of this key that stopped early resumes from its latest checkpoint; ``restart`` trains it
    again from step 0."""
    key = stage_key(
        "finetune",
        config={"objective": objective, "lora": settings.finetune.lora_settings(),
                "train": settings.train.trained_settings()},
        # The logged MLflow model runs its module's code: a change to it must log a new model.
        modules=(__name__, MLFLOW_MODEL_MODULES[objective]),
        inputs={"base": base.weights_hash, "data": prepared.fingerprint},
    )
    outcome = run_stage(
        train_task, key=key, workspace=workspace,
        is_valid=lambda tuned, artifacts: all(artifacts.is_complete(Path(path)) for path in
                                   (tuned.model_dir, tuned.tokenizer_dir, tuned.report_dir, tuned.classifier_dir)
                                   if path is not None),
        objective=objective, base=base, template=template, prepared=prepared, config=settings.finetune,
        train=settings.train, run_dir=str(workspace.store / "finetunes" / key),
        workspace_root=str(workspace.root), tracking_uri=workspace.tracking_uri, mlflow_run_id=run.run_id,
        restart=restart, recompute=restart,
    )
    tuned = outcome.result
    run.record_stage("finetune", outcome.status)
    if outcome.status == "cached":
        description = finetuned_description(objective, base.source, prepared.labels, settings.finetune.lora_rank,
                                            tuned.steps)
        tuned = _registered_in_tracking_store(tuned, run, description)
    run.set_tags({REGISTERED_MODEL_TAG: tuned.registered_model})
    if tuned.trained_in_mlflow_run != run.run_id:
        run.set_tags({"gptflow.trained_in_run": tuned.trained_in_mlflow_run})
        show_reused_training(run, tuned.trained_in_mlflow_run, tuned.registered_model, Path(tuned.report_dir))
    run.log_params({"model.trainable_parameters": tuned.trainable_parameters,
                    "model.total_parameters": tuned.total_parameters})
    return tuned


def _registered_in_tracking_store(tuned: FinetunedModel, run: PipelineRun, description: str) -> FinetunedModel:
    """``tuned`` with the run and registered version the tracking store holds it under (see
    ``tasks.tracking.registry.version_holding``: a lost model is logged and registered again by
    ``run``, as ``description`` says)."""
    registered, trained_in = version_holding(
        run, REGISTERED_MODELS[tuned.objective], tuned.weights_hash, tuned.registered_model, tuned.trained_in_mlflow_run,
        log_again=lambda: _log_model(run, tuned.objective, Path(tuned.model_dir),
                                     Path(tuned.classifier_dir) if tuned.classifier_dir else None,
                                     Path(tuned.tokenizer_dir), tuned.weights_hash, description),
    )
    return dataclasses.replace(tuned, registered_model=registered, trained_in_mlflow_run=trained_in)


def _log_model(run: PipelineRun, objective: str, model_dir: Path, classifier_dir: Path | None,
               tokenizer_dir: Path, weights_hash: str, description: str) -> str:
    artifacts = {"model": model_dir, "tokenizer": tokenizer_dir / TOKENIZER_FILE}
    if objective == "sft":
        artifacts["chat_template"] = tokenizer_dir / CHAT_TEMPLATE_FILE
        # The answers' default sampling: the finetune flow's defaults, not this run's (which would
        # make the cached model depend on settings its key leaves out).
        sampling = build_config(FinetuneSettings).sampling
        example = (["Write a function that adds two numbers."], ["def add(a, b):"], dataclasses.asdict(sampling))
    elif objective == "tagging":
        artifacts["classifier"] = classifier_dir
        example = (["return x"], [[{"start": 0, "end": 6, "label": "keyword", "text": "return"},
                                   {"start": 7, "end": 8, "label": "name", "text": "x"}]], None)
    else:
        artifacts["classifier"] = classifier_dir
        example = (["def parse(self, text):"], ["email"], None)
    return run.log_pyfunc_model(MLFLOW_MODEL_MODULES[objective], artifacts, *example, REGISTERED_MODELS[objective],
                                weights_hash, description)


# --- evaluate -------------------------------------------------------------------------------


@dataclass
class FinetuneReport:
    directory: str
    """``report.json``, and ``samples.md`` (sft) or ``confusion_matrix.png`` + ``predictions.jsonl``."""
    metrics: dict[str, float]
    samples: list[dict[str, str]] = field(default_factory=list)
    """sft: ``location``, ``prompt``, ``reference`` and ``response`` of the first validation examples."""
    classes: dict[str, Any] = field(default_factory=dict)
    """classification: ``labels``, per-class ``f1``, ``confusion`` (rows true, columns predicted)
    and the train split's ``majority_label``; tagging: per-label scores and the token confusion
    matrix (``tasks.stages.tagging.tag_and_report``)."""


@task(name="evaluate-finetuned")
def evaluate_task(tuned: FinetunedModel, prepared: PreparedData, samples: int, sampling: SamplingConfig,
                  out_dir: str, artifacts: ArtifactStore) -> FinetuneReport:
    device = resolve_device("auto")
    tokenizer = load_tokenizer(Path(tuned.tokenizer_dir) / TOKENIZER_FILE)
    pad_id = tokenizer.token_to_id(PAD_TOKEN)
    val = read_split(Path(prepared.directory), "val")
    with artifacts.replace(Path(out_dir)) as directory:
        if tuned.objective == "classification":
            classifier, _ = load_classifier(Path(tuned.model_dir), Path(tuned.classifier_dir), device)
            # The baseline guesses what a model that learned only the train split's label counts would.
            majority = most_common_label(prepared.label_counts["train"])
            metrics, classes = classify_and_report(classifier, val, "val", prepared.labels, majority, pad_id, directory)
            report = FinetuneReport(directory=out_dir, metrics=metrics, classes=classes)
        elif tuned.objective == "tagging":
            tagger, _ = load_classifier(Path(tuned.model_dir), Path(tuned.classifier_dir), device)
            metrics, labels = tag_and_report(tagger, val, "val", pad_id, directory)
            report = FinetuneReport(directory=out_dir, metrics=metrics, classes=labels)
        else:
            gpt = load_model(Path(tuned.model_dir), device)
            scores = score_examples(gpt, val, pad_id)
            template = ChatTemplate.load(Path(tuned.tokenizer_dir))
            answers = _sample_answers(gpt, tokenizer, template, val, samples, sampling)
            report = FinetuneReport(directory=out_dir, samples=answers, metrics={
                "eval/val_loss": scores.loss, "eval/base_val_loss": tuned.initial_val_loss,
                "eval/val_examples": len(val.input_ids), "eval/val_response_tokens": prepared.trained_tokens["val"],
            })
            (directory / "samples.md").write_text(_samples_markdown(answers))
        write_report(directory, report)
    return report


def evaluate_finetuned(
    tuned: FinetunedModel, prepared: PreparedData, settings: FinetuneSettings, workspace: Workspace, run: PipelineRun
) -> FinetuneReport:
    """The ``evaluate`` stage, on the saved (merged) model: val loss and sample answers (sft),
    accuracy, macro-F1, majority baseline and confusion matrix (classification), or span
    precision, recall and F1 and a token confusion matrix (tagging)."""
    key = stage_key(
        "finetune-evaluate",
        config={"objective": tuned.objective,
                **({"samples": settings.finetune.samples, "sampling": dataclasses.asdict(settings.sampling)}
                   if tuned.objective == "sft" else {})},
        modules=(__name__,),
        inputs={"model": tuned.weights_hash, "data": prepared.fingerprint},
    )
    outcome = run_stage(
        evaluate_task, key=key, workspace=workspace, is_valid=directory_is_complete,
        tuned=tuned, prepared=prepared, samples=settings.finetune.samples, sampling=settings.sampling,
        out_dir=str(workspace.store / "finetune-eval" / key), artifacts=workspace.artifacts,
    )
    report = outcome.result
    run.record_stage("evaluate", outcome.status)
    run.log_metrics(report.metrics, step=tuned.steps, model_of_run=tuned.trained_in_mlflow_run)
    run.log_artifact(Path(report.directory), "eval")
    metrics = report.metrics
    if tuned.objective == "classification":
        run_logger().info(f"evaluate: accuracy {metrics['eval/accuracy']:.3f}, macro-F1 {metrics['eval/macro_f1']:.3f} "
                          f"(majority baseline {metrics['eval/majority_accuracy']:.3f}) on "
                          f"{int(metrics['eval/val_examples']):,} val examples")
    elif tuned.objective == "tagging":
        run_logger().info(f"evaluate: {tagging_summary(metrics, 'val')} of {int(metrics['eval/val_examples']):,} val "
                          "examples")
    else:
        run_logger().info(f"evaluate: val loss {metrics['eval/val_loss']:.3f} nats/response token "
                          f"(base model {metrics['eval/base_val_loss']:.3f})")
    return report


def _sample_answers(gpt: GPT, tokenizer: Any, template: ChatTemplate, val: PreparedSplit, samples: int,
                    sampling: SamplingConfig) -> list[dict[str, str]]:
    """The fine-tuned model's answer to each of the first ``samples`` val prompts, beside
    the reference: the prompt is the example's tokens up to its first trained one (its assistant
    header included), exactly as in training."""
    end_id = template.token_id(tokenizer, template.end_token)
    answers = []
    for index in range(min(samples, len(val.input_ids))):
        ids, mask = val.input_ids[index].tolist(), val.loss_mask[index].tolist()
        start = mask.index(True)
        end = mask.index(False, start) if False in mask[start:] else len(mask)
        reference = [token for token in ids[start:end] if token != end_id]
        response = generate_response(gpt, ids[:start], end_id, dataclasses.replace(sampling, seed=sampling.seed + index),
                                     tokenizer.get_vocab_size())
        answers.append({"location": val.locations[index], "prompt": tokenizer.decode(ids[:start]),
                        "reference": tokenizer.decode(reference), "response": tokenizer.decode(response)})
    return answers


def _samples_markdown(samples: list[dict[str, str]]) -> str:
    sections = [
        f"## {sample['location']}\n\n### Prompt\n\n```\n{sample['prompt']}\n```\n\n### Reference\n\n"
        f"```\n{sample['reference']}\n```\n\n### Fine-tuned model\n\n```\n{sample['response']}\n```\n"
        for sample in samples
    ]
    return "# Sample answers on validation prompts\n\n" + "\n".join(sections)
