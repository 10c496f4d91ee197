"""The ``pretrain`` flow: ingest → tokenizer → tokenize → pretrain → evaluate, each stage cached."""

from __future__ import annotations

import dataclasses
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic.json_schema import SkipJsonSchema

from gptflow.data.config import IngestConfig
from gptflow.data.ingest import CorpusManifest, source_name
from gptflow.data.mixture import mixture_parts, split_weight
from gptflow.data.quality import filters_run, survival_summary
from gptflow.data.sources import BUILTIN_CORPUS
from gptflow.data.tokenize import TokenManifest
from gptflow.data.tokenizer import TokenizerArtifact
from gptflow.flows.checks import PretrainInputs, check_pretrain
from gptflow.flows.summaries import FlowSummary, end_log_of_deployment_run, model_cell, model_line, of_run, sample_lines
from gptflow.flows.user_errors import hide_tracebacks_of_user_errors
from gptflow.model.config import ModelConfig
from gptflow.model.memory import parameter_count
from gptflow.tasks.lineage import Lineage, data_delta
from gptflow.tasks.model_source import ResolvedModel, resolve_model
from gptflow.tasks.runtime.caching import pipeline_code_version
from gptflow.tasks.runtime.point_workers import GPUS_TAG
from gptflow.tasks.runtime.rendezvous import Rendezvous
from gptflow.tasks.runtime.unit_maps import UnitRunner
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.settings import DEFAULT_PRESET, PresetName, PretrainSettings
from gptflow.tasks.stages.eval_corpus import EVAL_CORPUS_BITS_PER_BYTE, EvalCorpusReport, score_eval_corpus
from gptflow.tasks.stages.evaluation import EvalReport, evaluate_model
from gptflow.tasks.stages.ingest import ingest
from gptflow.tasks.stages.tokenize import log_corpus_dataset, tokenize
from gptflow.tasks.stages.tokenizer import prepare_tokenizer
from gptflow.tasks.stages.training import InitialModel, train_model
from gptflow.tasks.stages.training_job import TrainedModel
from gptflow.tasks.sweep_plan import SWEEP_POINT_TAG, SweepMember
from gptflow.tasks.tracking.naming import run_name, source_label
from gptflow.tasks.tracking.progress import human_count, run_logger
from gptflow.tasks.tracking.registry import pretrained_model_name
from gptflow.tasks.tracking.run import MLFLOW_PARENT_RUN_TAG, PipelineRun, pipeline_run
from gptflow.tasks.tracking.training_reporter import log_training_report

MLFLOW_REFUSED_IN_PARAM_NAMES = re.compile(r"[^\w.\- :/]")
"""MLflow param names hold letters, digits, ``_ - . / :`` and spaces only."""
RUN_LINK_TAGS = ("gptflow.previous_run", "gptflow.continues_run")
"""The tags of a pretraining run whose value is another run's id."""
DATA_CHANGE_TAG = "gptflow.data_change"
"""On a run over a corpus an earlier run read, when its data changed since: what changed
(``1 file added, 12.3K tokens added``); ``gptflow.previous_run`` names that run."""


@dataclass
class PretrainSummary(FlowSummary):
    """What a user wants to read when the flow ends."""

    stages: dict[str, str]
    documents: int
    val_split: str
    """How val was formed (``_describe_val_split``)."""
    train_tokens: int
    val_tokens: int
    steps: int
    tokens_seen: int
    parameters: int
    """Of the trained model, embeddings included."""
    training: str
    """``from_scratch``, ``continued`` (from the run in ``continues_run``) or ``kept``."""
    continues_run: str | None
    resumed_from_step: int | None
    """The step from which this run's training resumed an interrupted attempt, if it did."""
    val_loss: float
    unigram_loss: float
    bits_per_byte: float
    perplexity: float
    trained_in_run: str
    """The MLflow run that trained the model: this one, or an earlier one whose training is reused."""
    registered_model: str
    """``name/version`` of the model in the MLflow registry (``pending`` while the run's outbox keeps it)."""
    samples: list[str] = field(default_factory=list)
    val_warning: str = ""
    """Why val is too small to measure the model by (``val_too_small``), if it is."""
    filtered: str = ""
    """How many prose documents survived each filter (``data.url_blocklist``, ``data.quality``), when set."""
    eval_corpus: EvalCorpusReport | None = None
    """The score on ``--eval-corpus``, when given."""

    def markdown(self, mlflow_run_url: str | None) -> str:
        """The flow run's Prefect artifact: what ran, what it produced, where to look next."""
        rows = [
            *(f"| stage: {name} | {status} |" for name, status in self.stages.items()),
            f"| documents | {self.documents:,} |",
            *([f"| quality filters | {self.filtered} |"] if self.filtered else []),
            f"| val | {self.val_split} |",
            *([f"| warning | {self.val_warning} |"] if self.val_warning else []),
            f"| train / val tokens | {self.train_tokens:,} / {self.val_tokens:,} |",
            f"| training | {self.steps} steps, {self.how_trained} |",
            f"| final val loss, eval/val_loss (nats/token) | {self.val_loss:.4f} "
            f"(unigram baseline {self.unigram_loss:.4f}) |",
            f"| perplexity | {self.perplexity:.2f} |",
            f"| bits per byte | {self.bits_per_byte:.4f} |",
            *([f"| eval corpus, {EVAL_CORPUS_BITS_PER_BYTE} | {self.eval_corpus.loss.bits_per_byte:.4f} "
               f"({' '.join(self.eval_corpus.corpus)}) |"] if self.eval_corpus else []),
            f"| registered model | {model_cell(self.registered_model, mlflow_run_url)} |",
        ]
        return self.table("pretrain", rows, mlflow_run_url)

    @property
    def how_trained(self) -> str:
        """``from scratch``, ``continued``, ``kept``; ``resumed from step N`` for a training from
        scratch that an interrupted attempt began."""
        if self.resumed_from_step is None:
            return self.training.replace("_", " ")
        resumed = f"resumed from step {self.resumed_from_step}"
        return resumed if self.training == "from_scratch" else f"{self.training}, {resumed}"

    def render(self, sample: bool = True) -> str:
        stages = ", ".join(f"{name} {status}" for name, status in self.stages.items())
        lines = [
            "",
            f"stages      {stages}",
            f"data        {human_count(self.documents)} documents, {human_count(self.train_tokens)} train "
            f"tokens, {human_count(self.val_tokens)} val tokens",
            *([f"filtered    {self.filtered}"] if self.filtered else []),
            f"val         {self.val_split}",
            *([f"warning     {self.val_warning}"] if self.val_warning else []),
            f"training    {self.steps} steps, {self.how_trained}"
            + (f" (continues run {self.continues_run})" if self.continues_run else ""),
            f"val loss    {self.val_loss:.3f} nats/token (final eval/val_loss; unigram baseline "
            f"{self.unigram_loss:.3f}), "
            f"perplexity {self.perplexity:.1f}, {self.bits_per_byte:.3f} bits/byte",
            *([f"eval corpus {self.eval_corpus.loss.bits_per_byte:.4f} bits/byte on "
               f"{' '.join(self.eval_corpus.corpus)} ({EVAL_CORPUS_BITS_PER_BYTE})"] if self.eval_corpus else []),
            model_line(self.registered_model, "gptflow generate --model {uri}, or gptflow finetune --model {uri}"),
        ]
        if sample and self.samples:
            lines.append(sample_lines(self.samples[0]))
        return "\n".join(lines + self.closing_lines())


def corpus_label(corpus: list[str] | None) -> str:
    """``stdlib``, ``corp`` or ``web +1``: what a run trained on, for its name."""
    corpus = corpus or [BUILTIN_CORPUS]
    first, _ = split_weight(corpus[0])
    label = "stdlib" if first == BUILTIN_CORPUS else source_label(first)
    return label + (f" +{len(corpus) - 1}" if len(corpus) > 1 else "")


def _flow_run_name() -> str:
    parameters = flow_run.parameters
    return run_name("pretrain", parameters.get("overrides"), parameters.get("preset", DEFAULT_PRESET),
                    corpus_label(parameters.get("corpus")))


@flow(name="pretrain", flow_run_name=_flow_run_name, log_prints=True)
def pretrain(
    corpus: list[str] | None = None,
    preset: PresetName = DEFAULT_PRESET,
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    workspace: str | None = None,
    restart: bool = False,
    retrain_tokenizer: bool = False,
    from_scratch: bool = False,
    ray: str | None = None,
    # Set by gptflow itself, from the command line's --nnodes options and by the sweep flow for each
    # point: SkipJsonSchema leaves them out of a deployment's parameter schema (its run form), and
    # the command line makes no option of them (flows.arguments).
    rendezvous: SkipJsonSchema[Rendezvous | None] = None,
    init_from: str | None = None,
    eval_corpus: list[str] | None = None,
    sweep: SkipJsonSchema[SweepMember | None] = None,
) -> PretrainSummary:
    """Train a GPT on ``corpus`` (default: the Python standard library's source).

    Args:
        corpus: files, folders or globs of .txt/.md/.py/.jsonl/.json/.parquet/.csv (gzip/zstd too),
            s3://bucket/prefix/ or s3:// globs (read in place), or hf:owner/name datasets. Default:
            builtin:python-stdlib, the Python standard library's source. A =WEIGHT suffix on every
            source (web/=0.7, code/=0.3) trains on a data mixture: each source's share of the training
            windows is its share of the weights.
        preset: a named configuration; ``gptflow presets`` lists them.
        config_file: a TOML or JSON file of settings, applied over the preset.
        overrides: settings applied last, each named by section and field: train.max_steps=200 on the
            command line, ``{"train.max_steps": 200}`` as a flow parameter.
        workspace: the artifact store and MLflow database: a folder, or an S3 prefix mirrored in
            $GPTFLOW_CACHE (default: $GPTFLOW_HOME or ./.gptflow).
        restart: train from step 0, deleting the checkpoints of an earlier training at these exact
            settings; without it, a training that stopped early resumes from its latest checkpoint.
        retrain_tokenizer: train a new tokenizer instead of keeping the one earlier runs over this
            corpus used (re-tokenizes every file).
        from_scratch: train a new model instead of continuing the latest compatible one of this
            corpus on the data added since.
        ray: run the data stages' per-file units on this Ray cluster (auto, HOST:PORT or
            ray://HOST:PORT; default $GPTFLOW_RAY_ADDRESS), each a Prefect task run; without it,
            they run in the stage's process.
        rendezvous: train on several machines: this one runs every stage and its share of the
            train.nproc ranks, the others join with ``gptflow train-node`` (``tasks.runtime.rendezvous``).
        init_from: continue pretraining this model (models:/name/version, a run id or a model folder,
            e.g. what ``gptflow import`` registered): its tokenizer, shape and weights; no tokenizer is
            trained, and the preset's model.* settings are not used (nor may be set).
        eval_corpus: also score the model on every document of this corpus, unfiltered, in bits per byte
            (``eval_corpus/bits_per_byte``): runs that read their corpus differently (data.quality) compare by it.
        sweep: set by the sweep flow for each of its points: the MLflow run nests under the sweep's.
    """
    started = time.monotonic()
    hide_tracebacks_of_user_errors()
    inputs = check_pretrain(corpus, preset, config_file, overrides, ray, rendezvous, init_from, eval_corpus)
    config, corpus, weighted = inputs.config, inputs.corpus, inputs.weighted
    workspace_dir = Workspace.resolve(workspace)
    base = None
    if init_from is not None:
        base = resolve_model(init_from, workspace_dir)
        base.require_text_model("--init-from")
        config = dataclasses.replace(config, model=base.config)
    units = UnitRunner(inputs.ray_address)

    lineage = Lineage.load(workspace_dir, weighted.sources)
    with pipeline_run(workspace_dir, "pretrain", tags=_run_tags(preset, sweep)) as run:
        run.log_params({
            "code_version": pipeline_code_version(),
            "preset": preset, "corpus": " ".join(source_name(spec, config.data) for spec in corpus), "restart": restart,
            "retrain_tokenizer": retrain_tokenizer, "from_scratch": from_scratch, "init_from": init_from or "",
            **config.flatten(),
            **_mixture_params(weighted.weights),
        })
        _relink_tokenizer_run(run, lineage)
        corpus_manifest, tokenizer, tokens = _data_stages(inputs, base, init_from, retrain_tokenizer, workspace_dir,
                                                          run, lineage, units)
        if val_warning := val_too_small(tokens.total_tokens("val"), config):
            run_logger().warning(f"pretrain: {val_warning}")
        # Validation stays on every source's val split, whatever the weights.
        named_by = {source_name(path, config.data): spec for path, spec in inputs.sources.named_by.items()}
        mixture = (mixture_parts(weighted.weights, named_by, tokens, config.model.block_size + 1)
                   if weighted.weights else None)
        trained = train_model(
            tokens, tokenizer, config.model, config.train, config.incremental, workspace_dir, run, lineage,
            registered_model_name=pretrained_model_name(preset), restart=restart, from_scratch=from_scratch,
            mixture=mixture,
            rendezvous=rendezvous,
            init_from=InitialModel(init_from, base.model_dir, base.weights_hash) if base is not None else None,
        )
        _drop_links_to_lost_runs(run)
        log_training_report(run, Path(trained.report_dir))
        report = evaluate_model(trained, tokens, tokenizer, config.eval, config.sampling, workspace_dir, run)
        heldout = (score_eval_corpus(eval_corpus, inputs.eval_sources, trained, tokenizer, config.data, config.tokenize,
                                     config.eval, workspace_dir, run, units) if eval_corpus else None)
        lineage.commit(workspace_dir, corpus_manifest.path, tokens.path, run.run_id)

    summary = _summary(run, config.data, corpus_manifest, tokens, trained, report, heldout, val_warning,
                       time.monotonic() - started)
    create_markdown_artifact(key="pretrain-summary", markdown=summary.markdown(run.url),
                             description="Stages, data, training and evaluation of this run")
    end_log_of_deployment_run(summary.render(sample=False))
    return summary


def _run_tags(preset: str, sweep: SweepMember | None) -> dict[str, str]:
    """The flow and preset; the sweep a point belongs to; the GPUs a sweep's worker gave it."""
    tags = {"gptflow.flow": "pretrain", "gptflow.preset": preset}
    if sweep is not None:
        tags |= {MLFLOW_PARENT_RUN_TAG: sweep.parent_run_id, SWEEP_POINT_TAG: sweep.point}
    if (devices := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        tags[GPUS_TAG] = devices
    return tags


def _relink_tokenizer_run(run: PipelineRun, lineage: Lineage) -> None:
    """After the MLflow store was lost and made anew, the tokenizer kept for this corpus comes from
    a run the store no longer holds: this run, which logs it again, stands for it from now on
    (``gptflow.tokenizer.origin`` names it). A run the store cannot be asked about (its server
    away) is left as named."""
    for entry in lineage.tokenizers.values():
        if run.store_holds_run(entry["mlflow_run_id"]) is False:
            run_logger().warning(f"mlflow: the tokenizer kept for this corpus came from run {entry['mlflow_run_id']}, "
                                 "which the MLflow store no longer holds; this run logs it and stands for it from "
                                 "now on")
            entry["mlflow_run_id"] = run.run_id


def _drop_links_to_lost_runs(run: PipelineRun) -> None:
    """Remove ``run``'s tags that name a run the MLflow store no longer holds (it was lost and made
    anew): the previous run of the corpus, the run whose model this one continues."""
    for key in RUN_LINK_TAGS:
        if key in run.tags and run.store_holds_run(run.tags[key]) is False:
            run.delete_tag(key)


def val_too_small(val_tokens: int, config: PretrainSettings) -> str:
    """Why a val split of ``val_tokens`` is too small to measure a model by: fewer tokens than one
    batch of validation windows; "" when it is not."""
    micro_batch, block = config.train.micro_batch_size, config.model.block_size
    if val_tokens >= micro_batch * block:
        return ""
    return (f"val holds {val_tokens:,} tokens, fewer than one batch of validation windows "
            f"(train.micro_batch_size x model.block_size = {micro_batch} x {block} = {micro_batch * block:,}), too "
            "few for its loss to measure the model. Give val more text: raise --set data.val_fraction=<fraction> "
            f"(now {config.data.val_fraction:g}), or lower --set data.segment_chars=<chars> (now "
            f"{config.data.segment_chars:,}) so that long documents are cut into more segments to draw val from.")


def _data_stages(inputs: PretrainInputs, base: ResolvedModel | None, init_from: str | None, retrain_tokenizer: bool,
                 workspace: Workspace, run: PipelineRun, lineage: Lineage, units: UnitRunner,
                 ) -> tuple[CorpusManifest, TokenizerArtifact, TokenManifest]:
    """Ingest the corpus, train its tokenizer (or take the ``base`` model's) and tokenize it; tag
    ``run`` with what changed since the lineage's last run."""
    config = inputs.config
    corpus_manifest = ingest(inputs.sources, config.data, workspace, run, units)
    run.log_params({"data_fingerprint": corpus_manifest.fingerprint})
    if base is None:
        tokenizer = prepare_tokenizer(corpus_manifest, config.tokenizer, workspace, run, lineage, units,
                                      retrain_tokenizer)
    else:
        tokenizer = base.tokenizer
        run.log_params({"tokenizer_hash": tokenizer.hash})
        run.set_tags({"gptflow.tokenizer.origin": f"of {init_from}"})
    tokens = tokenize(corpus_manifest, tokenizer, config.tokenize, workspace, run, units)
    log_corpus_dataset(run, [source_name(spec, config.data) for spec in inputs.weighted.sources], corpus_manifest,
                       tokens, context="training")
    delta = data_delta(lineage.previous_corpus(workspace.artifacts), corpus_manifest,
                       lineage.previous_tokens(workspace.artifacts), tokens)
    if delta is not None and any(delta.values()):
        run.set_tags({DATA_CHANGE_TAG: describe_delta(delta), "gptflow.previous_run": lineage.last_mlflow_run_id})
    return corpus_manifest, tokenizer, tokens


def describe_delta(delta: dict[str, int]) -> str:
    """``tasks.lineage.data_delta``'s counts as the ``DATA_CHANGE_TAG`` reads, leaving out what did not change."""
    changes = [(delta[f"files_{change}"], change) for change in ("added", "changed", "removed")
               if delta[f"files_{change}"]]
    # "1 file added, 2 changed": the first count says what it counts.
    files = [f"{count} {('file' if count == 1 else 'files') + ' ' if index == 0 else ''}{change}"
             for index, (count, change) in enumerate(changes)]
    tokens = [f"{human_count(delta['tokens_added'])} tokens added"] if delta["tokens_added"] else []
    return ", ".join(files + tokens)


def _summary(run: PipelineRun, data: IngestConfig, corpus_manifest: CorpusManifest, tokens: TokenManifest,
             trained: TrainedModel, report: EvalReport, heldout: EvalCorpusReport | None, val_warning: str,
             elapsed_s: float) -> PretrainSummary:
    return PretrainSummary(
        stages=dict(run.stage_statuses),
        documents=corpus_manifest.total_documents,
        filtered=survival_summary(data, corpus_manifest.totals["quality"]) if filters_run(data) else "",
        val_split=_describe_val_split(corpus_manifest, data),
        train_tokens=tokens.total_tokens("train"),
        val_tokens=tokens.total_tokens("val"),
        steps=trained.steps,
        tokens_seen=trained.tokens_seen,
        parameters=parameter_count(ModelConfig(**trained.model_config)),
        training=run.tags["gptflow.training"],
        continues_run=run.tags.get("gptflow.continues_run"),
        resumed_from_step=_resumed_from_step(run),
        val_loss=report.val_loss,
        unigram_loss=report.unigram_loss,
        bits_per_byte=report.bits_per_byte,
        perplexity=report.perplexity,
        trained_in_run=trained.trained_in_mlflow_run,
        registered_model=trained.registered_model,
        **of_run(run, elapsed_s),
        samples=report.samples,
        val_warning=val_warning,
        eval_corpus=heldout,
    )


RESUMED_FROM_STEP_TAG = "gptflow.resumed_from_step"
"""The tag a training job sets on its run when it resumed an interrupted attempt (``tasks.stages.training_job``)."""


def _resumed_from_step(run: PipelineRun) -> int | None:
    """The step from which this run's training resumed an interrupted attempt, as the training job
    (in this process or a torchrun rank) tagged the run; None for a training that ran whole, or was
    cached (it reuses a model, not an attempt)."""
    if run.stage_statuses["pretrain"] != "executed":
        return None
    step = run.stored_tag(RESUMED_FROM_STEP_TAG)
    return None if step is None else int(step)


def _mixture_params(weights: dict[str, float]) -> dict[str, float]:
    """``data.mixture.<source>``: each weight as given, its source by its short label (``web`` for
    ``data/web/``), or whole where two labels coincide; characters MLflow refuses in a param name
    become ``_``."""
    labels = [source_label(source) for source in weights]
    names = [label if labels.count(label) == 1 else source for label, source in zip(labels, weights)]
    return {"data.mixture." + MLFLOW_REFUSED_IN_PARAM_NAMES.sub("_", name): weight
            for name, weight in zip(names, weights.values())}


def _describe_val_split(manifest: CorpusManifest, config: IngestConfig) -> str:
    """One line on how val was formed, e.g. ``5% of documents and of segments of documents over
    4,096 chars, by hash (book.txt cut into 73 segments)``."""
    share = f"{config.val_fraction * 100:g}%"
    totals = manifest.totals
    if not totals["cut_documents"]:
        return f"{share} of documents, by hash"
    if totals["cut_documents"] == 1:
        [unit] = [unit for unit in manifest.units if unit.cut_documents]
        name = Path(unit.source).name
        cut = f"{name if unit.documents == 1 else f'a document of {name}'} cut into {unit.cut_segments:,} segments"
    else:
        cut = f"{totals['cut_documents']:,} documents cut into {totals['cut_segments']:,} segments"
    return f"{share} of documents and of segments of documents over {config.segment_chars:,} chars, by hash ({cut})"

