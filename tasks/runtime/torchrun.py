"""Training on ``torchrun`` ranks: the launcher a stage's task calls, and the ranks' entry point.

A stage's job (``tasks.stages.training_job.TrainingJob``, ``tasks.stages.finetune_job.FinetuneJob``)
holds everything its training needs as plain JSON. ``launch_ranks`` writes it to a file and starts
``torchrun``, whose every rank runs ``python -m <the job's module> JOB.json RESULT.json``; that
module's ``__main__`` calls ``run_rank``. Rank 0 writes the result the task returns; the workers'
console lines go to the task's Prefect log.

On several machines (``tasks.runtime.rendezvous``) the head node's first rank puts the job in the
rendezvous store (``JOB_KEY``) for the other nodes' ranks, which ``gptflow train-node`` starts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections import deque
from datetime import timedelta
from pathlib import Path
from typing import Any

from gptflow.tasks.runtime.rendezvous import Rendezvous
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.tracking.progress import run_logger

JOB_KEY = "gptflow/training_job"
"""The rendezvous store's key of the job (store references for paths), set by the head's first rank."""
HEAD_NODE_KEY = "gptflow/head_node"
"""The rendezvous store's key of the head node's torchrun node rank (``GROUP_RANK``)."""
STOP_GRACE_S = 10.0
"""How long torchrun has to stop its ranks when the run is stopped."""
OUTPUT_LINES_KEPT = 200
"""torchrun's last lines, read for the reason of a failed launch (a rendezvous that never met)."""


def launch_ranks(stage: str, job: Any, nproc: int, worker_module: str) -> dict[str, Any]:
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
            try:
                for line in workers.stdout:
                    logger.info(line.rstrip())
                    last_lines.append(line)
            except BaseException:  # SIGTERM, Ctrl-C: the ranks stop with the run instead of training on
                _stop(workers)
                raise
        if workers.returncode != 0 or not result_file.exists():
            if rendezvous and (error := rendezvous.failure("".join(last_lines), workers.returncode)):
                raise error
            raise RuntimeError(f"torchrun training failed (exit code {workers.returncode}); its output is above")
        return json.loads(result_file.read_text())


def _stop(torchrun: subprocess.Popen) -> None:
    """SIGTERM to torchrun, which stops its ranks; SIGKILL if it is still there ``STOP_GRACE_S`` later."""
    torchrun.terminate()
    try:
        torchrun.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        torchrun.kill()


def run_rank(job_type: type, job_file: Path, result_file: Path) -> None:
    """A torchrun worker of the node that runs the flow: train this rank's part of the
    ``job_type`` job in ``job_file``; rank 0 writes the result for the task. On several machines,
    its first rank shares the job with the other nodes."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    job = job_type(**json.loads(job_file.read_text()))
    if getattr(job, "rendezvous", None) is not None:
        store = rendezvous_store(job.rendezvous["timeout_s"])
        if int(os.environ["LOCAL_RANK"]) == 0:
            store.set(JOB_KEY, job.published(Workspace(Path(job.workspace)).store))
            store.set(HEAD_NODE_KEY, os.environ["GROUP_RANK"])
        number_from_head_node(store)
    result = job.run(prefect_progress=False)
    if result is not None:
        result_file.write_text(json.dumps(dataclasses.asdict(result), default=str))


def rendezvous_store(timeout_s: float) -> Any:
    """A client of the store torchrun's rendezvous gave this launch (its ranks meet there too)."""
    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=timeout_s))


def number_from_head_node(store: Any) -> None:
    """Renumber this process so that the head node's ranks come first: c10d orders nodes by host
    name, and rank 0, which reports and writes, must be on the node whose flow waits for it."""
    head_node = int(store.get(HEAD_NODE_KEY).decode())
    nodes = int(os.environ["WORLD_SIZE"]) // int(os.environ["LOCAL_WORLD_SIZE"])
    node = (int(os.environ["GROUP_RANK"]) - head_node) % nodes
    os.environ["GROUP_RANK"] = str(node)
    os.environ["RANK"] = str(node * int(os.environ["LOCAL_WORLD_SIZE"]) + int(os.environ["LOCAL_RANK"]))
