"""Stage 3, tokenize: raw shards → memory-mappable token shards, one unit per source file."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from gptflow.data.config import TokenizeConfig
from gptflow.data.ingest import CorpusManifest
from gptflow.data.store import ArtifactStore
from gptflow.data.tokenize import TokenManifest, tokenize_corpus
from gptflow.data.tokenizer import TokenizerArtifact
from gptflow.tasks.runtime.caching import (
    StageOutcome,
    record_unit_reuse,
    run_stage,
    stage_key,
    units_are_committed,
)
from gptflow.tasks.runtime.unit_maps import UnitRunner
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.tracking.naming import source_label
from gptflow.tasks.tracking.progress import StageProgress
from gptflow.tasks.tracking.run import PipelineRun


@task(name="tokenize-corpus")
def tokenize_corpus_task(
    corpus: CorpusManifest, tokenizer: TokenizerArtifact, config: TokenizeConfig, store_dir: str,
    artifacts: ArtifactStore, units: UnitRunner,
) -> TokenManifest:
    map_units = units.for_stage("tokenize", artifacts, label=unit_label)
    return tokenize_corpus(corpus, tokenizer, config, Path(store_dir), progress=StageProgress("tokenize", "B"),
                           map_units=map_units, artifacts=artifacts)


def unit_label(call: dict) -> str:
    """A group of units by its first file, and how many follow it."""
    first, more = Path(call["units"][0].source).name, len(call["units"]) - 1
    return f"{first} (+{more} files)" if more else first


def tokenized(corpus: CorpusManifest, tokenizer: TokenizerArtifact, config: TokenizeConfig, workspace: Workspace,
              units: UnitRunner) -> StageOutcome[TokenManifest]:
    """The tokenize stage's outcome for ``corpus`` (computed, or found cached), logged nowhere."""
    # batch_bytes and workers change speed, not tokens: they stay out of the key.
    key = stage_key(
        "tokenize", config={}, modules=(__name__,), inputs={"corpus": corpus.fingerprint, "tokenizer": tokenizer.hash}
    )
    return run_stage(tokenize_corpus_task, key=key, workspace=workspace, is_valid=units_are_committed,
                     corpus=corpus, tokenizer=tokenizer, config=config, store_dir=str(workspace.store),
                     artifacts=workspace.artifacts, units=units)


def tokenize(
    corpus: CorpusManifest,
    tokenizer: TokenizerArtifact,
    config: TokenizeConfig,
    workspace: Workspace,
    run: PipelineRun,
    units: UnitRunner,
) -> TokenManifest:
    """Tokenize (or find cached) ``corpus``, logged to ``run``."""
    outcome = tokenized(corpus, tokenizer, config, workspace, units)
    tokens = outcome.result
    record_unit_reuse(run, "tokenize", "tokenized", outcome)
    run.log_params({"dataset.train_tokens": tokens.total_tokens("train"), "dataset.val_tokens": tokens.total_tokens("val")})
    run.log_artifact(Path(tokens.path), "data")
    return tokens


def log_corpus_dataset(run: PipelineRun, corpus: list[str], manifest: CorpusManifest, tokens: TokenManifest,
                       context: str) -> None:
    """The corpus as the run's MLflow dataset: its sources, the fingerprint of its data (its first
    eight characters as the digest), its counts."""
    run.log_dataset(
        # Eight characters, as MLflow's own digests: the runs table shows the digest beside the name.
        name=" ".join(source_label(source) or source for source in corpus), digest=manifest.fingerprint[:8],
        sources=corpus, context=context,
        profile={"fingerprint": manifest.fingerprint, "source_files": len(manifest.units),
                 "documents": manifest.total_documents,
                 "segments": sum(manifest.totals["segments"].values()),
                 "train_tokens": tokens.total_tokens("train"), "val_tokens": tokens.total_tokens("val")},
    )
