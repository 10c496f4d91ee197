"""``gptflow worker``: a training machine runs the team's deployment runs, from a Prefect work pool.

The deployments of ``prefect.yaml`` (``prefect deploy --all``) send their runs to the ``process``
work pool ``WORK_POOL``; a worker on each training machine starts each run as a process there.
This command is Prefect's own ``prefect worker start --pool`` with what a team needs around it,
so that no machine is set up by hand and differently:

- the work pool exists (created as Prefect's ``prefect work-pool create --type process`` would);
- every flow run it starts sends a heartbeat every ``HEARTBEAT_S`` seconds, and Prefect's
  documented automation for zombie flow runs exists (``ZOMBIE_AUTOMATION``): a run whose
  heartbeats stop for ``SILENCE_S`` seconds (its machine died, its worker was killed) is marked
  Crashed, not left Running for ever;
- the worker, and so each run, has gptflow's login (``gptflow login``) and workspace.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import NoReturn

from gptflow.data.errors import UserError

WORK_POOL = "gptflow"
"""The pool prefect.yaml's deployments name."""
HEARTBEAT_S = 30
"""Seconds between a flow run's heartbeats: the shortest Prefect takes."""
SILENCE_S = 90
"""Seconds without a heartbeat after which a flow run is marked Crashed (Prefect's documented
automation: three missed heartbeats, so a busy machine's late one is no false alarm)."""
ZOMBIE_AUTOMATION = "gptflow: mark flow runs Crashed when their heartbeats stop"


class WorkerError(UserError):
    """The worker cannot start as asked; the message says what to do."""


def start_worker(pool: str, name: str | None) -> NoReturn:
    """Make sure the pool and the automation exist, then become Prefect's worker of ``pool``
    (by exec: Ctrl-C and SIGTERM reach it as they would ``prefect worker start``)."""
    # Before Prefect is imported, which reads its settings once; a value the user set wins.
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_S))
    from prefect.settings import get_current_settings

    api_url = get_current_settings().api.url
    if not api_url:
        raise WorkerError("A worker needs the team's Prefect server: run `gptflow login`, set PREFECT_API_URL, or run "
                          "it where `gptflow up` runs for --workspace.")
    created = [what for what, made in ((f"the process work pool {pool}", ensure_work_pool(pool)),
                                       (f"the automation {ZOMBIE_AUTOMATION!r}", ensure_zombie_automation()))
               if made]
    if created:
        print(f"gptflow worker: created {' and '.join(created)} on {api_url}", flush=True)
    print(f"gptflow worker: running the flow runs of the work pool {pool} on this machine until Ctrl-C; their "
          f"heartbeats every {os.environ['PREFECT_FLOWS_HEARTBEAT_FREQUENCY']} s, and a run silent for {SILENCE_S} s "
          "is marked Crashed", flush=True)
    # prefect.yaml's pull step finds gptflow's folder with the `python` first on PATH: this one.
    bin_folder = os.path.dirname(sys.executable)
    os.environ["PATH"] = os.pathsep.join([bin_folder, os.environ.get("PATH", "")])
    prefect = os.path.join(bin_folder, "prefect")
    command = [prefect, "worker", "start", "--pool", pool, "--type", "process"] + (["--name", name] if name else [])
    os.execv(prefect, command)  # its environment is this one: the login's credentials never in its arguments


def ensure_work_pool(pool: str) -> bool:
    """Create the ``process`` work pool ``pool`` unless it exists; whether it was created."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            existing = client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type=ProcessWorker.type,
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
            return True
    if existing.type != ProcessWorker.type:
        raise WorkerError(f"The work pool {pool} on the Prefect server is of type {existing.type}, not process: "
                          "name another with --pool (and in prefect.yaml), or delete it with "
                          f"`prefect work-pool delete {pool}`.")
    return False


def ensure_zombie_automation() -> bool:
    """Create ``ZOMBIE_AUTOMATION`` unless an automation of that name exists; whether it was created.
    It is Prefect's own recipe: after each heartbeat of a flow run, expect another heartbeat or
    the run's end within ``SILENCE_S`` seconds, else change the run's state to Crashed."""
    from prefect import get_client
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    with get_client(sync_client=True) as client:
        if client.read_automations_by_name(ZOMBIE_AUTOMATION):
            return False
    ends = {f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")}
    Automation(
        name=ZOMBIE_AUTOMATION,
        description=f"A flow run that sends no heartbeat for {SILENCE_S} s has lost its process: its worker or "
                    "machine died. Created by `gptflow worker`.",
        trigger=EventTrigger(
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.heartbeat", *ends},
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=SILENCE_S)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"No heartbeat for {SILENCE_S} s: its worker or machine stopped. Run the "
                                            "deployment again to resume from its checkpoints.")],
    ).create()
    return True
