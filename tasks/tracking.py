"""MLflow conventions: one run per flow run, every config field a param, stage tags, batching,
and an outbox in the workspace for the writes a tracking server that went away could not take.

All logging goes through ``MlflowClient`` with an explicit run id rather than MLflow's fluent
"active run", because Prefect may run tasks on other threads than the flow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow.pyfunc
import requests
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, Experiment, InputTag, LoggedModelOutput, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from prefect.runtime import flow_run

from gptflow.data.errors import UserError
from gptflow.data.store import PACKAGE, module_file, read_contents_hash, reporting_out_of_space
from gptflow.model.config import SamplingConfig
from gptflow.tasks.outbox import Outbox
from gptflow.tasks.progress import run_logger
from gptflow.tasks.workspace import Workspace

GENERATOR_MODULE = "gptflow.tasks.mlflow_model"
"""The MLflow model from code of every pretrained model (run from its file, never imported here)."""
RUN_ID = re.compile(r"[0-9a-f]{32}")
WEIGHTS_TAG = "gptflow.weights_hash"
"""On a registered model version: the content hash of the weights it holds."""
MODEL_NAME = "model"
"""The name of every run's logged model: ``runs:/<run id>/model`` resolves to it."""
PURE_LAYERS = ("data", "model")
"""The packages an MLflow model carries: its code imports only these."""
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "gptflow"
STAGE_TAG_PREFIX = "gptflow.stage."
HOST_TAG = "gptflow.host"
PID_TAG = "gptflow.pid"
"""The machine and process of a run: a RUNNING run whose process is gone was killed."""
KILLED_TAG = "gptflow.killed"
"""Why a run was marked KILLED by a later run."""
REGISTERED_MODEL_TAG = "gptflow.registered_model"
"""``name/version`` of the model version that holds the model the run trained (or kept)."""
MLFLOW_PARENT_RUN_TAG = "mlflow.parentRunId"
"""MLflow nests a run under the run this tag names (the UI's expandable rows)."""
PENDING_VERSION = "pending"
"""The version of a ``name/version`` whose model waits in an outbox to be logged and registered."""
OFFLINE_RETRY_S = 30.0
"""While a run's writes wait in its outbox, how often it tries to send them."""
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""Tells MLflow 3's UI that the experiment holds trained models: it opens on the runs, not on the
GenAI traces page."""
ML_VIEW = "workflowType=machine_learning"
"""The query that opens an MLflow 3 UI page in its machine-learning view, for links gptflow prints."""
# MLflow's log_batch limits: 100 params/tags and 1000 metrics per call.
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000


def is_pending(registered_model: str) -> bool:
    """Whether ``registered_model`` (``name/version``) waits in an outbox to be registered."""
    return registered_model.rpartition("/")[2] == PENDING_VERSION


class TrackingServerUnreachable(UserError):
    """The tracking server a run starts on cannot be reached; the message says what to do."""


class OutboxError(UserError):
    """The tracking server refuses an operation an outbox kept; the message names it."""


class PipelineRun:
    """The MLflow run of one flow run; the flow and its tasks log through it.

    Every write goes through ``_write``: while the tracking server cannot be reached, writes are
    kept in the run's outbox in the workspace (``tasks.outbox``) and sent when it is back, so
    training never waits on the server."""

    def __init__(self, client: MlflowClient, run_id: str, outbox: Outbox, name: str = "",
                 experiment_id: str = "") -> None:
        self.client = client
        self.run_id = run_id
        self.outbox = outbox
        self.name = name
        self.experiment_id = experiment_id
        self.stage_statuses: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.registered: list[str] = []
        """``name/version`` of each model version this object registered."""
        self.next_replay = 0.0
        """The ``time.monotonic()`` from which a write tries to send what the outbox holds."""

    @classmethod
    def attach(cls, workspace_root: str, tracking_uri: str, run_id: str) -> PipelineRun:
        """The same run, from another thread or process (tasks receive these three)."""
        return cls(MlflowClient(tracking_uri), run_id, Outbox(Workspace(Path(workspace_root)), run_id))

    def log_params(self, params: dict[str, Any]) -> None:
        entries = [[key, _param_value(value)] for key, value in sorted(params.items())]
        for start in range(0, len(entries), PARAMS_PER_BATCH):
            self._write({"kind": "log_batch", "params": entries[start:start + PARAMS_PER_BATCH]})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.tags.update({key: str(value) for key, value in tags.items()})
        entries = [[key, str(value)] for key, value in tags.items()]
        for start in range(0, len(entries), PARAMS_PER_BATCH):
            self._write({"kind": "log_batch", "tags": entries[start:start + PARAMS_PER_BATCH]})

    def record_stage(self, stage: str, status: str) -> None:
        self.stage_statuses[stage] = status
        self.set_tags({f"{STAGE_TAG_PREFIX}{stage}": status})

    def log_metrics(self, metrics: dict[str, float], step: int = 0, model_of_run: str | None = None) -> None:
        """``model_of_run``: the run whose logged model the metrics measure, so MLflow's Models tab
        shows them too."""
        timestamp = _now_ms()
        self.log_metric_points([[key, float(value), timestamp, step] for key, value in metrics.items()], model_of_run)

    def log_metric_points(self, points: list[list[Any]], model_of_run: str | None = None) -> None:
        """``points``: ``[key, value, timestamp in ms, step]`` each."""
        for start in range(0, len(points), METRICS_PER_BATCH):
            self._write({"kind": "log_batch", "metrics": points[start:start + METRICS_PER_BATCH],
                         "model_of_run": model_of_run})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """A file or directory of the workspace, where it stays until it is sent."""
        self._write({"kind": "log_artifact", "path": str(path), "artifact_path": artifact_path})

    def log_dataset(self, name: str, digest: str, sources: list[str], profile: dict[str, int], context: str) -> None:
        """The run's data as an MLflow dataset input (the runs table's Datasets column): ``name``,
        the data fingerprint as ``digest``, the ``sources`` given (paths, ``hf:`` ids), their
        counts as ``profile``, and what the run did with it (``context``: training, evaluation)."""
        self._write({"kind": "log_input", "name": name, "digest": digest, "sources": sources, "profile": profile,
                     "context": context})

    def log_text(self, text: str, artifact_file: str) -> None:
        """``text`` as the artifact ``artifact_file`` (e.g. ``eval/report.json``)."""
        self._write({"kind": "log_text", "text": text, "artifact_file": artifact_file})

    def log_text_generator(self, model_dir: Path, tokenizer_file: Path, registered_name: str) -> str:
        """Log a trained model as an MLflow pyfunc model at artifact path ``model`` and register
        it as a new version of ``registered_name``; returns ``name/version``."""
        return self.log_pyfunc_model(
            GENERATOR_MODULE, {"model": model_dir, "tokenizer": tokenizer_file}, ["def parse("], ["def parse(text):"],
            dataclasses.asdict(SamplingConfig()), registered_name, read_contents_hash(model_dir),
        )

    def log_pyfunc_model(
        self, code_module: str, artifacts: dict[str, Path], example_input: list[str], example_output: list[str],
        params: dict[str, Any] | None, registered_name: str, weights_hash: str,
    ) -> str:
        """Log the module ``code_module`` (an MLflow model from code) with ``artifacts`` and gptflow's
        pure packages as an MLflow logged model named ``model``, an output of this run (MLflow's
        Models tab and the run's Models column show it; ``runs:/<run id>/model`` finds it), and
        register it as a new version of ``registered_name``, tagged with ``weights_hash`` (so that
        ``registered_model`` finds it); returns ``name/version``, whose
        version is ``pending`` while the outbox keeps the model (its replay registers it, and
        sets the version in the run's ``gptflow.registered_model`` tag). Its signature and input
        example come from ``example_input`` → ``example_output``, with ``params`` (the sampling
        settings) and their defaults."""
        registered = self._write({
            "kind": "log_model", "code_module": code_module,
            "artifacts": {name: str(path) for name, path in artifacts.items()},
            "example_input": example_input, "example_output": example_output, "params": params,
            "registered_name": registered_name, "weights_hash": weights_hash,
        })
        return registered or f"{registered_name}/{PENDING_VERSION}"

    def registered_model(self, name: str, weights_hash: str, recorded: str, trained_run_id: str,
                         log_again: Callable[[], str]) -> tuple[str, str]:
        """``(name/version, run id)`` of the registered version that holds the model of
        ``weights_hash``, which a cached result remembers as ``recorded`` from run
        ``trained_run_id``: tagged with its hash, or registered by that run (before versions were
        tagged, or once an outbox sent a pending registration). When the tracking store has lost it
        (its MLflow store deleted or replaced, or its files in the folder of a workspace this one was
        copied from, and that folder deleted), this run logs and registers it again through
        ``log_again``. While the tracking server cannot be reached, what the result remembers."""
        if not self.outbox.is_empty():
            return recorded, trained_run_id
        try:
            versions = self.client.search_model_versions(f"name = '{name}'")
        except Exception as error:
            if not server_unreachable(error):
                raise
            return recorded, trained_run_id
        holding = [version for version in versions if _files_exist(version.source)
                   and (version.tags.get(WEIGHTS_TAG) == weights_hash or version.run_id == trained_run_id)]
        if holding:
            version = max(holding, key=lambda version: int(version.version))
            if version.tags.get(WEIGHTS_TAG) != weights_hash:
                self.client.set_model_version_tag(name, version.version, WEIGHTS_TAG, weights_hash)
            return f"{name}/{version.version}", version.run_id
        run_logger().warning(f"MLflow: the tracking store lacks the model {recorded} (was its store replaced or "
                             "deleted, or the workspace it was copied from?); this run logs and registers it again")
        return log_again(), self.run_id

    def end(self, status: str) -> None:
        """Mark the run ``status`` once what the outbox holds is sent; if the tracking server still
        cannot be reached, say what the outbox keeps and the command that sends it."""
        self.next_replay = 0.0  # one last try, whatever the timer says
        self._write({"kind": "set_terminated", "status": status, "end_time": _now_ms()})
        with self.outbox.lock():
            waiting = self.outbox.waiting()
        if waiting:
            model = " (the model's logging and registration among them)" if waiting["log_model"] else ""
            run_logger().warning(
                f"MLflow: {self.client.tracking_uri} still cannot be reached: {waiting.total()} operations of run "
                f"{self.run_id}{model} are kept in {self.outbox.path}. Once the server is back, send them with "
                f"`gptflow sync --workspace {self.outbox.workspace.root}` (the next gptflow run on this workspace "
                "sends them too)."
            )

    def send_outbox(self) -> OutboxReport:
        """Send what the outbox holds now, whatever the retry timer says (the caller holds its lock)."""
        waiting = self.outbox.waiting().total()
        try:
            problem = "" if self._replay() else (f"{self.client.tracking_uri} cannot be reached, so they stay "
                                                 f"in {self.outbox.path}")
        except OutboxError as error:
            problem = str(error)
        kept = self.outbox.waiting().total()
        return OutboxReport(self.run_id, self.client.tracking_uri, waiting - kept, kept, self.registered, problem)

    def _write(self, operation: dict[str, Any]) -> Any:
        """Send ``operation`` (returning what that returns), or keep it in the outbox while the
        tracking server cannot be reached or earlier operations wait there: those are sent
        first, tried every ``OFFLINE_RETRY_S``."""
        with self.outbox.lock():
            if not self.outbox.is_empty() and time.monotonic() >= self.next_replay:
                self._replay()
            if self.outbox.is_empty():
                try:
                    return self._send(operation)
                except Exception as error:
                    if not server_unreachable(error):
                        raise
                    run_logger().warning(
                        f"MLflow: {self.client.tracking_uri} cannot be reached; the run goes on, and keeps its MLflow "
                        f"writes in {self.outbox.path} until the server is back"
                    )
                    self.next_replay = time.monotonic() + OFFLINE_RETRY_S
            self.outbox.append(operation, self.client.tracking_uri)
            return None

    def _replay(self) -> bool:
        """Send what the outbox holds, in order (the caller holds its lock); whether all of it went.
        An operation the server refuses raises ``OutboxError``."""
        waiting = self.outbox.waiting().total()
        try:
            self.outbox.replay(self._send)
        except Exception as error:
            if not server_unreachable(error):
                raise OutboxError(
                    f"could not send operation {self.outbox.next_line()} of {self.outbox.path} to "
                    f"{self.client.tracking_uri}: {_first_line(error)}. Remove the cause and run `gptflow sync` "
                    "again, or delete that line to drop the operation."
                ) from error
            self.next_replay = time.monotonic() + OFFLINE_RETRY_S
            return False
        run_logger().info(f"MLflow: sent the {waiting} operations of run {self.run_id} that waited in "
                          f"{self.outbox.path} to {self.client.tracking_uri}")
        return True

    def _send(self, operation: dict[str, Any]) -> Any:
        match operation["kind"]:
            case "log_batch":
                model_of_run = operation.get("model_of_run")
                model_id = logged_model_id(self.client, model_of_run) if model_of_run else None
                self.client.log_batch(
                    self.run_id,
                    metrics=[Metric(key, value, timestamp, step, model_id=model_id)
                             for key, value, timestamp, step in operation.get("metrics", [])],
                    params=[Param(key, value) for key, value in operation.get("params", [])],
                    tags=[RunTag(key, self._tag_value(key, value)) for key, value in operation.get("tags", [])],
                )
            case "log_artifact":
                path, artifact_path = Path(operation["path"]), operation["artifact_path"]
                log = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
                with reporting_out_of_space(f"{self.artifact_root}/{artifact_path}" if artifact_path else self.artifact_root):
                    log(self.run_id, str(path), artifact_path)
            case "log_text":
                with reporting_out_of_space(f"{self.artifact_root}/{operation['artifact_file']}"):
                    self.client.log_text(self.run_id, operation["text"], operation["artifact_file"])
            case "log_input":
                sources = operation["sources"]
                kinds = {_dataset_source_type(source) for source in sources}
                dataset = Dataset(
                    name=operation["name"], digest=operation["digest"],
                    source_type=kinds.pop() if len(kinds) == 1 else "mixed",
                    source=json.dumps({"uri": sources[0]} if len(sources) == 1 else {"uris": sources}),
                    profile=json.dumps(operation["profile"]),
                )
                inputs = [DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, operation["context"])])]
                try:
                    self.client.log_inputs(self.run_id, inputs)
                except MlflowException as error:
                    # Runs logging the same new dataset at once (a sweep's points) race to insert it
                    # into a SQL store; the loser's transaction is rolled back, and finds it now.
                    if "UNIQUE constraint failed" not in str(error):
                        raise
                    self.client.log_inputs(self.run_id, inputs)
            case "set_terminated":
                self.client.set_terminated(self.run_id, operation["status"], operation["end_time"])
            case "log_model":
                return self._log_model(operation)
            case kind:
                raise ValueError(f"unknown MLflow operation {kind!r}")
        return None

    @functools.cached_property
    def artifact_root(self) -> str:
        """Where the run's artifacts go: a folder for a local store (the workspace's ``mlartifacts/``),
        named in the error when it runs out of space; else a URI."""
        return _local_path(self.client.get_run(self.run_id).info.artifact_uri)

    def _tag_value(self, key: str, value: str) -> str:
        # A model registered while the outbox kept this run's writes has its version by now.
        if key == REGISTERED_MODEL_TAG and is_pending(value):
            return self._registered_version(value.rpartition("/")[0], self.run_id) or value
        return value

    def _registered_version(self, name: str, run_id: str) -> str | None:
        versions = self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        return f"{name}/{max(int(version.version) for version in versions)}" if versions else None

    def _log_model(self, operation: dict[str, Any]) -> str:
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        logged = self.client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=self.run_id,
                                                 model_type="gptflow")
        try:
            with reporting_out_of_space(_local_path(logged.artifact_location)):
                self._save_pyfunc_model(
                    logged.model_id, operation["code_module"],
                    {name: Path(path) for name, path in operation["artifacts"].items()},
                    operation["example_input"], operation["example_output"], operation["params"],
                )
        except BaseException:
            with contextlib.suppress(Exception):  # the server may be what failed
                self.client.finalize_logged_model(logged.model_id, "FAILED")
            raise
        self.client.finalize_logged_model(logged.model_id, "READY")
        self.client.log_outputs(self.run_id, [LoggedModelOutput(logged.model_id, step=0)])
        registered_name = operation["registered_name"]
        with contextlib.suppress(MlflowException):  # it exists after the first version
            self.client.create_registered_model(registered_name)
        # The artifact location, not models:/<id>: MLflow resolves that through the process-wide
        # tracking URI, which need not be this workspace's.
        # A tracking store creates versions at once; waiting (MLflow's default) only logs a line.
        version = self.client.create_model_version(registered_name, logged.artifact_location, run_id=self.run_id,
                                                   model_id=logged.model_id, await_creation_for=0,
                                                   tags={WEIGHTS_TAG: operation["weights_hash"]})
        registered = f"{registered_name}/{version.version}"
        self.registered.append(registered)
        return registered

    def _save_pyfunc_model(
        self, model_id: str, code_module: str, artifacts: dict[str, Path], example_input: list[str],
        example_output: list[str], params: dict[str, Any] | None,
    ) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            # Copies of the pure packages, without bytecode caches, travel inside the model as
            # code/gptflow/{data,model}: MLflow puts code/ on sys.path when the model loads.
            package = Path(tmp) / "code" / PACKAGE
            for layer in PURE_LAYERS:
                shutil.copytree(module_file(f"{PACKAGE}.{layer}").parent, package / layer,
                                ignore=shutil.ignore_patterns("__pycache__"))
            saved = Path(tmp) / "model"
            mlflow.pyfunc.save_model(
                path=saved,
                python_model=str(module_file(code_module)),
                artifacts={name: str(path) for name, path in artifacts.items()},
                code_paths=[str(package)],
                signature=infer_signature(example_input, example_output, params=params),
                input_example=(example_input, params) if params else example_input,
                pip_requirements=[f"{name}=={metadata.version(name)}"
                                  for name in ("torch", "tokenizers", "safetensors", "pyarrow", "numpy", "mlflow")],
            )
            self.client.log_model_artifacts(model_id, str(saved))

    def how_to_view(self) -> str:
        """Where a user sees this run: its address on a tracking server, else the ``mlflow ui``
        command that serves the workspace's own store and the address of the run there."""
        if self.url:
            return self.url
        return (f"mlflow ui --backend-store-uri {self.client.tracking_uri}   then open "
                f"http://127.0.0.1:5000/#/experiments/{self.experiment_id}/runs/{self.run_id}?{ML_VIEW}")

    @property
    def url(self) -> str | None:
        """Link to the run in a tracking server's UI, in its machine-learning view; None for a
        local SQLite store."""
        uri = self.client.tracking_uri
        if not uri.startswith("http"):
            return None
        return f"{uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}?{ML_VIEW}"


@dataclass
class OutboxReport:
    """What sending one run's outbox did."""

    run_id: str
    tracking_uri: str
    sent: int
    kept: int
    registered: list[str]
    """``name/version`` of each model version the operations sent registered."""
    problem: str
    """Why operations were kept, if any were."""

    def __str__(self) -> str:
        line = f"run {self.run_id}: sent {self.sent} operations to {self.tracking_uri}"
        if self.registered:
            line += f", registered {', '.join(self.registered)}"
        if self.kept:
            line += f"; {self.kept} still kept: {self.problem}"
        return line


def send_outboxes(workspace: Workspace) -> list[OutboxReport]:
    """Send the outbox of every run of ``workspace`` that kept writes, each to its own tracking
    server; a report per outbox."""
    reports = []
    for outbox in Outbox.all(workspace):
        with outbox.lock():
            if not outbox.is_empty():  # else another process sent it meanwhile
                reports.append(PipelineRun(MlflowClient(outbox.tracking_uri), outbox.run_id, outbox).send_outbox())
    return reports


def server_unreachable(error: BaseException) -> bool:
    """Whether ``error``, or one it was raised from, says the tracking server cannot be reached:
    refused or dropped connections, answers cut off by a server that died mid-reply, timeouts,
    answers still 5xx after MLflow's retries. Errors
    that are the caller's fault (a rejected request, a bad certificate) are not."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, requests.exceptions.SSLError):
            return False
        if isinstance(cause, (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError,
                              requests.exceptions.Timeout, requests.exceptions.RetryError)):
            return True
        # MLflow raises its own exception while handling the requests one, without "from".
        cause = cause.__cause__ or cause.__context__
    return False


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


def logged_model_id(client: MlflowClient, run_id: str) -> str | None:
    """The id of the model the run ``run_id`` logged (a run whose training was cached logged none)."""
    outputs = client.get_run(run_id).outputs.model_outputs
    return outputs[0].model_id if outputs else None


def run_name(flow: str, overrides: dict[str, Any] | None, *context: str | None) -> str:
    """``learning_rate=0.01 · pretrain cpu stdlib``: what was set differently first (tables and chart
    legends cut names at the end), then the flow and what it ran on. Each flow names its Prefect
    flow runs with it, and ``pipeline_run`` gives the MLflow run the same name."""
    changed = " ".join(f"{key.rpartition('.')[2]}={value}" for key, value in sorted((overrides or {}).items()))
    described = " ".join([flow, *(part for part in context if part)])
    return f"{changed} · {described}" if changed else described


def source_label(source: str | None) -> str | None:
    """A short name for a corpus path, model URI, run id or model directory, for run names."""
    if source is None:
        return None
    if source.startswith(("models:/", "runs:/")):
        return source.split(":/", 1)[1]
    if RUN_ID.fullmatch(source):
        return source[:8]
    path = Path(source.rstrip("/"))
    return "/".join(path.parts[-2:]) if path.name in ("final", "model") else (path.name or source)


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
def pipeline_run(workspace: Workspace, tags: dict[str, Any], name: str | None = None) -> Iterator[PipelineRun]:
    """Open the flow run's MLflow run, named ``name`` or else as the Prefect flow run is, and
    described by a link to that flow run when a Prefect UI serves it; it ends FINISHED, or FAILED
    if the block raises. Writes that earlier runs of the workspace kept in their outboxes are
    sent first; then runs of this machine that a killed process left RUNNING are marked KILLED."""
    run_name = name or flow_run.name
    # The first client of a SQLite store creates its tables; two runs starting at once must not
    # both migrate it.
    with workspace.lock("mlflow-store"):
        client = MlflowClient(workspace.tracking_uri)
        experiment_id = _experiment_id(client, workspace)
    _send_earlier_outboxes(workspace)
    _mark_runs_of_dead_processes_killed(client, experiment_id, workspace)
    tags = {**flow_run_tags(), HOST_TAG: socket.gethostname(), PID_TAG: os.getpid(), **tags}
    if "prefect.flow_run_url" in tags:
        tags["mlflow.note.content"] = f"Prefect flow run: [{run_name}]({tags['prefect.flow_run_url']})"
    created = client.create_run(experiment_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
    run = PipelineRun(client, created.info.run_id, Outbox(workspace, created.info.run_id), run_name, experiment_id)
    try:
        yield run
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")


def _send_earlier_outboxes(workspace: Workspace) -> None:
    for report in send_outboxes(workspace):
        if report.kept:
            run_logger().warning(f"MLflow: {report}")


def _mark_runs_of_dead_processes_killed(client: MlflowClient, experiment_id: str, workspace: Workspace) -> None:
    """A process killed outright (SIGKILL, out of memory, power loss) never ends its run: mark the
    experiment's RUNNING runs of this host whose process is gone KILLED. Runs of other hosts are
    left alone, since their processes cannot be seen from here, and so are runs whose end still
    waits in their outbox."""
    host = socket.gethostname()
    stranded = client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'"
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
    return True


def _experiment_id(client: MlflowClient, workspace: Workspace) -> str:
    """The run's experiment; ``TrackingServerUnreachable`` at once when the server cannot be
    reached, before anything is computed."""
    try:
        return _find_or_create_experiment(client, workspace)
    except MlflowException as error:
        if not server_unreachable(error):
            raise
        raise TrackingServerUnreachable(
            f"The MLflow tracking server {client.tracking_uri} (MLFLOW_TRACKING_URI) cannot be reached. Start it "
            "(`gptflow up` starts one for this workspace), or unset MLFLOW_TRACKING_URI to log to the workspace's "
            "own store."
        ) from error


def _find_or_create_experiment(client: MlflowClient, workspace: Workspace) -> str:
    name = os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None and (original := _copied_from(experiment.artifact_location, workspace)):
        experiment = _set_aside(client, experiment, original)
    if experiment is not None:
        for key, value in EXPERIMENT_KIND.items():
            if experiment.tags.get(key) != value:  # an experiment made before gptflow set it
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    # With the workspace's own SQLite store, keep artifacts in the workspace too (MLflow's
    # default would be ./mlruns under whatever directory the command ran from).
    location = workspace.mlflow_artifacts.as_uri() if workspace.uses_local_tracking else None
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except MlflowException:
        # A concurrent run created it first.
        return client.get_experiment_by_name(name).experiment_id


def _copied_from(artifact_location: str, workspace: Workspace) -> Path | None:
    """The workspace whose ``mlartifacts/`` an experiment of this workspace's own store keeps its
    artifacts in, when that is another one: the store was copied (``cp -a``) with its workspace."""
    location = Path(_local_path(artifact_location))
    if (not workspace.tracks_in_own_store or not artifact_location.startswith("file:")
            or location.name != workspace.mlflow_artifacts.name or location == workspace.mlflow_artifacts):
        return None
    return location.parent


def _set_aside(client: MlflowClient, experiment: Experiment, original: Path) -> Experiment | None:
    """Rename the experiment that writes into ``original``'s artifacts, so that this workspace's
    runs go to a new one of the name, writing into its own; the experiment it returns, if a
    concurrent run made it already."""
    aside = f"{experiment.name} (copied from {original})"
    try:
        client.rename_experiment(experiment.experiment_id, aside)
    except MlflowException:
        if client.get_experiment(experiment.experiment_id).name == experiment.name:
            raise
    else:  # else a concurrent run renamed it first, and said so
        run_logger().warning(f"mlflow: this workspace's MLflow store was copied from {original}; its runs stay in the "
                             f"experiment '{aside}' (their artifacts in {original}), this run and later ones go to a "
                             f"new experiment '{experiment.name}' that keeps its artifacts in this workspace")
    return client.get_experiment_by_name(experiment.name)


def _files_exist(source: str) -> bool:
    """False when a model version's files were in a local folder that is gone (the workspace its
    store was copied from, deleted); True for a location elsewhere."""
    return not source.startswith("file:") or Path(_local_path(source)).exists()


def _local_path(uri: str) -> str:
    """The folder of a ``file:`` URI; any other URI as it is."""
    parsed = urlparse(uri)
    return url2pathname(parsed.path) if parsed.scheme == "file" else uri


def _now_ms() -> int:
    return int(time.time() * 1000)


def _dataset_source_type(source: str) -> str:
    """How the MLflow UI names where a corpus source lies, as MLflow's own dataset sources do."""
    if source.startswith("hf:"):
        return "hugging_face"
    scheme, separator, _ = source.partition("://")
    return {"s3": "s3", "gs": "gcs"}.get(scheme, scheme) if separator else "local"


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."
