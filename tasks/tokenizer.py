"""Stage 2, tokenizer: a byte-level BPE trained on a bounded sample of the train split."""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import task

import data.tokenizer
from data.config import TokenizerConfig
from data.ingest import CorpusManifest
from data.store import is_complete
from data.tokenizer import TokenizerArtifact
from tasks.caching import run_stage, stage_key
from tasks.progress import StageProgress
from tasks.tracking import PipelineRun
from tasks.workspace import Workspace

CODE = (data.tokenizer, sys.modules[__name__])


@task(name="train-tokenizer")
def train_tokenizer_task(corpus: CorpusManifest, config: TokenizerConfig, store_dir: str) -> TokenizerArtifact:
    return data.tokenizer.train_tokenizer(corpus, config, Path(store_dir), progress=StageProgress("tokenizer", "B"))


def train_tokenizer(
    corpus: CorpusManifest, config: TokenizerConfig, workspace: Workspace, run: PipelineRun
) -> TokenizerArtifact:
    key = stage_key("tokenizer", config=config, modules=CODE, inputs={"corpus": corpus.fingerprint})
    outcome = run_stage(
        train_tokenizer_task,
        key=key,
        workspace=workspace,
        is_valid=lambda artifact: is_complete(Path(artifact.path).parent),
        corpus=corpus,
        config=config,
        store_dir=str(workspace.store),
    )
    tokenizer = outcome.result
    run.record_stage("tokenizer", outcome.status)
    run.set_tags({"gptflow.tokenizer_hash": tokenizer.hash})
    run.log_artifact(Path(tokenizer.path).parent, "tokenizer")
    return tokenizer
