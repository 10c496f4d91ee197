"""The pretrain flow's ``eval-corpus`` stage: the trained model scored on a fixed evaluation corpus
(``--eval-corpus``), in bits per UTF-8 byte.

A run's own val split is drawn from its own corpus: two runs that read their corpus differently
(another ``data.quality``, another mixture) hold out different text, and their val losses do not
compare. The evaluation corpus is the same text for every run: it is read without any of the
training data's filters (its own ``data.text_field`` aside), every document scored (both splits),
tokenized with each run's own tokenizer, and its loss given per byte of text, which does not depend
on the tokenizer. Its ingest and tokenize stages are the ordinary ones (found cached as
``gptflow evaluate --corpus ... --split all`` leaves them), logged only as this stage's params; the
loss is keyed by the model's weights hash and the token fingerprint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import task

from gptflow.data.config import IngestConfig, TokenizeConfig
from gptflow.data.errors import CorpusError
from gptflow.data.sources import SourceResolution
from gptflow.data.store import ArtifactStore
from gptflow.data.tokenize import TokenManifest
from gptflow.data.tokenizer import TokenizerArtifact
from gptflow.model.checkpoint import load_model
from gptflow.model.config import EvalConfig
from gptflow.model.device import resolve_device
from gptflow.tasks.runtime.caching import nothing_stored, run_stage, stage_key
from gptflow.tasks.runtime.unit_maps import UnitRunner
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.stages.evaluation import LossReport, measure_loss
from gptflow.tasks.stages.ingest import ingested
from gptflow.tasks.stages.tokenize import tokenized
from gptflow.tasks.stages.training_job import TrainedModel
from gptflow.tasks.tracking.progress import run_logger
from gptflow.tasks.tracking.run import PipelineRun

EVAL_CORPUS_BITS_PER_BYTE = "eval_corpus/bits_per_byte"


@dataclass
class EvalCorpusReport:
    corpus: list[str]
    fingerprint: str
    """The evaluation corpus's data fingerprint: the same text gives the same one."""
    loss: LossReport

    def metrics(self) -> dict[str, float]:
        return {"eval_corpus/loss": self.loss.loss, EVAL_CORPUS_BITS_PER_BYTE: self.loss.bits_per_byte,
                "eval_corpus/tokens": self.loss.tokens}


def evaluation_reading(training_reading: IngestConfig) -> IngestConfig:
    """How the evaluation corpus is read: every setting at its default (no filter, no dedup
    across it and the training data, nothing redacted), but the field records hold their text in."""
    return IngestConfig(text_field=training_reading.text_field)


@task(name="eval-corpus-loss")
def eval_corpus_loss_task(final_dir: str, tokens: TokenManifest, eval_tokens: int,
                          artifacts: ArtifactStore) -> LossReport:
    device = resolve_device("auto")
    return measure_loss(load_model(Path(final_dir), device=device, artifacts=artifacts), tokens, "all",
                        eval_tokens, device, artifacts)


def score_eval_corpus(corpus: list[str], sources: SourceResolution, trained: TrainedModel,
                      tokenizer: TokenizerArtifact, reading: IngestConfig, tokenize_config: TokenizeConfig,
                      config: EvalConfig, workspace: Workspace, run: PipelineRun, units: UnitRunner) -> EvalCorpusReport:
    """Score ``trained`` on every document of the evaluation corpus ``sources``; log the params
    ``eval_corpus`` and ``eval_corpus.fingerprint`` and the metrics ``eval_corpus/*`` to ``run``."""
    manifest = ingested(sources, evaluation_reading(reading), workspace, units).result
    if manifest.skips.total:
        run_logger().warning(f"eval-corpus: {manifest.skips.summary()}")
    tokens = tokenized(manifest, tokenizer, tokenize_config, workspace, units).result
    held = tokens.total_tokens("train") + tokens.total_tokens("val")
    if held <= trained.model_config["block_size"]:
        raise CorpusError(f"The evaluation corpus {' '.join(corpus)} holds {held:,} tokens, fewer than one window "
                          f"of the model's context (block_size + 1 = {trained.model_config['block_size'] + 1}): "
                          "give --eval-corpus more text.")
    key = stage_key(
        "eval-corpus", config={"eval_tokens": config.eval_tokens}, modules=(__name__,),
        inputs={"model": trained.weights_hash, "tokens": tokens.fingerprint},
    )
    outcome = run_stage(eval_corpus_loss_task, key=key, workspace=workspace, is_valid=nothing_stored,
                        final_dir=trained.final_dir, tokens=tokens, eval_tokens=config.eval_tokens,
                        artifacts=workspace.artifacts)
    report = EvalCorpusReport(corpus=corpus, fingerprint=manifest.fingerprint, loss=outcome.result)
    run.record_stage("eval-corpus", outcome.status)
    run.log_params({"eval_corpus": " ".join(corpus), "eval_corpus.fingerprint": manifest.fingerprint})
    run.log_metrics(report.metrics(), step=trained.steps, model_of_run=trained.trained_in_mlflow_run)
    run_logger().info(
        f"eval-corpus: {report.loss.bits_per_byte:.4f} bits/byte ({report.loss.loss:.3f} nats/token) over "
        f"{report.loss.tokens:,} tokens of {' '.join(corpus)} ({manifest.total_documents:,} documents)"
    )
    return report
