"""Runs a killed process left RUNNING: found by the host and process they name, marked KILLED."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from mlflow import MlflowClient

from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.tracking.outbox import Outbox
from gptflow.tasks.tracking.progress import run_logger

HOST_TAG = "gptflow.host"
PID_TAG = "gptflow.pid"
"""The machine and process of a run: a RUNNING run whose process is gone was killed."""
KILLED_TAG = "gptflow.killed"
"""Why a run is KILLED: stopped by SIGTERM or Ctrl-C, or found RUNNING by a later run after its process died."""


def process_tags() -> dict[str, str | int]:
    """The tags that let a later run on this machine tell whether this run's process still lives."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: os.getpid()}


def mark_runs_of_dead_processes_killed(client: MlflowClient, experiment_ids: list[str], workspace: Workspace) -> None:
    """A process killed outright (SIGKILL, out of memory, power loss) never ends its run: mark the
    experiments' RUNNING runs of this host whose process is gone KILLED. Runs of other hosts are
    left alone, since their processes cannot be seen from here, and so are runs whose end still
    waits in their outbox."""
    host = socket.gethostname()
    stranded = client.search_runs(
        experiment_ids, filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'"
    )
    for stranded_run in stranded:
        run_id, pid = stranded_run.info.run_id, stranded_run.data.tags.get(PID_TAG, "")
        if not pid.isdigit() or _process_exists(int(pid)) or not Outbox(workspace, run_id).is_empty():
            continue
        reason = f"its process {pid} on {host} ended without ending the run (killed)"
        client.set_tag(run_id, KILLED_TAG, reason)
        client.set_terminated(run_id, status="KILLED")
        run_logger().warning(f"mlflow: run {run_id} ({stranded_run.info.run_name}) was still RUNNING, but {reason}: "
                             "marked KILLED")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """Whether the process ended and waits for its parent to reap it (an orphan's parent may never
    do so), on a system that shows it in /proc."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return status.rpartition(")")[2].split()[0] == "Z"
