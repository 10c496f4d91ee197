"""One training run of the pretrain stage, in this process or across ``torchrun`` ranks, and what
every stage that trains shares: the launcher, the ranks' entry point and the reporter.

A ``TrainingJob`` holds everything a training needs as plain JSON, so the pretrain task can run
it in-process (one device) or hand it to ``torchrun`` (``train.nproc`` > 1), whose every rank runs
``python -m gptflow.tasks.training_job JOB.json RESULT.json``. Rank 0 reports to MLflow, writes the loss
curve and registers the model; the task forwards the workers' console lines to its Prefect log.

On several machines (``TrainingJob.rendezvous``, ``tasks.rendezvous``) the task's torchrun joins a
c10d rendezvous, and each other node's ``gptflow train-node`` starts ranks that run
``python -m gptflow.tasks.training_job --join WORKSPACE``: they read the job the head's first rank
put in the rendezvous store, with its paths moved into their own copy of the workspace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from datetime import timedelta
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from gptflow.data.mixture import MixturePart
from gptflow.data.store import (
    are_complete,
    atomic_directory,
    copy_file_atomic,
    read_contents_hash,
    share_file,
    store_paths,
    store_references,
)
from gptflow.data.tokenizer import TOKENIZER_FILE
from gptflow.model.config import ModelConfig, TrainConfig
from gptflow.model.distributed import Ranks
from gptflow.model.train import Continuation, pretrain
from gptflow.tasks.progress import human_count, human_duration, run_logger
from gptflow.tasks.rendezvous import Rendezvous, RendezvousError
from gptflow.tasks.tracking import BufferedMetrics, PipelineRun
from gptflow.tasks.workspace import Workspace

REPORT_DIR = "report"
JOB_KEY = "gptflow/training_job"
"""The rendezvous store's key of the job (store references for paths), set by the head's first rank."""
HEAD_NODE_KEY = "gptflow/head_node"
"""The rendezvous store's key of the head node's torchrun node rank (``GROUP_RANK``)."""
OUTPUT_LINES_KEPT = 200
"""torchrun's last lines, read for the reason of a failed launch (a rendezvous that never met)."""


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
    """``model.train.Continuation`` fields, when continuing an earlier model."""
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
    """``tasks.rendezvous.Rendezvous`` fields when the ranks span several machines; no part of the
    training's key (how many machines hold the ``train.nproc`` ranks does not change the result)."""
    initial_weights: str | None = None
    """A model directory whose weights step 0 starts from (``--init-from``)."""

    def token_paths(self) -> list[str]:
        """Every token shard the job reads: old and new training shards, and validation shards."""
        new_train_paths = self.continuation["new_train_paths"] if self.continuation else []
        return [*self.train_paths, *new_train_paths, *self.val_paths]

    def run(self, prefect_progress: bool) -> TrainedModel | None:
        """Train (this process's rank of it); rank 0 reports and returns the result, others None."""
        train_config = TrainConfig(**self.train_config)
        continuation = None if self.continuation is None else Continuation(
            checkpoint=Path(self.continuation["checkpoint"]),
            new_train_paths=[Path(path) for path in self.continuation["new_train_paths"]],
            new_data_fraction=self.continuation["new_data_fraction"],
        )
        mixture = [MixturePart(part["source"], part["probability"], [Path(path) for path in part["train_paths"]])
                   for part in self.mixture]
        is_main = Ranks.from_environment().is_main
        run = PipelineRun.attach(self.workspace, self.tracking_uri, self.mlflow_run_id) if is_main else None
        reporter = TrainingReporter(run, train_config.max_steps, prefect_progress) if is_main else None
        with self._system_metrics(run):
            result = pretrain(
                ModelConfig(**self.model_config), train_config, [Path(p) for p in self.train_paths],
                [Path(p) for p in self.val_paths], Path(self.run_dir), callback=reporter, resume=not self.restart,
                continuation=continuation, mixture=mixture,
                initial_weights=Path(self.initial_weights) if self.initial_weights else None,
            )
        if reporter is None:
            return None
        if result.resumed_from_step is not None:
            run.set_tags({"gptflow.resumed_from_step": result.resumed_from_step})
        if result.peak_memory_bytes is not None:
            reporter.metrics.add(result.steps, {"train/peak_memory_gib": result.peak_memory_bytes / 2**30})
        reporter.metrics.flush()
        with atomic_directory(Path(self.run_dir) / REPORT_DIR) as report_dir:
            reporter.write_report(report_dir)
        # Beside checkpoints/ and final/, so a checkpoint directory alone names its tokenizer.
        copy_file_atomic(Path(self.tokenizer_file), Path(self.run_dir) / TOKENIZER_FILE)
        share_file(Path(self.run_dir) / TOKENIZER_FILE)
        registered_model = run.log_text_generator(result.final_dir, Path(self.tokenizer_file), self.registered_model_name)
        return TrainedModel(
            run_dir=self.run_dir,
            final_dir=str(result.final_dir),
            report_dir=str(Path(self.run_dir) / REPORT_DIR),
            weights_hash=read_contents_hash(result.final_dir),
            model_config=self.model_config,
            steps=result.steps,
            tokens_seen=result.tokens_seen,
            final_train_loss=result.final_train_loss,
            final_val_loss=result.final_val_loss,
            elapsed_s=result.elapsed_s,
            trained_in_mlflow_run=self.mlflow_run_id,
            registered_model=registered_model,
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
        return TrainedModel(**launch_ranks("pretrain", self, nproc))

    def published(self, store: Path) -> str:
        """The job as the other nodes read it: paths inside ``store`` as store references."""
        return json.dumps(store_references(dataclasses.asdict(self), store))

    @classmethod
    def joined(cls, published: str, workspace: Workspace) -> TrainingJob:
        """The head's job on this node: its paths in this node's copy of the workspace, and the
        token shards and tokenizer there (fetched first on an object-store workspace)."""
        job = cls(**store_paths(json.loads(published), workspace.store))
        checkpoint = [job.continuation["checkpoint"]] if job.continuation else []
        directories = sorted({*(str(Path(path).parent) for path in job.token_paths()), *checkpoint})
        missing = [directory for directory, whole in zip(directories, are_complete(map(Path, directories)))
                   if not whole]
        if missing:
            raise RendezvousError(f"this node's workspace {workspace.url or workspace.root} lacks {missing[0]} (and "
                                  f"{len(missing) - 1} more) that the head node trains on: give train-node the head's "
                                  "--workspace, a folder mounted at the same place on every node or the same s3:// URL.")
        return job


def launch_ranks(stage: str, job: Any, nproc: int, worker_module: str = __name__) -> dict[str, Any]:
    """Run ``job`` (a ``TrainingJob``, or another stage's job with ``run`` and ``rendezvous``-free
    fields) on ``nproc`` torchrun ranks, each running ``python -m worker_module JOB.json
    RESULT.json`` (``run_rank``); on several machines, this machine's share of them. Waits, its
    output going to the run log; returns what rank 0's ``run`` returned, as JSON."""
    logger = run_logger()
    rendezvous = Rendezvous(**job.rendezvous) if getattr(job, "rendezvous", None) else None
    with tempfile.TemporaryDirectory(prefix="gptflow-job-") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(dataclasses.asdict(job)))
        if rendezvous is None:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
            logger.info(f"{stage}: launching {nproc} processes: {' '.join(launcher[1:])}")
        else:
            launcher = rendezvous.torchrun_command()
            logger.info(f"{stage}: launching {rendezvous.nproc_per_node} of {nproc} processes here; waiting up to "
                        f"{rendezvous.timeout_s:g} s for the other {rendezvous.nnodes - 1} node(s) to join at "
                        f"{rendezvous.endpoint} (gptflow train-node --nnodes {rendezvous.nnodes} --nproc-per-node "
                        f"{rendezvous.nproc_per_node} --rdzv-endpoint {rendezvous.endpoint} on each)")
        command = [*launcher, "-m", worker_module, str(job_file), str(result_file)]
        last_lines: deque[str] = deque(maxlen=OUTPUT_LINES_KEPT)
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as workers:
            for line in workers.stdout:
                logger.info(line.rstrip())
                last_lines.append(line)
        if workers.returncode != 0 or not result_file.exists():
            if rendezvous and (error := rendezvous.failure("".join(last_lines), workers.returncode)):
                raise error
            raise RuntimeError(f"torchrun training failed (exit code {workers.returncode}); its output is above")
        return json.loads(result_file.read_text())


class TrainingReporter:
    """The training loop's callback, for pretraining and fine-tuning alike: batched MLflow metrics,
    console progress (lines begin with ``stage``), loss history."""

    def __init__(self, run: PipelineRun, max_steps: int, prefect_progress: bool, stage: str = "pretrain") -> None:
        self.metrics = BufferedMetrics(run)
        self.max_steps = max_steps
        self.stage = stage
        self.logger = run_logger()
        self.started = time.monotonic()
        self.first_step: int | None = None
        self.history: dict[str, list[tuple[int, float]]] = {"train/loss": [], "val/loss": []}
        # A torchrun worker has no Prefect run to attach an artifact to; its lines reach the
        # Prefect logs through the task that launched it.
        self.progress_artifact = (
            create_progress_artifact(progress=0.0, description=f"{stage}: starting") if prefect_progress else None
        )

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.add(step, metrics)
        for name, series in self.history.items():
            if name in metrics:
                series.append((step, metrics[name]))
        if self.first_step is None:
            self.first_step, self.started = step, time.monotonic()
            eta = ""
        else:
            seconds_per_step = (time.monotonic() - self.started) / (step - self.first_step)
            eta = f" · ETA {human_duration(seconds_per_step * (self.max_steps - step))}"
        parts = [f"step {step}/{self.max_steps}"]
        if "train/loss" in metrics:
            parts.append(f"loss {metrics['train/loss']:.3f}")
        if "val/loss" in metrics:
            parts.append(f"val {metrics['val/loss']:.3f}")
        if "val/accuracy" in metrics:
            parts.append(f"val acc {metrics['val/accuracy']:.3f}")
        if "train/lr" in metrics:
            parts.append(f"lr {metrics['train/lr']:.2e}")
        if "train/tokens_per_sec" in metrics:
            parts.append(f"{human_count(metrics['train/tokens_per_sec'])} tok/s")
        if "train/mfu" in metrics:
            parts.append(f"MFU {metrics['train/mfu']:.1%}")
        line = f"{self.stage}: " + " · ".join(parts) + eta
        self.logger.info(line)
        if self.progress_artifact:
            update_progress_artifact(self.progress_artifact, progress=100.0 * step / self.max_steps, description=line)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.logger.info(f"{self.stage}: checkpoint of step {step} saved to {path}")

    def on_resume(self, step: int, path: Path) -> None:
        self.logger.info(f"{self.stage}: resuming from step {step} (checkpoint {path}, left by an earlier attempt at "
                         "these exact settings; --restart trains from step 0)")

    def on_unusable_checkpoint(self, path: Path, error: Exception, fallback: Path | None) -> None:
        instead = f"trying {fallback.name} instead" if fallback else "training from step 0"
        self.logger.warning(f"{self.stage}: cannot resume from checkpoint {path}, {instead}: {error}")

    def write_report(self, directory: Path, y_label: str = "cross-entropy (nats/token)") -> None:
        (directory / "history.json").write_text(json.dumps(self.history, indent=1))
        plot_loss_curve(self.history, directory / "loss_curve.png", y_label)


def plot_loss_curve(
    history: dict[str, list[tuple[int, float]]], path: Path, y_label: str = "cross-entropy (nats/token)"
) -> None:
    """Each series of ``history`` (name → (step, value)) as a line, validation ones with markers."""
    import matplotlib

    matplotlib.use("Agg")  # no display; and never pick an interactive backend inside a worker
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=110)
    for name, series in history.items():
        if series:
            steps, values = zip(*series)
            axes.plot(steps, values, label=name, marker="o" if "val" in name else None)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(y_label)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


@contextlib.contextmanager
def system_metrics(run_id: str, tracking_uri: str, node_id: str | None) -> Iterator[None]:
    """GPU utilisation, memory and power (and CPU, RAM) as MLflow ``system/*`` metrics while
    training, when the optional nvidia-ml-py and psutil are installed (``pip install gptflow[gpu]``);
    ``system/<node_id>/*`` with a ``node_id``, so that several machines' metrics stay apart."""
    if not all(importlib.util.find_spec(module) for module in ("pynvml", "psutil")):
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, tracking_uri=tracking_uri, node_id=node_id)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def run_rank(job_type: type, job_file: Path, result_file: Path) -> None:
    """A torchrun worker of the node that runs the flow: train this rank's part of the
    ``job_type`` job in ``job_file``; rank 0 writes the result for the task. On several machines,
    its first rank shares the job with the other nodes."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    job = job_type(**json.loads(job_file.read_text()))
    if getattr(job, "rendezvous", None) is not None:
        store = _rendezvous_store(job.rendezvous["timeout_s"])
        if int(os.environ["LOCAL_RANK"]) == 0:
            store.set(JOB_KEY, job.published(Workspace(Path(job.workspace)).store))
            store.set(HEAD_NODE_KEY, os.environ["GROUP_RANK"])
        _number_from_head_node(store)
    result = job.run(prefect_progress=False)
    if result is not None:
        result_file.write_text(json.dumps(dataclasses.asdict(result), default=str))


def _join_rank(workspace_setting: str | None) -> None:
    """A torchrun worker of another node (``gptflow train-node``): train this rank's part of the
    job the head node shares; nothing is logged to MLflow or written but by rank 0, on the head."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    store = _rendezvous_store(float(os.environ.get("GPTFLOW_RDZV_TIMEOUT", 900)))
    published = store.get(JOB_KEY).decode()
    _number_from_head_node(store)
    job = TrainingJob.joined(published, Workspace.resolve(workspace_setting))
    job.run(prefect_progress=False)


def _rendezvous_store(timeout_s: float) -> Any:
    """A client of the store torchrun's rendezvous gave this launch (its ranks meet there too)."""
    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=timeout_s))


def _number_from_head_node(store: Any) -> None:
    """Renumber this process so that the head node's ranks come first: c10d orders nodes by host
    name, and rank 0, which reports and writes, must be on the node whose flow waits for it."""
    head_node = int(store.get(HEAD_NODE_KEY).decode())
    nodes = int(os.environ["WORLD_SIZE"]) // int(os.environ["LOCAL_WORLD_SIZE"])
    node = (int(os.environ["GROUP_RANK"]) - head_node) % nodes
    os.environ["GROUP_RANK"] = str(node)
    os.environ["RANK"] = str(node * int(os.environ["LOCAL_WORLD_SIZE"]) + int(os.environ["LOCAL_RANK"]))


if __name__ == "__main__":
    if sys.argv[1] == "--join":
        _join_rank(sys.argv[2] if len(sys.argv) > 2 else None)
    else:
        run_rank(TrainingJob, Path(sys.argv[1]), Path(sys.argv[2]))
