"""Stage 2, tokenizer: a byte-level BPE trained on a bounded sample of the train split.

On a rerun over a grown corpus the lineage's tokenizer is kept: its hash keys every token
shard, so a new tokenizer would re-tokenize every file. ``retrain=True`` trains a new one.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from gptflow.data.config import TokenizerConfig
from gptflow.data.ingest import CorpusManifest
from gptflow.data.store import ArtifactStore
from gptflow.data.tokenizer import TokenizerArtifact, train_tokenizer
from gptflow.tasks.lineage import Lineage
from gptflow.tasks.runtime.caching import run_stage, stage_key
from gptflow.tasks.runtime.unit_maps import UnitRunner
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.tracking.progress import StageProgress, run_logger
from gptflow.tasks.tracking.run import PipelineRun


@task(name="train-tokenizer")
def train_tokenizer_task(corpus: CorpusManifest, config: TokenizerConfig, store_dir: str, artifacts: ArtifactStore,
                         units: UnitRunner) -> TokenizerArtifact:
    map_units = units.for_stage("tokenizer", artifacts, label=lambda call: Path(call["unit"].source).name)
    return train_tokenizer(corpus, config, Path(store_dir), progress=StageProgress("tokenizer", "B"),
                           map_units=map_units, artifacts=artifacts)


def prepare_tokenizer(
    corpus: CorpusManifest,
    config: TokenizerConfig,
    workspace: Workspace,
    run: PipelineRun,
    lineage: Lineage,
    units: UnitRunner,
    retrain: bool = False,
) -> TokenizerArtifact:
    # Same settings and code as the kept tokenizer: keep it, whatever the corpus became since.
    settings_key = stage_key("tokenizer", config=config, modules=(__name__,), inputs={})
    kept = None if retrain else lineage.tokenizers.get(settings_key)
    if kept and not workspace.artifacts.is_complete(Path(kept["artifact"]["path"]).parent):
        run_logger().warning("tokenizer: the lineage's tokenizer was deleted or altered on disk; training a new one")
        kept = None
    key = kept["stage_key"] if kept else stage_key("tokenizer", config=config, modules=(__name__,),
                                                    inputs={"corpus": corpus.fingerprint})
    outcome = run_stage(
        train_tokenizer_task,
        key=key,
        workspace=workspace,
        is_valid=lambda artifact, artifacts: artifacts.is_complete(Path(artifact.path).parent),
        corpus=corpus,
        config=config,
        store_dir=str(workspace.store),
        artifacts=workspace.artifacts,
        units=units,
    )
    tokenizer = outcome.result
    run.record_stage("tokenizer", outcome.status)
    if kept:
        origin = f"reused from run {kept['mlflow_run_id'][:8]}"  # readable whole on the run's page
        run_logger().info(
            f"tokenizer: keeping the tokenizer of run {kept['mlflow_run_id']} so unchanged files keep their "
            "token shards; pass --retrain-tokenizer to train one on the current corpus"
        )
    else:
        origin = "trained" if outcome.status == "executed" else "cached"
    run.log_params({"tokenizer_hash": tokenizer.hash})
    run.set_tags({"gptflow.tokenizer.origin": origin})
    run.log_artifact(Path(tokenizer.path).parent, "tokenizer")
    lineage.keep_tokenizer(settings_key, {
        "stage_key": key,
        "artifact": tokenizer.to_dict(),
        "mlflow_run_id": kept["mlflow_run_id"] if kept else run.run_id,
    })
    return tokenizer
