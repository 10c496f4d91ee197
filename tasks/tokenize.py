"""Stage 3, tokenize: raw shards → memory-mappable token shards, one unit per source file."""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import task

import data.shards
import data.tokenize
from data.config import TokenizeConfig
from data.ingest import CorpusManifest
from data.store import is_complete
from data.tokenize import TokenManifest
from data.tokenizer import TokenizerArtifact
from tasks.caching import run_stage, stage_key
from tasks.progress import StageProgress
from tasks.tracking import PipelineRun
from tasks.workspace import Workspace

CODE = (data.shards, data.tokenize, sys.modules[__name__])


@task(name="tokenize-corpus")
def tokenize_corpus_task(
    corpus: CorpusManifest, tokenizer: TokenizerArtifact, config: TokenizeConfig, store_dir: str
) -> TokenManifest:
    return data.tokenize.tokenize_corpus(
        corpus, tokenizer, config, Path(store_dir), progress=StageProgress("tokenize", "B")
    )


def tokenize(
    corpus: CorpusManifest,
    tokenizer: TokenizerArtifact,
    config: TokenizeConfig,
    workspace: Workspace,
    run: PipelineRun,
) -> TokenManifest:
    # batch_bytes and workers change speed, not tokens: they stay out of the key.
    key = stage_key(
        "tokenize", config={}, modules=CODE, inputs={"corpus": corpus.fingerprint, "tokenizer": tokenizer.hash}
    )
    outcome = run_stage(
        tokenize_corpus_task,
        key=key,
        workspace=workspace,
        is_valid=lambda manifest: Path(manifest.path).exists()
        and all(is_complete(Path(unit.directory)) for unit in manifest.units),
        corpus=corpus,
        tokenizer=tokenizer,
        config=config,
        store_dir=str(workspace.store),
    )
    tokens = outcome.result
    run.record_stage("tokenize", outcome.status)
    reused = len(tokens.units) if outcome.status == "cached" else sum(unit.reused for unit in tokens.units)
    run.set_tags({"gptflow.tokenize.files_reused": reused, "gptflow.tokenize.files_tokenized": len(tokens.units) - reused})
    run.log_metrics({
        "data/train_tokens": tokens.total_tokens("train"),
        "data/val_tokens": tokens.total_tokens("val"),
    })
    run.log_artifact(Path(tokens.path), "data")
    return tokens
