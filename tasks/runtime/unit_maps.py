"""Where the data stages' per-file units run: in the stage's process, or, with ``--ray``, on a Ray
cluster through ``prefect-ray``, each unit a Prefect task run of its own.

The data layer composes a stage from unit functions and a ``data.units.MapUnits``; this module
supplies the map. Without Ray the units run in the stage's process: Prefect's process pool was
tried and measured 4.6x slower on a 2-core machine (bench/RESULTS.md: starting workers and a task
run per file cost more than the parallelism saved); a local Ray cluster (``ray start --head``,
then ``--ray auto``) is how one machine's cores join in. Ray runs a stage's units on whatever nodes
the cluster has; each node must reach the workspace's store (a folder every node mounts, or the
object store of an ``s3://`` workspace, with credentials of its own) and import gptflow
(installed as on this machine).

On Ray, each unit to compute is a Prefect task run named after its unit function
(``ingest-unit``, ``sample-candidates``, ``segment-texts``, ``tokenize-units``, ...) and its file,
submitted to ``prefect_ray.RayTaskRunner``; units already in the store are read back in the
stage's process. The address is checked first (``tasks.runtime.ray_address``), and workers report
to the flow's Prefect API (``workers_report_to_this_api``). A unit run here reports progress as it
goes, one run elsewhere when it ends.

On paper, a 10 TB corpus, from the rates bench/RESULTS.md measured on a 2-core machine (tokenize
about 1.7 MB/s per worker with one thread; ingest about 10 MB/s per core), is about 6 million
core-seconds of tokenizing (roughly 27 hours on one 64-core node, 3.5 on eight) and a third of
that to ingest. Units are per file, so such a corpus should come as files of 100 MB to 1 GB:
10,000 to 100,000 units, each a task run of a few state writes, which a Prefect server on
PostgreSQL (not SQLite) carries. What stays on the head is each stage's assembly
(``data.ingest``: manifest and cross-file dedup).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prefect import Task, get_client
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

from gptflow.data.mirror import ObjectStoreMirror
from gptflow.data.store import ArtifactStore
from gptflow.data.units import PROGRESS_ARGUMENT, MapUnits, in_this_process


@dataclass(frozen=True)
class UnitRunner:
    """How a flow runs data units: on the Ray cluster at ``ray_address`` (``--ray``), else here."""

    ray_address: str | None = None

    def for_stage(self, stage: str, artifacts: ArtifactStore, label: Callable[[dict[str, Any]], str]) -> MapUnits:
        """The map that runs ``stage``'s units, which commit into ``artifacts``; ``label(call)``
        names a unit's task run (its source file)."""
        if self.ray_address is None:
            return in_this_process
        return lambda function, calls: self._on_ray(stage, _on_worker(function, artifacts), calls, label)

    def _on_ray(self, stage: str, function: Callable[..., Any], calls: list[dict[str, Any]],
                label: Callable[[dict[str, Any]], str]) -> Iterator[Any]:
        if not calls:
            return
        from prefect_ray import RayTaskRunner  # an optional extra: imported only when asked for

        unit_task = Task(function, name=function.__name__.replace("_", "-"), cache_policy=NO_CACHE,
                         persist_result=False)
        with workers_report_to_this_api(), RayTaskRunner(address=self.ray_address) as runner:
            futures = [runner.submit(unit_task.with_options(task_run_name=f"{stage} {label(call)}"),
                                     {name: value for name, value in call.items() if name != PROGRESS_ARGUMENT})
                       for call in calls]
            for future in futures:
                yield future.result()


def _on_worker(function: Callable[..., Any], artifacts: ArtifactStore) -> Callable[..., Any]:
    """``function`` as a worker runs it. In a workspace on an object store, the worker's machine
    first gets the mirror folder (at the same path as here), so the unit's directories are written
    there and published to the object store, whichever node runs it."""
    if artifacts.mirror is None:
        return function

    @functools.wraps(function)
    def in_mirror(**call: Any) -> Any:
        ObjectStoreMirror.attach(artifacts.mirror.local_root, artifacts.mirror.url)
        result = function(**call)
        artifacts.wait_for_uploads()  # a worker lives on after its unit: its uploads end with the unit
        return result

    return in_mirror


@contextlib.contextmanager
def workers_report_to_this_api() -> Iterator[None]:
    """Workers get the Prefect API from the settings they are given: name the one this process
    uses, even when it is the temporary server Prefect started here (else each worker would start
    a temporary server of its own, and its task runs would show nowhere). Worker processes started
    here meanwhile also have it in their environment, which their threads outside a run's
    context read."""
    api_url = get_current_settings().api.url
    if not api_url:
        with get_client(sync_client=True) as client:
            api_url = str(client.api_url)
    previous = os.environ.get(PREFECT_API_URL.name)
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        os.environ[PREFECT_API_URL.name] = api_url
        try:
            yield
        finally:
            if previous is None:
                del os.environ[PREFECT_API_URL.name]
            else:
                os.environ[PREFECT_API_URL.name] = previous
