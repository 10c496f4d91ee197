"""One training run of the pretrain stage, in this process or across ``torchrun`` ranks.

A ``TrainingJob`` holds everything a training needs as plain JSON, so the training stage can run
it in-process (one device) or hand it to ``torchrun`` (``train.nproc`` > 1, ``tasks.runtime.torchrun``),
whose every rank runs ``python -m gptflow.tasks.stages.training_job JOB.json RESULT.json``. Rank 0
reports to MLflow, writes the loss curve and registers the model.

On several machines each other node's ``gptflow train-node`` starts ranks that run
``python -m gptflow.tasks.stages.training_job --join WORKSPACE``: they read the job the head's first
rank put in the rendezvous store, with its paths moved into their own copy of the workspace.
The job travels with its store paths as ``@store/`` references (``published``); each joined rank
resolves them in its own workspace (``TrainingJob.joined``), fetching the token shards and a
continued checkpoint first on an object-store workspace, or failing in one line if a shared folder
lacks them. Joined ranks never attach to the MLflow run, except for their node's system metrics
(``system/<host name>/``) when the tracking store is an ``http(s)://`` server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptflow.data.commits import copy_file_atomic, read_contents_hash
from gptflow.data.mixture import MixturePart
from gptflow.data.store import store_paths, store_references
from gptflow.data.streaming import ShardCache
from gptflow.data.tokenizer import TOKENIZER_FILE
from gptflow.model.config import ModelConfig, TrainConfig
from gptflow.model.distributed import Ranks
from gptflow.model.pretraining import Continuation, run_pretraining
from gptflow.tasks.runtime.rendezvous import RendezvousError
from gptflow.tasks.runtime.torchrun import JOB_KEY, launch_ranks, number_from_head_node, rendezvous_store, run_rank
from gptflow.tasks.runtime.workspace import Workspace, cache_limit_bytes
from gptflow.tasks.tracking.registry import pretrained_description
from gptflow.tasks.tracking.run import PipelineRun
from gptflow.tasks.tracking.training_reporter import TrainingReporter, system_metrics

REPORT_DIR = "report"


@dataclass
class TrainedModel:
    run_dir: str
    final_dir: str
    """``model.safetensors`` + ``config.json``: ``model.checkpoint.load_model`` loads it."""
    report_dir: str
    """``loss_curve.png`` + ``history.json``."""
    weights_hash: str
    """Content hash of the final model: the input key of everything evaluated on it."""
    model_config: dict
    steps: int
    tokens_seen: int
    final_train_loss: float | None
    final_val_loss: float | None
    elapsed_s: float
    trained_in_mlflow_run: str
    """The MLflow run that executed the training (later cached runs point back to it)."""
    registered_model: str
    """``name/version`` in the MLflow model registry; the version's source is that run's
    ``model`` artifact, an MLflow pyfunc model that generates text. The version is ``pending``
    while the run's outbox keeps the model (``PipelineRun.log_pyfunc_model``)."""


@dataclass
class TrainingJob:
    model_config: dict[str, Any]
    train_config: dict[str, Any]
    train_paths: list[str]
    val_paths: list[str]
    continuation: dict[str, Any] | None
    """``model.pretraining.Continuation`` fields, when continuing an earlier model."""
    run_dir: str
    tokenizer_file: str
    registered_model_name: str
    workspace: str
    tracking_uri: str
    mlflow_run_id: str
    restart: bool
    """Train from step 0, deleting the run's checkpoints, instead of resuming from the latest one."""
    mixture: list[dict[str, Any]] = field(default_factory=list)
    """``data.mixture.MixturePart`` fields, one per source of a data mixture (their shards are
    ``train_paths``, split by source); empty: ``train_paths`` are read as one stream."""
    rendezvous: dict[str, Any] | None = None
    """``tasks.runtime.rendezvous.Rendezvous`` fields when the ranks span several machines; no part of the
    training's key (how many machines hold the ``train.nproc`` ranks does not change the result)."""
    initial_weights: str | None = None
    """A model directory whose weights step 0 starts from (``--init-from``)."""
    shard_tokens: list[int] = field(default_factory=list)
    """The token count of each of ``token_paths()``, in order (the token manifest's): on an
    object-store workspace, the ranks stream the record batches of the shards they read
    (``data.streaming``), each fetched as training nears it, within ``GPTFLOW_CACHE_GB``; empty:
    each shard's footer is read first."""

    def token_paths(self) -> list[str]:
        """Every token shard the job reads: old and new training shards, and validation shards."""
        new_train_paths = self.continuation["new_train_paths"] if self.continuation else []
        return [*self.train_paths, *new_train_paths, *self.val_paths]

    def run(self, prefect_progress: bool) -> TrainedModel | None:
        """Train (this process's rank of it); rank 0 reports and returns the result, others None."""
        train_config = TrainConfig(**self.train_config)
        continuation = None if self.continuation is None else Continuation.from_json(self.continuation)
        mixture = [MixturePart.from_json(part) for part in self.mixture]
        is_main = Ranks.from_environment().is_main
        artifacts = Workspace(Path(self.workspace)).artifacts
        shard_tokens = (dict(zip(map(Path, self.token_paths()), self.shard_tokens, strict=True))
                        if self.shard_tokens else None)
        cache = ShardCache(artifacts, cache_limit_bytes()) if artifacts.mirror and shard_tokens else None
        run = PipelineRun.attach(self.workspace, self.tracking_uri, self.mlflow_run_id) if is_main else None
        reporter = TrainingReporter(run, train_config.max_steps, prefect_progress) if is_main else None
        with self._system_metrics(run), contextlib.closing(cache) if cache else contextlib.nullcontext():
            result = run_pretraining(
                ModelConfig(**self.model_config), train_config, [Path(p) for p in self.train_paths],
                [Path(p) for p in self.val_paths], Path(self.run_dir), callback=reporter, resume=not self.restart,
                continuation=continuation, mixture=mixture,
                initial_weights=Path(self.initial_weights) if self.initial_weights else None, artifacts=artifacts,
                verify_shards=True, shard_tokens=shard_tokens, shard_cache=cache,
            )
        if reporter is None:
            return None
        run.set_tags({"gptflow.precision": result.precision})
        if result.resumed_from_step is not None:
            run.set_tags({"gptflow.resumed_from_step": result.resumed_from_step})
        if result.peak_memory_bytes is not None:
            reporter.metrics.add(result.steps, {"train/peak_memory_gib": result.peak_memory_bytes / 2**30})
        reporter.metrics.flush()
        with artifacts.commit(Path(self.run_dir) / REPORT_DIR) as report_dir:
            reporter.write_report(report_dir)
        # Beside checkpoints/ and final/, so a checkpoint directory alone names its tokenizer.
        copy_file_atomic(Path(self.tokenizer_file), Path(self.run_dir) / TOKENIZER_FILE)
        artifacts.share(Path(self.run_dir) / TOKENIZER_FILE)
        description = pretrained_description(ModelConfig(**self.model_config), result.steps, result.tokens_seen)
        registered_model = run.log_text_generator(result.final_dir, Path(self.tokenizer_file),
                                                  self.registered_model_name, description)
        return TrainedModel(
            run_dir=self.run_dir, final_dir=str(result.final_dir), report_dir=str(Path(self.run_dir) / REPORT_DIR),
            weights_hash=read_contents_hash(result.final_dir), model_config=self.model_config, steps=result.steps,
            tokens_seen=result.tokens_seen, final_train_loss=result.final_train_loss,
            final_val_loss=result.final_val_loss, elapsed_s=result.elapsed_s,
            trained_in_mlflow_run=self.mlflow_run_id, registered_model=registered_model,
        )

    def _system_metrics(self, run: PipelineRun | None) -> contextlib.AbstractContextManager[None]:
        """The machine's metrics while training: rank 0's, and on several machines also those of
        each other node's first rank when the tracking store is a server every node reaches, each
        under ``system/<host name>/``."""
        ranks = Ranks.from_environment()
        several_machines = self.rendezvous is not None
        node_id = socket.gethostname() if several_machines else None
        if run is not None:
            return system_metrics(run.run_id, self.tracking_uri, node_id)
        if several_machines and ranks.local_rank == 0 and self.tracking_uri.startswith(("http://", "https://")):
            return system_metrics(self.mlflow_run_id, self.tracking_uri, node_id)
        return contextlib.nullcontext()

    def run_with_torchrun(self, nproc: int) -> TrainedModel:
        """Launch ``nproc`` ranks on this machine, or this machine's share of them on several, and
        wait; their output goes to the run log."""
        return TrainedModel(**launch_ranks("pretrain", self, nproc, worker_module=__name__))

    def published(self, store: Path) -> str:
        """The job as the other nodes read it: paths inside ``store`` as store references."""
        return json.dumps(store_references(dataclasses.asdict(self), store))

    @classmethod
    def joined(cls, published: str, workspace: Workspace) -> TrainingJob:
        """The head's job on this node: its paths in this node's copy of the workspace, and the
        token shards and tokenizer there (fetched first on an object-store workspace, but for
        the shards the ranks stream: the first one's only, to tell a wrong workspace)."""
        job = cls(**store_paths(json.loads(published), workspace.store))
        checkpoint = [job.continuation["checkpoint"]] if job.continuation else []
        shards = job.token_paths()[:1] if workspace.artifacts.mirror and job.shard_tokens else job.token_paths()
        directories = sorted({*(str(Path(path).parent) for path in shards), *checkpoint})
        whole = workspace.artifacts.are_complete(map(Path, directories))
        missing = [directory for directory, is_whole in zip(directories, whole) if not is_whole]
        if missing:
            raise RendezvousError(f"this node's workspace {workspace.url or workspace.root} lacks {missing[0]} (and "
                                  f"{len(missing) - 1} more) that the head node trains on: give train-node the head's "
                                  "--workspace, a folder mounted at the same place on every node or the same s3:// URL.")
        return job


def _join_rank(workspace_setting: str | None) -> None:
    """A torchrun worker of another node (``gptflow train-node``): train this rank's part of the
    job the head node shares; nothing is logged to MLflow or written but by rank 0, on the head."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    store = rendezvous_store(float(os.environ.get("GPTFLOW_RDZV_TIMEOUT", 900)))
    published = store.get(JOB_KEY).decode()
    number_from_head_node(store)
    job = TrainingJob.joined(published, Workspace.resolve(workspace_setting))
    job.run(prefect_progress=False)


if __name__ == "__main__":
    if sys.argv[1] == "--join":
        _join_rank(sys.argv[2] if len(sys.argv) > 2 else None)
    else:
        run_rank(TrainingJob, Path(sys.argv[1]), Path(sys.argv[2]))
