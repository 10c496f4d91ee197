"""The MLflow run of a flow run: one run per flow run, every config field a param, stage tags,
metrics in batches, the run's models; its writes go through the run's outbox
(``tasks.tracking.outbox``), so a tracking server that goes away never stops the flow.

All logging goes through ``MlflowClient`` with an explicit run id rather than MLflow's fluent
"active run", because Prefect may run tasks on other threads than the flow.

Conventions: the run is named as its Prefect flow run (``tasks.tracking.naming.run_name``: what
was set differently first), and its description links that flow run (tags ``prefect.flow_run_id``
and, when a Prefect UI serves it, ``prefect.flow_run_url``). Params are every setting
(``section.field``) and the counts that never change within a run (``dataset.*``,
``model.trainable_parameters``), so the charts start with the curves; metrics are the per-step
curves and the final ``eval/*`` figures, the latter also attached to the logged model so MLflow's
Models tab shows them. A run that reads a corpus logs it as a dataset input (``log_dataset``,
from ``tasks.stages.tokenize.log_corpus_dataset``). Each run is tagged with its host and process
(``tasks.tracking.killed_runs``), so a later run on the machine marks one a killed process left
RUNNING as KILLED; two runs logging the same new dataset at once race on the SQL store's insert,
and the loser's ``log_inputs`` is retried (``tasks.tracking.operations``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run

from gptflow.data.commits import read_contents_hash
from gptflow.data.disk_space import out_of_space_errno
from gptflow.model.config import SamplingConfig
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.tracking.experiments import existing_experiment_ids, experiment_id, refusal_of
from gptflow.tasks.tracking.killed_runs import KILLED_TAG, mark_runs_of_dead_processes_killed, process_tags
from gptflow.tasks.tracking.operations import OperationSender
from gptflow.tasks.tracking.outbox import Outbox, OutboxedWriter, OutboxReport, first_line, send_outboxes
from gptflow.tasks.tracking.progress import run_logger
from gptflow.tasks.tracking.registry import GENERATOR_MODULE, PENDING_VERSION
from gptflow.tasks.tracking.runs_view import run_address, runs_table_address
from gptflow.tasks.tracking.server import permission_denied, server_unreachable

STAGE_TAG_PREFIX = "gptflow.stage."
MLFLOW_PARENT_RUN_TAG = "mlflow.parentRunId"
"""MLflow nests a run under the run this tag names (the UI's expandable rows)."""
# MLflow's log_batch limits: 100 params/tags and 1000 metrics per call.
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
LOCAL_UI = "http://127.0.0.1:5000"
"""Where ``mlflow ui`` serves the workspace's own store by default."""


class PipelineRun:
    """The MLflow run of one flow run; the flow and its tasks log through it."""

    def __init__(self, client: MlflowClient, run_id: str, outbox: Outbox, name: str = "",
                 experiment_id: str = "", workflow: str = "", description: str = "") -> None:
        self.client = client
        self.run_id = run_id
        self.outbox = outbox
        self.name = name
        self.experiment_id = experiment_id
        self.workflow = workflow
        """The kind of work (``tasks.tracking.experiments.WORKFLOWS``), whose experiment holds the run."""
        self.description = description
        """The run's description (markdown) as this object last set it."""
        self.dataset: list[str] | None = None
        """``[name, digest]`` of the dataset this run logged last (``log_dataset``): the metrics it
        attaches to a model were measured on it, and the model's page lists it."""
        self.stage_statuses: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.writer = OutboxedWriter(outbox, OperationSender(client, run_id))

    @classmethod
    def attach(cls, workspace_root: str, tracking_uri: str, run_id: str) -> PipelineRun:
        """The same run, from another thread or process (tasks receive these three)."""
        return cls(MlflowClient(tracking_uri), run_id, Outbox(Workspace(Path(workspace_root)), run_id))

    def log_params(self, params: dict[str, Any]) -> None:
        entries = [[key, _param_value(value)] for key, value in sorted(params.items())]
        for start in range(0, len(entries), PARAMS_PER_BATCH):
            self.writer.write({"kind": "log_batch", "params": entries[start:start + PARAMS_PER_BATCH]})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.tags.update({key: str(value) for key, value in tags.items()})
        entries = [[key, str(value)] for key, value in tags.items()]
        for start in range(0, len(entries), PARAMS_PER_BATCH):
            self.writer.write({"kind": "log_batch", "tags": entries[start:start + PARAMS_PER_BATCH]})

    def stored_tag(self, key: str) -> str | None:
        """The tag ``key`` as the run holds it, whichever process set it (a training job tags the
        run from its own): waiting in the outbox, else in the tracking store, which is not asked
        while the outbox holds writes (its server is away)."""
        with self.outbox.lock():
            if not self.outbox.is_empty():
                return self.outbox.waiting_tags().get(key)
        return self.client.get_run(self.run_id).data.tags.get(key)

    def store_holds_run(self, run_id: str) -> bool | None:
        """Whether the tracking store holds the run ``run_id`` (a store lost and made anew holds
        none of the runs before); None when it cannot be asked: this run's writes wait in its
        outbox, or its server cannot be reached."""
        if not self.outbox.is_empty():
            return None
        try:
            self.client.get_run(run_id)
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            if server_unreachable(error):
                return None
            raise
        return True

    def delete_tag(self, key: str) -> None:
        self.tags.pop(key, None)
        self.writer.write({"kind": "delete_tag", "key": key})

    def record_stage(self, stage: str, status: str) -> None:
        self.stage_statuses[stage] = status
        self.set_tags({f"{STAGE_TAG_PREFIX}{stage}": status})

    def log_metrics(self, metrics: dict[str, float], step: int = 0, model_of_run: str | None = None) -> None:
        """``model_of_run``: the run whose logged model the metrics measure, so MLflow's Models tab
        and the model's page show them too, with the run's ``dataset`` they were measured on."""
        timestamp = _now_ms()
        self.log_metric_points([[key, float(value), timestamp, step] for key, value in metrics.items()], model_of_run)

    def log_metric_points(self, points: list[list[Any]], model_of_run: str | None = None) -> None:
        """``points``: ``[key, value, timestamp in ms, step]`` each."""
        dataset = self.dataset if model_of_run else None
        for start in range(0, len(points), METRICS_PER_BATCH):
            self.writer.write({"kind": "log_batch", "metrics": points[start:start + METRICS_PER_BATCH],
                               "model_of_run": model_of_run, "dataset": dataset})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file or directory of the workspace, where it stays until it is sent."""
        self.writer.write({"kind": "log_artifact", "path": str(path), "artifact_path": artifact_path})

    def log_dataset(self, name: str, digest: str, sources: list[str], profile: dict[str, int], context: str) -> None:
        """The run's data as an MLflow dataset input (the runs table's Datasets column): ``name``,
        the data fingerprint as ``digest``, the ``sources`` given (paths, ``hf:`` ids), their
        counts as ``profile``, and what the run did with it (``context``: training, evaluation)."""
        self.writer.write({"kind": "log_input", "name": name, "digest": digest, "sources": sources,
                           "profile": profile, "context": context})
        self.dataset = [name, digest]

    def log_reused_model(self, trained_in_run: str) -> None:
        """The model the run ``trained_in_run`` logged, as this run's input: a run that reused an
        earlier training (cached) shows the model it stands for in its Models column."""
        self.writer.write({"kind": "log_model_input", "model_of_run": trained_in_run})

    def add_to_description(self, paragraph: str) -> None:
        """Add ``paragraph`` (markdown) to the run's description, the first thing its page shows."""
        self.description = "\n\n".join(part for part in (self.description, paragraph) if part)
        self.set_tags({MLFLOW_RUN_NOTE: self.description})

    def log_text(self, text: str, artifact_file: str) -> None:
        """``text`` as the artifact ``artifact_file`` (e.g. ``eval/report.json``)."""
        self.writer.write({"kind": "log_text", "text": text, "artifact_file": artifact_file})

    def log_text_generator(self, model_dir: Path, tokenizer_file: Path, registered_name: str, description: str) -> str:
        """Log a trained model as an MLflow pyfunc model that writes text, described by
        ``description``, and register it as a new version of ``registered_name``; returns
        ``name/version``."""
        return self.log_pyfunc_model(
            GENERATOR_MODULE, {"model": model_dir, "tokenizer": tokenizer_file}, ["def parse("], ["def parse(text):"],
            dataclasses.asdict(SamplingConfig()), registered_name, read_contents_hash(model_dir), description,
        )

    def log_pyfunc_model(
        self, code_module: str, artifacts: dict[str, Path], example_input: list[str], example_output: list[str],
        params: dict[str, Any] | None, registered_name: str, weights_hash: str, description: str,
    ) -> str:
        """Log the module ``code_module`` (an MLflow model from code) with ``artifacts`` and gptflow's
        pure packages as an MLflow logged model named ``registered_name``, an output of this run
        (MLflow's Models tab and the run's Models column show it; ``runs:/<run id>/<name>`` finds
        it), with ``description`` and the settings that made it as params, and register it as a new
        version of ``registered_name``, described alike and tagged with ``weights_hash``
        (``tasks.tracking.registry``); returns ``name/version``, whose version is ``pending`` while
        the outbox keeps the model (its replay registers it, and sets the version in the run's
        ``gptflow.registered_model`` tag). Its signature and input example come from
        ``example_input`` → ``example_output``, with ``params`` (the sampling settings) and their
        defaults."""
        registered = self.writer.write({
            "kind": "log_model", "code_module": code_module,
            "artifacts": {name: str(path) for name, path in artifacts.items()},
            "example_input": example_input, "example_output": example_output, "params": params,
            "registered_name": registered_name, "weights_hash": weights_hash, "description": description,
        })
        return registered or f"{registered_name}/{PENDING_VERSION}"

    def end(self, status: str) -> None:
        """Mark the run ``status`` once what the outbox holds is sent (``OutboxedWriter.write_last``)."""
        self.writer.write_last({"kind": "set_terminated", "status": status, "end_time": _now_ms()})

    def send_outbox(self) -> OutboxReport:
        """Send what the outbox holds now, whatever the retry timer says (the caller holds its lock)."""
        return self.writer.send_waiting()

    def how_to_view(self) -> str:
        """Where a user sees this run: its address on a tracking server, else the ``mlflow ui``
        command that serves the workspace's own store and the address of the run there."""
        if self.url:
            return self.url
        return (f"mlflow ui --backend-store-uri {self.client.tracking_uri}   then open "
                f"{run_address(LOCAL_UI, self.experiment_id, self.run_id)}")

    @property
    def runs_table(self) -> str:
        """Where a user compares this run with the others of its kind: its experiment's runs table
        on the tracking server, or in the ``mlflow ui`` of ``how_to_view``."""
        return runs_table_address(self.server or LOCAL_UI, self.experiment_id)

    @property
    def server(self) -> str | None:
        """The tracking server's address; None for a local SQLite store."""
        uri = self.client.tracking_uri
        return uri if uri.startswith("http") else None

    @property
    def url(self) -> str | None:
        """Link to the run in a tracking server's UI, in its machine-learning view; None for a
        local SQLite store."""
        return self.url_of(self.run_id)

    def url_of(self, run_id: str) -> str | None:
        """Link to another run of this run's experiment (a sweep's point), as ``url``."""
        return run_address(self.server, self.experiment_id, run_id) if self.server else None


class BufferedMetrics:
    """Collects per-step metrics and sends them in batches, so logging through a tracking
    server (~50 ms per call) costs far below 1% of training time."""

    def __init__(self, run: PipelineRun, flush_every_s: float = 10.0) -> None:
        self.run = run
        self.flush_every_s = flush_every_s
        self.pending: list[list[Any]] = []
        """``[key, value, timestamp in ms, step]`` each (``PipelineRun.log_metric_points``)."""
        self.last_flush = time.monotonic()

    def add(self, step: int, metrics: dict[str, float]) -> None:
        timestamp = _now_ms()
        self.pending.extend([key, float(value), timestamp, step] for key, value in metrics.items())
        if len(self.pending) >= METRICS_PER_BATCH or time.monotonic() - self.last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        points, self.pending = self.pending, []
        self.run.log_metric_points(points)
        self.last_flush = time.monotonic()


def flow_run_tags() -> dict[str, str]:
    """The Prefect flow run's id, and its UI address when a Prefect UI serves it (a run on
    Prefect's temporary local server has none worth keeping); none outside a flow run."""
    if flow_run.id is None:
        return {}
    tags = {"prefect.flow_run_id": str(flow_run.id)}
    if str(flow_run.ui_url).startswith("http"):
        tags["prefect.flow_run_url"] = flow_run.ui_url
    return tags


@contextlib.contextmanager
def pipeline_run(workspace: Workspace, workflow: str, tags: dict[str, Any], name: str | None = None
                 ) -> Iterator[PipelineRun]:
    """Open the flow run's MLflow run in the experiment of ``workflow`` (a key of
    ``tasks.tracking.experiments.WORKFLOWS``), named ``name`` or else as the Prefect flow run is,
    and described by a link to that flow run when a Prefect UI serves it; it ends FINISHED, or
    FAILED if the block raises. Writes that earlier runs of the workspace kept in their outboxes
    are sent first; then runs of this machine that a killed process left RUNNING, in any
    workflow's experiment, are marked KILLED, as this one is when SIGTERM or Ctrl-C stops it."""
    run_name = name or flow_run.name
    # The first client of a SQLite store creates its tables; two runs starting at once must not
    # both migrate it.
    with workspace.lock("mlflow-store"):
        client = MlflowClient(workspace.tracking_uri)
        experiment = experiment_id(client, workspace, workflow)
    for report in send_outboxes(workspace):
        if report.kept:
            run_logger().warning(f"MLflow: {report}")
    mark_runs_of_dead_processes_killed(client, existing_experiment_ids(client), workspace)
    tags = {**flow_run_tags(), **process_tags(), **tags}
    if "prefect.flow_run_url" in tags:
        tags[MLFLOW_RUN_NOTE] = f"Prefect flow run: [{run_name}]({tags['prefect.flow_run_url']})"
    try:
        created = client.create_run(experiment, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
    except MlflowException as error:
        if permission_denied(error):  # a user who may read the experiment, not write to it
            raise refusal_of(client, workflow) from None
        raise
    run = PipelineRun(client, created.info.run_id, Outbox(workspace, created.info.run_id), run_name, experiment,
                      workflow, tags.get(MLFLOW_RUN_NOTE, ""))
    try:
        yield run
    except (KeyboardInterrupt, TerminationSignal) as stopped:
        # A second Ctrl-C (or SIGTERM) while the run is being marked would leave it RUNNING, its
        # reason written and its end not: it takes effect once both are written.
        with _signals_deferred():
            run.set_tags({KILLED_TAG: "stopped by SIGTERM" if isinstance(stopped, TerminationSignal)
                          else "interrupted (Ctrl-C, or a cancelled Ray task)"})
            run.end("KILLED")
        raise
    except BaseException as error:
        _end_failed(run, error)
        raise
    run.end("FINISHED")


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive in the block are delivered again as it ends, to the handlers
    they had (signal handlers belong to the main thread: elsewhere the block runs as it is)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    handlers = {number: signal.signal(number, lambda received, _frame: arrived.append(received))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)  # None: set outside Python
        for number in dict.fromkeys(arrived):
            os.kill(os.getpid(), number)


def _end_failed(run: PipelineRun, error: BaseException) -> None:
    """Mark ``run`` FAILED for ``error``. When even that cannot be written (the disk that holds the
    store and the outbox is full), ``error`` stays what the user sees, with a note saying so."""
    try:
        run.end("FAILED")
    except Exception as tracking_error:
        if out_of_space_errno(tracking_error) is not None:
            note = (f"MLflow run {run.run_id} is left RUNNING: the full disk holds its store and outbox too; the "
                    "next gptflow run on this machine marks it KILLED.")
        else:
            note = f"MLflow run {run.run_id} could not be marked FAILED: {first_line(tracking_error)}"
        # As BaseException.add_note (Python 3.11+) does; the command line prints the notes of its error.
        error.__notes__ = [*getattr(error, "__notes__", []), note]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."
