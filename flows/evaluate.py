"""The ``evaluate`` flow: a trained gptflow model (MLflow model URI, run id or directory) scored on
a corpus split (loss, perplexity, bits per byte), on a multiple-choice file (zero-shot accuracy)
and by sample generations, or, for a fine-tuned classifier, on a labelled file (accuracy,
macro-F1, confusion matrix), for a fine-tuned tagger on a file of texts and spans (span
precision, recall and F1, token confusion matrix); each stage cached on the model's weights hash."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from gptflow.data.hashing import hash_file
from gptflow.data.ingest import source_name
from gptflow.flows.arguments import NonNegativeInt, PositiveInt
from gptflow.flows.checks import EvaluateInputs, check_evaluate
from gptflow.flows.summaries import FlowSummary, end_log_of_deployment_run, of_run, sample_lines
from gptflow.flows.user_errors import hide_tracebacks_of_user_errors
from gptflow.tasks.model_source import ResolvedModel, resolve_model
from gptflow.tasks.runtime.caching import pipeline_code_version
from gptflow.tasks.runtime.unit_maps import UnitRunner
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.settings import EvalSplit
from gptflow.tasks.stages.classification import ClassificationReport, score_classifier
from gptflow.tasks.stages.evaluation import LossReport, sample_model, samples_markdown, score_loss
from gptflow.tasks.stages.ingest import ingest
from gptflow.tasks.stages.lm_eval import HarnessReport, HarnessSettings, run_harness
from gptflow.tasks.stages.multiple_choice import MultipleChoiceReport, score_multiple_choice
from gptflow.tasks.stages.tagging import TaggingReport, score_tagger
from gptflow.tasks.stages.tagging import summary_line as tagging_summary
from gptflow.tasks.stages.tokenize import log_corpus_dataset, tokenize
from gptflow.tasks.tracking.naming import run_name, source_label
from gptflow.tasks.tracking.run import PipelineRun, pipeline_run

ACC_NORM_DEFINITION = (
    "lm-evaluation-harness multiple_choice scoring: each ending scored as the continuation ' ' + ending; "
    "acc = argmax of summed log-probability; acc_norm = argmax of it divided by the ending's length in "
    "characters (lm-eval's acc_norm); acc_bytes = the same per UTF-8 byte (lm-eval's acc_bytes)"
)


@dataclass
class EvaluateSummary(FlowSummary):
    """What one evaluate run measured; ``report()`` is its ``eval/report.json``."""

    model: str
    weights_hash: str
    tokenizer_hash: str
    stages: dict[str, str]
    corpus: list[str] | None
    data_fingerprint: str | None
    loss: LossReport | None
    multiple_choice_file: str | None
    multiple_choice: MultipleChoiceReport | None
    classification_file: str | None
    classification: ClassificationReport | None
    tagging_file: str | None
    tagging: TaggingReport | None
    lm_eval: HarnessReport | None
    prompts: list[str]
    samples: list[str]

    def metrics(self) -> dict[str, float]:
        return {
            **(self.loss.metrics() if self.loss else {}),
            **(self.multiple_choice.metrics() if self.multiple_choice else {}),
            **(self.classification.metrics if self.classification else {}),
            **(self.tagging.metrics if self.tagging else {}),
            **(self.lm_eval.metrics if self.lm_eval else {}),
        }

    def report(self) -> dict[str, Any]:
        loss = self.loss and {"corpus": self.corpus, "data_fingerprint": self.data_fingerprint, **asdict(self.loss)}
        multiple_choice = self.multiple_choice and {
            "file": self.multiple_choice_file,
            **{name: value for name, value in asdict(self.multiple_choice).items() if name != "directory"},
            "scoring": ACC_NORM_DEFINITION,
        }
        classification = self.classification and {
            "file": self.classification_file, **self.classification.classes, "skipped": self.classification.skipped,
        }
        tagging = self.tagging and {"file": self.tagging_file, **self.tagging.labels, "skipped": self.tagging.skipped}
        return {
            "model": {"source": self.model, "weights_hash": self.weights_hash, "tokenizer_hash": self.tokenizer_hash},
            "loss": loss,
            "multiple_choice": multiple_choice,
            "classification": classification,
            "tagging": tagging,
            "samples": [{"prompt": prompt, "text": text} for prompt, text in zip(self.prompts, self.samples)],
            "metrics": self.metrics(),
            "stages": self.stages,
            "mlflow_run_id": self.mlflow_run_id,
        }

    def markdown(self, mlflow_run_url: str | None) -> str:
        """The flow run's Prefect artifact: one row per metric, then where to look next."""
        rows = [
            f"| model | `{self.model}` (weights {self.weights_hash[:12]}) |",
            *(f"| stage: {name} | {status} |" for name, status in self.stages.items()),
            *(f"| {name} | {value:.4f} |" if isinstance(value, float) else f"| {name} | {value:,} |"
              for name, value in self.metrics().items()),
        ]
        return self.table("evaluate", rows, mlflow_run_url)

    def render(self, sample: bool = True) -> str:
        lines = ["", f"stages      {', '.join(f'{name} {status}' for name, status in self.stages.items())}"]
        if self.loss:
            baseline = f" (unigram baseline {self.loss.unigram_loss:.3f})" if self.loss.unigram_loss is not None else ""
            lines.append(
                f"{self.loss.split + ' loss':<12}{self.loss.loss:.3f} nats/token{baseline}, perplexity "
                f"{self.loss.perplexity:.1f}, {self.loss.bits_per_byte:.3f} bits/byte over {self.loss.tokens:,} tokens"
            )
        if self.multiple_choice:
            report = self.multiple_choice
            truncated = f"; {report.truncated} contexts truncated" if report.truncated else ""
            lines.append(
                f"choice      acc {report.acc:.4f}, acc_norm {report.acc_norm:.4f} on {report.examples:,} examples "
                f"of {self.multiple_choice_file}{truncated}"
            )
        if self.lm_eval:
            lines.append("lm_eval     " + ", ".join(f"{name.removeprefix('lm_eval/')} {value:.4f}"
                                                      for name, value in sorted(self.lm_eval.metrics.items())))
        if self.classification:
            metrics = self.classification.metrics
            lines.append(
                f"classify    accuracy {metrics['eval/accuracy']:.4f}, macro-F1 {metrics['eval/macro_f1']:.4f} "
                f"(majority baseline {metrics['eval/majority_accuracy']:.4f}) on {int(metrics['eval/eval_examples']):,} "
                f"examples of {self.classification_file}; confusion matrix in the run's eval/classification/"
            )
        if self.tagging:
            lines.append(f"tagging     {tagging_summary(self.tagging.metrics, 'eval')} of {self.tagging_file}; "
                         "per label and the token confusion matrix in the run's eval/tagging/")
        if sample and self.samples:
            lines.append(sample_lines(self.samples[0]))
        return "\n".join(lines + self.closing_lines())


def _flow_run_name() -> str:
    """``evaluate gptflow-cpu/1 val:texts hellaswag_val.jsonl``: the model, then what it is scored on."""
    parameters = flow_run.parameters
    corpus = parameters.get("corpus")
    scored_on = [f"{parameters.get('split', 'val')}:{source_label(corpus[0])}" if corpus else None,
                 *(Path(parameters[name]).name for name in ("multiple_choice", "classification", "tagging")
                   if parameters.get(name))]
    return run_name("evaluate", parameters.get("overrides"), source_label(parameters.get("model")), *scored_on)


@flow(name="evaluate", flow_run_name=_flow_run_name, log_prints=True)
def evaluate(
    model: str,
    corpus: list[str] | None = None,
    split: EvalSplit = "val",
    multiple_choice: str | None = None,
    classification: str | None = None,
    tagging: str | None = None,
    tokenizer: str | None = None,
    overrides: dict[str, Any] | None = None,
    workspace: str | None = None,
    ray: str | None = None,
    lm_eval: list[str] | None = None,
    lm_eval_limit: PositiveInt | None = None,
    lm_eval_num_fewshot: NonNegativeInt | None = None,
    lm_eval_tasks_dir: str | None = None,
) -> EvaluateSummary:
    """Evaluate a trained gptflow model on a corpus split and/or a multiple-choice file.

    Args:
        model: models:/name/version, runs:/<run id>/model, an MLflow run id, or a directory holding
            model.safetensors and config.json.
        corpus: files, folders, globs, s3:// URLs or hf:owner/name datasets to measure loss,
            perplexity and bits per byte on, read as pretrain reads its corpus and tokenized with the
            model's own tokenizer.
        split: the documents of the corpus to score: val (held out by document hash with
            data.val_fraction, as pretraining holds them out), train, or all.
        multiple_choice: a HellaSwag-format JSONL (or JSON, parquet) file, a record per example
            {"ctx": ..., "endings": [...], "label": N}: zero-shot acc and acc_norm.
        classification: for a fine-tuned classifier: a JSONL, JSON, CSV or parquet file of text +
            label (fields data.text_field and data.label_field): accuracy, macro-F1 and a confusion
            matrix.
        tagging: for a fine-tuned tagger: {"text": ..., "spans": [[start, end, label], ...]} records
            (text field data.text_field) or a CoNLL file: span precision, recall and F1 per label
            (exact match) and a token confusion matrix.
        tokenizer: the model's tokenizer.json, for a model directory without one beside or above it.
        overrides: data.*, tokenize.*, eval.* or sampling.* settings applied last:
            eval.eval_tokens=65536 on the command line, ``{"eval.eval_tokens": 65536}`` as a flow
            parameter.
        workspace: the artifact store and MLflow database: a folder, or an S3 prefix mirrored in
            $GPTFLOW_CACHE (default: $GPTFLOW_HOME or ./.gptflow).
        ray: run the corpus's per-file data units on this Ray cluster, as pretrain does (auto,
            HOST:PORT or ray://HOST:PORT; default $GPTFLOW_RAY_ADDRESS).
        lm_eval: lm-evaluation-harness tasks to run on the model: hellaswag,arc_easy on the command
            line, ``["hellaswag", "arc_easy"]`` as a flow parameter; metrics logged as
            lm_eval/<task>/<metric> (pip install 'gptflow[lm-eval]').
        lm_eval_limit: examples per ``lm_eval`` task (default: all).
        lm_eval_num_fewshot: few-shot examples per ``lm_eval`` prompt (default: each task's own).
        lm_eval_tasks_dir: a folder of your own lm-evaluation-harness task YAMLs, usable by name in
            ``lm_eval``.
    """
    started = time.monotonic()
    hide_tracebacks_of_user_errors()
    # Bad input fails here, before any model is fetched or corpus ingested.
    inputs = check_evaluate(corpus, multiple_choice, classification, tagging, overrides, ray, lm_eval,
                            lm_eval_tasks_dir)
    harness = HarnessSettings(lm_eval, lm_eval_limit, lm_eval_num_fewshot, lm_eval_tasks_dir) if lm_eval else None
    workspace_dir = Workspace.resolve(workspace)
    source = resolve_model(model, workspace_dir, tokenizer)
    if inputs.classification:
        source.require_head("classification")
    if inputs.tagging:
        source.require_head("tagging")
    if harness:
        source.require_text_model("--lm-eval")

    choice_hash = hash_file(inputs.multiple_choice) if inputs.multiple_choice else None
    # As the run records the corpus: under data.redact_pii, without the personal data in its names.
    corpus = [source_name(spec, inputs.config.data) for spec in corpus] if corpus else None
    with pipeline_run(workspace_dir, "evaluate", tags={"gptflow.flow": "evaluate"}) as run:
        run.log_params({
            "code_version": pipeline_code_version(),
            "model_source": model,
            "model_weights_hash": source.weights_hash,
            "tokenizer_hash": source.tokenizer_hash,
            **{f"model.{name}": value for name, value in asdict(source.config).items()},
            **inputs.config.flatten(),
            **({"corpus": " ".join(corpus), "split": split} if corpus else {}),
            **({"multiple_choice": str(inputs.multiple_choice), "multiple_choice_hash": choice_hash}
               if inputs.multiple_choice else {}),
            **({"classification": str(inputs.classification)} if inputs.classification else {}),
            **({"tagging": str(inputs.tagging)} if inputs.tagging else {}),
            **({"lm_eval": ",".join(lm_eval), "lm_eval_limit": lm_eval_limit or "",
                "lm_eval_num_fewshot": "" if lm_eval_num_fewshot is None else lm_eval_num_fewshot}
               if lm_eval else {}),
        })
        summary = _score(model, source, inputs, corpus, split, harness, choice_hash, workspace_dir, run, started)
        run.log_text(json.dumps(summary.report(), indent=2), "eval/report.json")
        if summary.samples:
            run.log_text(samples_markdown(summary.prompts, summary.samples), "eval/samples.md")

    create_markdown_artifact(key="evaluate-summary", markdown=summary.markdown(run.url),
                             description="What the model scored, and which stages ran")
    end_log_of_deployment_run(summary.render(sample=False))
    return summary


def _score(model: str, source: ResolvedModel, inputs: EvaluateInputs, corpus: list[str] | None, split: EvalSplit,
           harness: HarnessSettings | None, choice_hash: str | None, workspace: Workspace, run: PipelineRun,
           started: float) -> EvaluateSummary:
    """Run each scoring stage ``inputs`` ask for on the model of ``source`` in ``run``; what they measured."""
    config = inputs.config
    loss = data_fingerprint = None
    if inputs.sources:
        units = UnitRunner(inputs.ray_address)
        # The split scored must have documents; with "all", either one may be empty.
        required_splits = () if split == "all" else (split,)
        corpus_manifest = ingest(inputs.sources, config.data, workspace, run, units, required_splits=required_splits)
        data_fingerprint = corpus_manifest.fingerprint
        run.log_params({"data_fingerprint": data_fingerprint})
        tokens = tokenize(corpus_manifest, source.tokenizer, config.tokenize, workspace, run, units)
        log_corpus_dataset(run, corpus, corpus_manifest, tokens, context="evaluation")
        loss = score_loss(source, tokens, split, config.eval, workspace, run)
    choices = (score_multiple_choice(source, inputs.multiple_choice, choice_hash, workspace, run)
               if inputs.multiple_choice else None)
    harness_report = run_harness(source, harness, workspace, run, step=0) if harness else None
    classes = (score_classifier(source, inputs.classification, config.data.text_field, config.data.label_field,
                                workspace, run) if inputs.classification else None)
    spans = score_tagger(source, inputs.tagging, config.data.text_field, workspace, run) if inputs.tagging else None
    # A classifier's trunk continues text it was never trained to write: only language models are sampled.
    samples = ([] if source.head_objective
               else sample_model(source, config.eval.prompts, config.sampling, workspace, run))
    return EvaluateSummary(
        model=model,
        weights_hash=source.weights_hash,
        tokenizer_hash=source.tokenizer_hash,
        stages=dict(run.stage_statuses),
        corpus=corpus,
        data_fingerprint=data_fingerprint,
        loss=loss,
        multiple_choice_file=str(inputs.multiple_choice) if inputs.multiple_choice else None,
        multiple_choice=choices,
        classification_file=str(inputs.classification) if inputs.classification else None,
        classification=classes,
        tagging_file=str(inputs.tagging) if inputs.tagging else None,
        tagging=spans,
        lm_eval=harness_report,
        prompts=config.eval.prompts,
        samples=samples,
        **of_run(run, time.monotonic() - started),
    )
