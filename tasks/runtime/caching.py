"""Stage cache keys, and the one way a flow runs a stage: through Prefect's cache, with a cached
record trusted only while the artifacts it points to are complete.

A key (``stage_key``) hashes the stage's name, its config, the content hashes of its inputs and
the code version (``data.code_version``) of the modules that compute it: its task module
(``modules=(__name__,)``), plus the module of any MLflow model from code it logs, which is run
from its file rather than imported (``tasks.mlflow_models``). Per-file units (raw, tokens) are
keyed the same way inside their stage, on the code of ``data.ingest`` or ``data.tokenize``.
Downstream keys take upstream *content* hashes, so a recomputed stage whose output is
byte-identical leaves later stages cached. ``pipeline_code_version`` (every source file) is only a
tag on MLflow runs, never part of a key.

``run_stage``, under the workspace lock of the key: pulls the record (on an object-store
workspace), reads it itself (``tasks.runtime.records.read_record``: a record is data, never code)
and keeps it only while ``is_valid`` finds its artifacts complete (``data.store.ArtifactStore``,
the cheap test; content is re-hashed where it is consumed), else makes Prefect refresh the cache;
then calls the task with ``cache_key_fn`` returning the key. A second run of the same key waits
and gets ``Cached``. A record that could not be written (a full disk) is logged in one line, and
only its stage runs again next time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, TypeVar, get_type_hints

from prefect import Task

from gptflow.data.code_version import PACKAGE, code_version
from gptflow.data.disk_space import OutOfSpaceError, failed_write_path, out_of_space_error
from gptflow.data.hashing import hash_file, hash_json
from gptflow.data.store import ArtifactStore
from gptflow.tasks.runtime.records import RecordSerializer, read_record, require_type
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.tracking.progress import run_logger
from gptflow.tasks.tracking.run import PipelineRun

Result = TypeVar("Result")
StageStatus = Literal["executed", "cached"]
LAYERS = ("data", "model", "tasks", "flows")


def stage_key(stage: str, *, config: Any, modules: Iterable[str], inputs: dict[str, Any]) -> str:
    """``modules``: the names of the modules that compute the stage (its task module, and any
    module run from a file, such as an MLflow model's code); what they import is found for them."""
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    return hash_json({"stage": stage, "config": config, "code": code_version(*modules), "inputs": inputs})


def pipeline_code_version() -> str:
    """One hash of every gptflow source file, tagged on MLflow runs to tell code versions apart."""
    layers = [Path(importlib.import_module(f"{PACKAGE}.{layer}").__file__).parent for layer in LAYERS]
    return hash_json({f"{layer.name}/{path.relative_to(layer).as_posix()}": hash_file(path)
                      for layer in layers for path in sorted(layer.rglob("*.py"))})


@dataclass
class StageOutcome(Generic[Result]):
    result: Result
    status: StageStatus


class UnitManifest(Protocol):
    """A data stage's result: a manifest file listing per-source-file unit directories."""

    path: str
    units: Sequence[Any]


def units_are_committed(manifest: UnitManifest, artifacts: ArtifactStore) -> bool:
    """The ``is_valid`` of a data stage: its manifest and every unit it lists are still committed in
    ``artifacts``. Nothing is fetched: whoever reads a unit fetches what it reads, on the machine
    that reads it, so a cached stage copies no corpus to the flow's machine."""
    return artifacts.pull(Path(manifest.path)) and all(
        artifacts.are_committed(Path(unit.directory) for unit in manifest.units))


def directory_is_complete(result: Any, artifacts: ArtifactStore) -> bool:
    """The ``is_valid`` of a stage whose result names the one store ``directory`` it wrote."""
    return artifacts.is_complete(Path(result.directory))


def nothing_stored(result: Any, artifacts: ArtifactStore) -> bool:
    """The ``is_valid`` of a stage whose result is all it produced: nothing on disk to check."""
    return True


def record_unit_reuse(run: PipelineRun, stage: str, done: str, outcome: StageOutcome[UnitManifest]) -> None:
    """Record the data stage's status, and when it executed, tag ``gptflow.<stage>.files``: how
    many source files' units it computed and how many it reused (``1 ingested, 38 reused``). A
    cached stage reused them all, as its status says."""
    run.record_stage(stage, outcome.status)
    if outcome.status == "executed":
        units = outcome.result.units
        reused = sum(unit.reused for unit in units)
        counts = f"{len(units) - reused} {done}" + (f", {reused} reused" if reused else "")
        run.set_tags({f"gptflow.{stage}.files": counts})


def run_stage(
    stage_task: Task[..., Result],
    *,
    key: str,
    workspace: Workspace,
    is_valid: Callable[[Result, ArtifactStore], bool],
    recompute: bool = False,
    **parameters: Any,
) -> StageOutcome[Result]:
    """Run ``stage_task`` under ``key``; a cached result is reused only if ``is_valid(result,
    workspace.artifacts)`` says its artifacts are still whole, and never with ``recompute`` (its
    new result replaces the cached one).

    Runs that reach the same key at the same time (two pipelines on one workspace) take turns:
    the second waits for the first, then finds its result in the cache. The task's exception,
    if any, propagates to the caller; one of running out of space as an ``OutOfSpaceError`` that
    names the stage.
    """
    def report_wait() -> None:
        run_logger().info(f"{stage_task.name}: another run is computing this stage; waiting for its result")

    record = workspace.prefect_results / key
    with _naming_the_stage_when_out_of_space(stage_task.name, workspace):
        with workspace.lock(key, on_wait=report_wait, between_machines=True):
            workspace.artifacts.pull(record)
            cached_result = None if recompute else _valid_cached_result(stage_task, record, workspace, is_valid)
            configured = stage_task.with_options(
                cache_key_fn=lambda *_: key,
                result_storage=workspace.prefect_results,
                result_serializer=RecordSerializer(store=str(workspace.store)),
                persist_result=True,
                refresh_cache=cached_result is None,
            )
            state = configured(**parameters, return_state=True)
            # A cached result is the one read above, not Prefect's: the serializer Prefect builds
            # from the record does not know this workspace's store, so its paths stay references.
            cached = state.name == "Cached"
            result = cached_result if cached else state.result()
            if not cached:
                # The record names what the stage wrote: shared only once they are.
                workspace.artifacts.wait_for_uploads()
                if record.exists():  # a record that could not be written is logged, not shared
                    workspace.artifacts.share(record)
    return StageOutcome(result=result, status="cached" if cached else "executed")


@contextlib.contextmanager
def _naming_the_stage_when_out_of_space(stage: str, workspace: Workspace) -> Iterator[None]:
    """Re-raise running out of space as an ``OutOfSpaceError`` that names ``stage``, and the file
    written when the error does not name it already (else the workspace)."""
    try:
        yield
    except Exception as error:
        out_of_space = (error if isinstance(error, OutOfSpaceError)
                        else out_of_space_error(error, failed_write_path(error) or workspace.root))
        if out_of_space is None:
            raise
        raise OutOfSpaceError(f"stage {stage}: {out_of_space}", out_of_space.errno) from error


def _valid_cached_result(stage_task: Task[..., Any], record: Path, workspace: Workspace,
                         is_valid: Callable[[Any, ArtifactStore], bool]) -> Any | None:
    """The result in the stage's ``record``, if there is one to reuse; None when the stage must be
    computed: no record, one gptflow did not write for this stage (refused without running or
    importing anything it names, ``tasks.runtime.records``), or artifacts no longer complete (``is_valid``)."""
    if not record.exists():
        return None
    declared = get_type_hints(stage_task.fn)["return"]
    try:
        cached = read_record(record, workspace.store)
        require_type(cached, declared)
    except Exception as error:  # replaced, damaged, or written by an older gptflow: recomputed, whatever it holds
        run_logger().warning(f"{stage_task.name}: the cached record {record} {error}; recomputing the stage")
        return None
    return cached if is_valid(cached, workspace.artifacts) else None
