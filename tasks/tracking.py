"""MLflow conventions: one run per flow run, every config field a param, stage tags, batching.

All logging goes through ``MlflowClient`` with an explicit run id rather than MLflow's fluent
"active run", because Prefect may run tasks on other threads than the flow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow.pyfunc
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, Metric, Param, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from prefect.runtime import flow_run

from gptflow.data.store import PACKAGE, module_file, read_contents_hash, reporting_out_of_space
from gptflow.model.config import SamplingConfig
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
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""Tells MLflow 3's UI that the experiment holds trained models: it opens on the runs, not on the
GenAI traces page."""
ML_VIEW = "workflowType=machine_learning"
"""The query that opens an MLflow 3 UI page in its machine-learning view, for links gptflow prints."""
# MLflow's log_batch limits: 100 params/tags and 1000 metrics per call.
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000


class PipelineRun:
    """The MLflow run of one flow run; the flow and its tasks log through it."""

    def __init__(self, client: MlflowClient, run_id: str, name: str = "") -> None:
        self.client = client
        self.run_id = run_id
        self.name = name
        self.stage_statuses: dict[str, str] = {}
        self.tags: dict[str, str] = {}

    @classmethod
    def attach(cls, tracking_uri: str, run_id: str) -> PipelineRun:
        """The same run, from another thread or process (tasks receive the run id)."""
        return cls(MlflowClient(tracking_uri), run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        entries = [Param(key, _param_value(value)) for key, value in sorted(params.items())]
        for start in range(0, len(entries), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=entries[start:start + PARAMS_PER_BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.tags.update({key: str(value) for key, value in tags.items()})
        entries = [RunTag(key, str(value)) for key, value in tags.items()]
        for start in range(0, len(entries), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=entries[start:start + PARAMS_PER_BATCH])

    def record_stage(self, stage: str, status: str) -> None:
        self.stage_statuses[stage] = status
        self.set_tags({f"{STAGE_TAG_PREFIX}{stage}": status})

    def log_metrics(self, metrics: dict[str, float], step: int = 0, model_id: str | None = None) -> None:
        """``model_id``: the logged model the metrics measure, so MLflow's Models tab shows them too."""
        timestamp = int(time.time() * 1000)
        entries = [Metric(key, float(value), timestamp, step, model_id=model_id) for key, value in metrics.items()]
        for start in range(0, len(entries), METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=entries[start:start + METRICS_PER_BATCH])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        with reporting_out_of_space(f"{self.artifact_root}/{artifact_path}" if artifact_path else self.artifact_root):
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        """``text`` as the artifact ``artifact_file`` (e.g. ``eval/report.json``)."""
        with reporting_out_of_space(f"{self.artifact_root}/{artifact_file}"):
            self.client.log_text(self.run_id, text, artifact_file)

    @functools.cached_property
    def artifact_root(self) -> str:
        """Where the run's artifacts go: a folder for a local store (the workspace's ``mlartifacts/``),
        named in the error when it runs out of space; else a URI."""
        return _local_path(self.client.get_run(self.run_id).info.artifact_uri)

    def log_text_generator(self, model_dir: Path, tokenizer_file: Path, registered_name: str) -> str:
        """Log a trained model as an MLflow pyfunc model at artifact path ``model`` and register
        it as a new version of ``registered_name``; returns the version."""
        return self.log_pyfunc_model(
            GENERATOR_MODULE, {"model": model_dir, "tokenizer": tokenizer_file}, ["def parse("], ["def parse(text):"],
            dataclasses.asdict(SamplingConfig()), registered_name, read_contents_hash(model_dir),
        )

    def registered_version(self, name: str, weights_hash: str, recorded: str) -> ModelVersion | None:
        """The version of ``name`` that holds the model of ``weights_hash`` (tagged so when it was
        registered; ``recorded``, the ``name/version`` a cached result remembers, for versions
        registered before the tag), or None when the tracking store has lost it (an MLflow store
        deleted or replaced since)."""
        try:
            versions = self.client.search_model_versions(f"name = '{name}'")
        except MlflowException:
            return None
        tagged = [version for version in versions if version.tags.get(WEIGHTS_TAG) == weights_hash]
        if tagged:
            return max(tagged, key=lambda version: int(version.version))
        remembered = [version for version in versions if f"{name}/{version.version}" == recorded]
        if remembered:
            self.client.set_model_version_tag(name, remembered[0].version, WEIGHTS_TAG, weights_hash)
            return remembered[0]
        return None

    def log_pyfunc_model(
        self, code_module: str, artifacts: dict[str, Path], example_input: list[str], example_output: list[str],
        params: dict[str, Any] | None, registered_name: str, weights_hash: str,
    ) -> str:
        """Log the module ``code_module`` (an MLflow model from code) with ``artifacts`` and gptflow's
        pure packages as an MLflow logged model named ``model``, an output of this run (MLflow's
        Models tab and the run's Models column show it; ``runs:/<run id>/model`` finds it), and
        register it as a new version of ``registered_name``, tagged with ``weights_hash`` so that
        ``registered_version`` finds it; returns the version. Its signature
        and input example come from ``example_input`` → ``example_output``, with ``params`` (the
        sampling settings) and their defaults."""
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        logged = self.client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=self.run_id,
                                                 model_type="gptflow")
        try:
            with reporting_out_of_space(_local_path(logged.artifact_location)):
                self._save_pyfunc_model(logged.model_id, code_module, artifacts, example_input, example_output, params)
        except BaseException:
            self.client.finalize_logged_model(logged.model_id, "FAILED")
            raise
        self.client.finalize_logged_model(logged.model_id, "READY")
        self.client.log_outputs(self.run_id, [LoggedModelOutput(logged.model_id, step=0)])
        with contextlib.suppress(MlflowException):  # it exists after the first version
            self.client.create_registered_model(registered_name)
        # The artifact location, not models:/<id>: MLflow resolves that through the process-wide
        # tracking URI, which need not be this workspace's.
        # A tracking store creates versions at once; waiting (MLflow's default) only logs a line.
        version = self.client.create_model_version(registered_name, logged.artifact_location, run_id=self.run_id,
                                                   model_id=logged.model_id, await_creation_for=0,
                                                   tags={WEIGHTS_TAG: weights_hash})
        return version.version

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
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        return (f"mlflow ui --backend-store-uri {self.client.tracking_uri}   then open "
                f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{self.run_id}?{ML_VIEW}")

    @property
    def url(self) -> str | None:
        """Link to the run in a tracking server's UI, in its machine-learning view; None for a
        local SQLite store."""
        uri = self.client.tracking_uri
        if not uri.startswith("http"):
            return None
        run = self.client.get_run(self.run_id)
        return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{self.run_id}?{ML_VIEW}"


class BufferedMetrics:
    """Collects per-step metrics and sends them in batches, so logging through a tracking
    server (~50 ms per call) costs far below 1% of training time."""

    def __init__(self, run: PipelineRun, flush_every_s: float = 10.0) -> None:
        self.run = run
        self.flush_every_s = flush_every_s
        self.pending: list[Metric] = []
        self.last_flush = time.monotonic()

    def add(self, step: int, metrics: dict[str, float]) -> None:
        timestamp = int(time.time() * 1000)
        self.pending.extend(Metric(key, float(value), timestamp, step) for key, value in metrics.items())
        if len(self.pending) >= METRICS_PER_BATCH or time.monotonic() - self.last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:METRICS_PER_BATCH], self.pending[METRICS_PER_BATCH:]
            self.run.client.log_batch(self.run.run_id, metrics=batch)
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
    if the block raises. Runs of this machine that a killed process left RUNNING are marked KILLED
    first."""
    run_name = name or flow_run.name
    # The first client of a SQLite store creates its tables; two runs starting at once must not
    # both migrate it.
    with workspace.lock("mlflow-store"):
        client = MlflowClient(workspace.tracking_uri)
        experiment_id = _experiment_id(client, workspace)
    _mark_runs_of_dead_processes_killed(client, experiment_id)
    tags = {**flow_run_tags(), HOST_TAG: socket.gethostname(), PID_TAG: os.getpid(), **tags}
    if "prefect.flow_run_url" in tags:
        tags["mlflow.note.content"] = f"Prefect flow run: [{run_name}]({tags['prefect.flow_run_url']})"
    created = client.create_run(experiment_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
    run = PipelineRun(client, created.info.run_id, run_name)
    try:
        yield run
    except BaseException:
        client.set_terminated(run.run_id, status="FAILED")
        raise
    client.set_terminated(run.run_id, status="FINISHED")


def _mark_runs_of_dead_processes_killed(client: MlflowClient, experiment_id: str) -> None:
    """A process killed outright (SIGKILL, out of memory, power loss) never ends its run: mark the
    experiment's RUNNING runs of this host whose process is gone KILLED. Runs of other hosts are
    left alone, since their processes cannot be seen from here."""
    host = socket.gethostname()
    stranded = client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'"
    )
    for stranded_run in stranded:
        run_id, pid = stranded_run.info.run_id, stranded_run.data.tags.get(PID_TAG, "")
        if not pid.isdigit() or _process_exists(int(pid)):
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
    name = os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
    experiment = client.get_experiment_by_name(name)
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


def _local_path(uri: str) -> str:
    """The folder of a ``file:`` URI; any other URI as it is."""
    parsed = urlparse(uri)
    return url2pathname(parsed.path) if parsed.scheme == "file" else uri


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."
