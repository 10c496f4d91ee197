"""Evaluation stages: loss, perplexity and bits per byte on a split of token shards, and sample
generations.

The pretrain flow's ``evaluate`` stage (val loss and samples of the model it trained, in one
stage) and the evaluate flow's ``loss`` and ``samples`` stages (of any resolved model, each cached
on its own) compute their figures with the same functions: ``measure_loss`` and ``sample_texts``,
and name their metrics through ``LossReport.metrics`` (``eval/<split>_loss``, ``eval/perplexity``,
...). The evaluate flow runs the ordinary ingest and tokenize stages with the model's own
tokenizer, so a model's own corpus is found cached (``data.ingest.require_splits`` checks that the
split it scores is not empty). Each of its stages (``loss`` here, ``multiple_choice``,
``classification``, ``tagging``, ``samples``, ``lm_eval``) is keyed by the model's weights hash,
the tokenizer hash, its inputs (token fingerprint, file content hash, prompts) and its settings.
The results of ``loss`` and ``samples`` are a few numbers and texts held whole in the Prefect
record; the others write files under ``store/eval/<key>/`` (``store/lm-eval/<key>/``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from prefect import task

from gptflow.data.commits import write_report
from gptflow.data.errors import CorpusError
from gptflow.data.loader import TokenWindows
from gptflow.data.stats import unigram_cross_entropy
from gptflow.data.store import ArtifactStore
from gptflow.data.streaming import ShardCache
from gptflow.data.tokenize import TokenManifest
from gptflow.data.tokenizer import TokenizerArtifact, load_tokenizer
from gptflow.model.checkpoint import load_model
from gptflow.model.config import EvalConfig, SamplingConfig
from gptflow.model.device import resolve_device
from gptflow.model.evaluate import bits_per_byte, evaluate_loss, perplexity
from gptflow.model.generate import generate_texts
from gptflow.model.gpt import GPT
from gptflow.tasks.model_source import ResolvedModel
from gptflow.tasks.runtime.caching import directory_is_complete, nothing_stored, run_stage, stage_key
from gptflow.tasks.runtime.workspace import Workspace, cache_limit_bytes
from gptflow.tasks.stages.training_job import TrainedModel
from gptflow.tasks.tracking.progress import run_logger
from gptflow.tasks.tracking.run import PipelineRun

LOSS_BATCH_SEQUENCES = 8
"""Windows of ``block_size`` tokens per batch when measuring a loss."""
SPLITS_OF: dict[str, tuple[str, ...]] = {"train": ("train",), "val": ("val",), "all": ("train", "val")}
"""The corpus splits each ``tasks.settings.EvalSplit`` reads."""


@dataclass
class LossReport:
    split: str
    """``train``, ``val`` or ``all``."""
    loss: float
    """Mean cross-entropy, nats per token."""
    tokens: int
    """Tokens scored (up to ``eval.eval_tokens``)."""
    perplexity: float
    bits_per_byte: float
    """Loss per UTF-8 byte of text (via the split's bytes per token): comparable across tokenizers."""
    unigram_loss: float | None
    """For the val split: its cross-entropy under the train split's token frequencies, the bar a
    model that learned anything beyond token counts must clear. None for other splits."""

    def metrics(self) -> dict[str, float]:
        """``eval/<split>_loss`` and ``eval/<split>_tokens``, ``eval/perplexity``,
        ``eval/bits_per_byte`` (and ``eval/unigram_loss`` for val): the pretrain flow's names."""
        metrics = {
            f"eval/{self.split}_loss": self.loss,
            "eval/perplexity": self.perplexity,
            "eval/bits_per_byte": self.bits_per_byte,
            f"eval/{self.split}_tokens": self.tokens,
        }
        if self.unigram_loss is not None:
            metrics["eval/unigram_loss"] = self.unigram_loss
        return metrics


def measure_loss(gpt: GPT, tokens: TokenManifest, split: str, eval_tokens: int, device: torch.device,
                 artifacts: ArtifactStore) -> LossReport:
    """Loss of ``gpt`` on up to ``eval_tokens`` tokens of ``split``, in windows spread evenly over all
    its shards. In a workspace on an object store, only the record batches of those windows are
    fetched (``data.streaming``), and the unigram baseline reads the shards' id counts, never a shard."""
    splits = SPLITS_OF[split]
    paths = [path for name in splits for path in tokens.paths(name)]
    n_tokens = sum(tokens.total_tokens(name) for name in splits)
    if n_tokens < gpt.config.block_size + 1:
        raise CorpusError(
            f"The corpus's {split} split holds {n_tokens} tokens, fewer than one window of the model's context "
            f"(block_size + 1 = {gpt.config.block_size + 1}). Evaluate on more text, or on --split all."
        )
    cache = ShardCache(artifacts, cache_limit_bytes()) if artifacts.mirror else None
    with contextlib.closing(cache) if cache else contextlib.nullcontext():
        windows = TokenWindows(paths, gpt.config.block_size, tokens.vocab_size, cache=cache,
                               num_tokens=[count for name in splits for count in tokens.shard_tokens(name)])
        loss, scored = evaluate_loss(gpt, windows, eval_tokens, LOSS_BATCH_SEQUENCES, device)
    train_paths = tokens.paths("train")
    unigram = (unigram_cross_entropy(train_paths, paths, tokens.vocab_size, artifacts)
               if split == "val" and train_paths else None)
    return LossReport(
        split=split,
        loss=loss,
        tokens=scored,
        perplexity=perplexity(loss),
        bits_per_byte=bits_per_byte(loss, n_tokens, sum(tokens.total_bytes(name) for name in splits)),
        unigram_loss=unigram,
    )


def sample_texts(gpt: GPT, tokenizer: TokenizerArtifact, prompts: list[str], sampling: SamplingConfig,
                 device: torch.device) -> list[str]:
    """One sample per prompt, each starting with its prompt (see ``model.generate.generate_texts``)."""
    return generate_texts(gpt, load_tokenizer(tokenizer), prompts, sampling, device)


def samples_markdown(prompts: list[str], samples: list[str]) -> str:
    sections = [f"## Prompt {index + 1}\n\n```\n{sample}\n```\n" for index, sample in enumerate(samples)]
    header = "# Samples\n\nEach block starts with its prompt: " + ", ".join(repr(p) for p in prompts) + "\n\n"
    return header + "\n".join(sections)


# --- the pretrain flow's evaluate stage -------------------------------------------------------


@dataclass
class EvalReport:
    directory: str
    """``report.json`` + ``samples.md``."""
    val_loss: float
    """Mean cross-entropy on the val split, nats per token."""
    val_tokens: int
    """Tokens scored (up to ``eval.eval_tokens``)."""
    perplexity: float
    bits_per_byte: float
    """Loss per UTF-8 byte of val text (via the split's bytes-per-token): comparable across tokenizers."""
    unigram_loss: float
    """Cross-entropy of the val split under the train split's token frequencies: the bar a
    model that learned anything beyond token counts must clear."""
    samples: list[str]

    def metrics(self) -> dict[str, float]:
        return LossReport(
            split="val", loss=self.val_loss, tokens=self.val_tokens, perplexity=self.perplexity,
            bits_per_byte=self.bits_per_byte, unigram_loss=self.unigram_loss,
        ).metrics()


@task(name="evaluate-model")
def evaluate_model_task(
    trained: TrainedModel,
    tokens: TokenManifest,
    tokenizer: TokenizerArtifact,
    config: EvalConfig,
    sampling: SamplingConfig,
    out_dir: str,
    artifacts: ArtifactStore,
) -> EvalReport:
    device = resolve_device("auto")
    gpt = load_model(Path(trained.final_dir), device=device, artifacts=artifacts)
    loss = measure_loss(gpt, tokens, "val", config.eval_tokens, device, artifacts)
    samples = sample_texts(gpt, tokenizer, config.prompts, sampling, device)
    report = EvalReport(directory=out_dir, val_loss=loss.loss, val_tokens=loss.tokens, perplexity=loss.perplexity,
                        bits_per_byte=loss.bits_per_byte, unigram_loss=loss.unigram_loss, samples=samples)
    with artifacts.commit(Path(out_dir)) as directory:
        write_report(directory, report)
        (directory / "samples.md").write_text(samples_markdown(config.prompts, samples))
    return report


def evaluate_model(
    trained: TrainedModel,
    tokens: TokenManifest,
    tokenizer: TokenizerArtifact,
    config: EvalConfig,
    sampling: SamplingConfig,
    workspace: Workspace,
    run: PipelineRun,
) -> EvalReport:
    key = stage_key(
        "evaluate",
        config={"eval": dataclasses.asdict(config), "sampling": dataclasses.asdict(sampling)},
        modules=(__name__,),
        inputs={"model": trained.weights_hash, "tokens": tokens.fingerprint, "tokenizer": tokenizer.hash},
    )
    outcome = run_stage(evaluate_model_task, key=key, workspace=workspace,
                        is_valid=directory_is_complete, trained=trained, tokens=tokens,
                        tokenizer=tokenizer, config=config, sampling=sampling,
                        out_dir=str(workspace.store / "eval" / key), artifacts=workspace.artifacts)
    report = outcome.result
    run.record_stage("evaluate", outcome.status)
    run.log_metrics(report.metrics(), step=trained.steps, model_of_run=trained.trained_in_mlflow_run)
    run.log_artifact(Path(report.directory), "eval")
    run_logger().info(
        f"evaluate: val loss {report.val_loss:.3f} nats/token vs unigram baseline {report.unigram_loss:.3f}; "
        f"perplexity {report.perplexity:.1f}; {report.bits_per_byte:.3f} bits/byte"
    )
    return report


# --- the evaluate flow's loss and samples stages ----------------------------------------------
# Their results are a few numbers and texts, held whole in Prefect's cache record: no files in
# the store that could go missing, so a cached record is always valid.


@task(name="evaluate-loss")
def evaluate_loss_task(source: ResolvedModel, tokens: TokenManifest, split: str, eval_tokens: int,
                       artifacts: ArtifactStore) -> LossReport:
    device = resolve_device("auto")
    return measure_loss(source.load(device), tokens, split, eval_tokens, device, artifacts)


def score_loss(
    source: ResolvedModel,
    tokens: TokenManifest,
    split: str,
    config: EvalConfig,
    workspace: Workspace,
    run: PipelineRun,
) -> LossReport:
    """The ``loss`` stage: loss, perplexity and bits per byte of ``source`` on ``split`` of ``tokens``."""
    key = stage_key(
        "loss",
        config={"split": split, "eval_tokens": config.eval_tokens},
        modules=(__name__,),
        inputs={"model": source.weights_hash, "tokenizer": source.tokenizer_hash, "tokens": tokens.fingerprint},
    )
    outcome = run_stage(
        evaluate_loss_task, key=key, workspace=workspace, is_valid=nothing_stored,
        source=source, tokens=tokens, split=split, eval_tokens=config.eval_tokens, artifacts=workspace.artifacts,
    )
    report = outcome.result
    run.record_stage("loss", outcome.status)
    run.log_metrics(report.metrics())
    baseline = f" vs unigram baseline {report.unigram_loss:.3f}" if report.unigram_loss is not None else ""
    run_logger().info(
        f"loss: {split} loss {report.loss:.3f} nats/token{baseline}; perplexity {report.perplexity:.1f}; "
        f"{report.bits_per_byte:.3f} bits/byte over {report.tokens:,} tokens"
    )
    return report


@task(name="generate-samples")
def generate_samples_task(source: ResolvedModel, prompts: list[str], sampling: SamplingConfig) -> list[str]:
    device = resolve_device("auto")
    return sample_texts(source.load(device), source.tokenizer, prompts, sampling, device)


def sample_model(
    source: ResolvedModel, prompts: list[str], sampling: SamplingConfig, workspace: Workspace, run: PipelineRun
) -> list[str]:
    """The ``samples`` stage: a sample generation per prompt."""
    key = stage_key(
        "samples",
        config={"prompts": prompts, **dataclasses.asdict(sampling)},
        modules=(__name__,),
        inputs={"model": source.weights_hash, "tokenizer": source.tokenizer_hash},
    )
    outcome = run_stage(
        generate_samples_task, key=key, workspace=workspace, is_valid=nothing_stored,
        source=source, prompts=prompts, sampling=sampling,
    )
    run.record_stage("samples", outcome.status)
    return outcome.result
