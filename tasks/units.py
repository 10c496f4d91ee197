"""Where the data stages' per-file units run: in this process, on local worker processes, or on a
Ray cluster through ``prefect-ray``; each unit a Prefect task run of its own outside this process.

The data layer composes a stage from unit functions and a ``data.units.MapUnits``; this module
supplies the map. A small stage (little to compute) runs in this process: starting worker
processes, or a task run per unit, costs more than it saves there. Ray runs the units of a stage
on whatever nodes the cluster has; each node must reach the workspace's store (today a folder
every node mounts) and import gptflow (installed as on this machine).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prefect import Task, get_client
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner

from gptflow.data.units import MapUnits, in_this_process
from gptflow.tasks.ray_address import resolve_ray_address

LOCAL_POOL_MIN_BYTES = 32 * 1024 * 1024
"""Below this much source text to compute, a stage's units run in this process."""


@dataclass(frozen=True)
class UnitRunner:
    """How a flow runs data units: ``ray_address`` (``--ray``), else local worker processes."""

    ray_address: str | None = None

    @classmethod
    def from_setting(cls, ray_address: str | None) -> UnitRunner:
        """``ray_address``, else ``$GPTFLOW_RAY_ADDRESS``; checked at once, before any stage runs."""
        return cls(resolve_ray_address(ray_address))

    def for_stage(self, stage: str, work_bytes: int, label: Callable[[dict[str, Any]], str]) -> MapUnits:
        """The map that runs ``stage``'s units, given how many bytes they compute; ``label(call)``
        names a unit's task run (its source file)."""
        if self.ray_address is None and (work_bytes < LOCAL_POOL_MIN_BYTES or (os.cpu_count() or 1) < 2):
            return in_this_process
        return lambda function, calls: self._map(stage, function, calls, label)

    def _map(self, stage: str, function: Callable[..., Any], calls: list[dict[str, Any]],
             label: Callable[[dict[str, Any]], str]) -> Iterator[Any]:
        if not calls:
            return
        unit_task = Task(function, name=function.__name__.replace("_", "-"), cache_policy=NO_CACHE,
                         persist_result=False)
        with _workers_report_to_this_api(), self._task_runner(len(calls)) as runner:
            futures = [runner.submit(unit_task.with_options(task_run_name=f"{stage} {label(call)}"), call)
                       for call in calls]
            for future in futures:
                yield future.result()

    def _task_runner(self, n_calls: int) -> TaskRunner:
        if self.ray_address is None:
            return ProcessPoolTaskRunner(max_workers=min(n_calls, os.cpu_count() or 1))
        from prefect_ray import (
            RayTaskRunner,  # an optional extra: imported only when asked for
        )

        return RayTaskRunner(address=self.ray_address)


@contextlib.contextmanager
def _workers_report_to_this_api() -> Iterator[None]:
    """Workers get the Prefect API from the settings they are given: name the one this process
    uses, even when it is the temporary server Prefect started here (else each worker would start
    a temporary server of its own, and its task runs would show nowhere)."""
    if get_current_settings().api.url:
        yield
        return
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url)
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        yield
