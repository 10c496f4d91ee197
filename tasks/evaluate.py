"""Stage 5, evaluate: val loss, perplexity, bits per byte, unigram baseline, sample generations."""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from prefect import task

import data.loader
import data.stats
import model.evaluate
import model.gpt
from data.loader import TokenWindows
from data.stats import unigram_cross_entropy
from data.store import atomic_directory, is_complete
from data.tokenize import TokenManifest
from data.tokenizer import TokenizerArtifact, load_tokenizer
from model.checkpoint import load_model
from model.config import EvalConfig
from model.device import resolve_device
from model.evaluate import bits_per_byte, evaluate_loss, generate_samples, perplexity
from tasks.caching import run_stage, stage_key
from tasks.training_job import TrainedModel
from tasks.progress import run_logger
from tasks.tracking import PipelineRun
from tasks.workspace import Workspace

CODE = (data.loader, data.stats, model.evaluate, model.gpt, sys.modules[__name__])
EVAL_BATCH_SIZE = 8


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
        return {
            "eval/val_loss": self.val_loss,
            "eval/perplexity": self.perplexity,
            "eval/bits_per_byte": self.bits_per_byte,
            "eval/unigram_loss": self.unigram_loss,
            "eval/val_tokens": self.val_tokens,
        }


@task(name="evaluate-model")
def evaluate_model_task(
    trained: TrainedModel,
    tokens: TokenManifest,
    tokenizer: TokenizerArtifact,
    config: EvalConfig,
    out_dir: str,
) -> EvalReport:
    device = resolve_device("auto")
    gpt = load_model(Path(trained.final_dir), device=device)
    val_windows = TokenWindows(tokens.paths("val"), gpt.config.block_size)
    val_loss, scored = evaluate_loss(gpt, val_windows, config.eval_tokens, EVAL_BATCH_SIZE, device)
    unigram = unigram_cross_entropy(tokens.paths("train"), tokens.paths("val"), tokenizer.vocab_size)

    text_tokenizer = load_tokenizer(tokenizer)
    prompt_ids = [[tokenizer.eot_id, *text_tokenizer.encode(prompt).ids] for prompt in config.prompts]
    generated = generate_samples(
        gpt, prompt_ids, config.max_new_tokens, config.temperature, config.top_k or None, config.seed, device
    )
    samples = [text_tokenizer.decode(ids[1:]) for ids in generated]

    report = EvalReport(
        directory=out_dir,
        val_loss=val_loss,
        val_tokens=scored,
        perplexity=perplexity(val_loss),
        bits_per_byte=bits_per_byte(val_loss, tokens.total_tokens("val"), tokens.total_bytes("val")),
        unigram_loss=unigram,
        samples=samples,
    )
    with atomic_directory(Path(out_dir)) as directory:
        (directory / "report.json").write_text(json.dumps(dataclasses.asdict(report), indent=2))
        (directory / "samples.md").write_text(_samples_markdown(config.prompts, samples))
    return report


def evaluate_model(
    trained: TrainedModel,
    tokens: TokenManifest,
    tokenizer: TokenizerArtifact,
    config: EvalConfig,
    workspace: Workspace,
    run: PipelineRun,
) -> EvalReport:
    key = stage_key(
        "evaluate",
        config=config,
        modules=CODE,
        inputs={"model": trained.weights_hash, "tokens": tokens.fingerprint, "tokenizer": tokenizer.hash},
    )
    outcome = run_stage(
        evaluate_model_task,
        key=key,
        workspace=workspace,
        is_valid=lambda report: is_complete(Path(report.directory)),
        trained=trained,
        tokens=tokens,
        tokenizer=tokenizer,
        config=config,
        out_dir=str(workspace.store / "eval" / key),
    )
    report = outcome.result
    run.record_stage("evaluate", outcome.status)
    run.log_metrics(report.metrics(), step=trained.steps)
    run.log_artifact(Path(report.directory), "eval")
    run_logger().info(
        f"evaluate: val loss {report.val_loss:.3f} nats/token vs unigram baseline {report.unigram_loss:.3f}; "
        f"perplexity {report.perplexity:.1f}; {report.bits_per_byte:.3f} bits/byte"
    )
    return report


def _samples_markdown(prompts: list[str], samples: list[str]) -> str:
    sections = [f"## Prompt {index + 1}\n\n```\n{sample}\n```\n" for index, sample in enumerate(samples)]
    header = "# Samples\n\nEach block starts with its prompt: " + ", ".join(repr(p) for p in prompts) + "\n\n"
    return header + "\n".join(sections)
