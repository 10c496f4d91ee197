"""Copying a workspace's MLflow history into another tracking server (``gptflow push-history``).

Everything goes through MLflow's client, on both sides: experiments (by name, with their tags),
runs (name, start and end times, status, params, every metric's whole history, tags, dataset
inputs, artifacts), the models runs logged, and registered models with their versions and
aliases. A sweep's points nest under the copy of their sweep: ``mlflow.parentRunId`` is mapped
to the copied parent, which is copied first.

Copying twice copies nothing twice: each copied run carries ``COPIED_FROM_TAG`` (the source run's
id, a UUID drawn once per run) and ``COPIED_FROM_STORE_TAG`` (where it came from, for people), and
each copied model version ``COPIED_FROM_TAG`` (``<source run id>/<model name>/<version>``); the
next copy skips what it finds so tagged. ``COPY_COMPLETE_TAG`` goes on last, once a run's metrics,
artifacts and models are all there: a run that a stopped copy left half-written lacks it, and the
next copy deletes it and copies the run anew.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, Metric, Param, Run, ViewType
from mlflow.store.entities.paged_list import PagedList
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from gptflow.data.errors import UserError
from gptflow.tasks.tracking.experiments import local_path
from gptflow.tasks.tracking.server import permission_denied, server_unreachable

COPIED_FROM_TAG = "gptflow.copied_from"
COPIED_FROM_STORE_TAG = "gptflow.copied_from.store"
COPY_COMPLETE_TAG = "gptflow.copy_complete"
PAGE = 1000
"""Runs, metrics and model versions asked for, or sent, at once (MLflow's limit for a batch of metrics)."""
PARAMS_PER_BATCH = 100
"""MLflow's limit of params in one ``log_batch``."""
PROXIED_SCHEME = "mlflow-artifacts"
"""Artifacts that ``gptflow up``'s server proxies: in the workspace's ``mlartifacts/``."""


class HistoryCopyError(UserError):
    """The history cannot be copied as asked; the message says what to do."""


def copy_history(workspace_root: Path, destination: str, report: Callable[[str], None]) -> CopySummary:
    """Copy the MLflow history of the workspace at ``workspace_root`` (its ``mlflow.db``, and
    ``mlartifacts/``) to the tracking server ``destination``; what was copied and found."""
    database = workspace_root / "mlflow.db"
    if not database.is_file():
        raise HistoryCopyError(f"{workspace_root} holds no MLflow history (no mlflow.db): give the workspace you "
                               "trained in with --workspace.")
    source_uri = f"sqlite:///{database}"
    copy = HistoryCopy(MlflowClient(source_uri), MlflowClient(destination), f"{socket.gethostname()}:{database}",
                       workspace_root / "mlartifacts", report)
    try:
        return copy.copy()
    except Exception as error:
        if server_unreachable(error):
            raise HistoryCopyError(f"The MLflow server {destination} cannot be reached: check the address and that "
                                   "it runs, then run the same command again; it copies only what is not there "
                                   "yet.") from None
        if permission_denied(error):
            user = os.environ.get("MLFLOW_TRACKING_USERNAME", "NAME")
            on = f" --experiment {copy.experiment}" if copy.experiment else ""
            raise HistoryCopyError(f"The MLflow server {destination} does not let {user} write {copy.copying}: ask its "
                                   f"admin for `gptflow user grant {user} edit{on}`, then run the same command again; "
                                   "it copies only what is not there yet.") from None
        raise


@dataclass
class CopySummary:
    experiments: int = 0
    runs_copied: int = 0
    runs_found: int = 0
    versions_copied: int = 0
    versions_found: int = 0

    def line(self) -> str:
        return (f"{self.experiments} experiments: {self.runs_copied} runs copied, {self.runs_found} already there; "
                f"{self.versions_copied} model versions copied, {self.versions_found} already there")


class HistoryCopy:
    """One copy from the store ``source`` to the server ``destination``; ``report`` takes a
    progress line per experiment and per registered model."""

    def __init__(self, source: MlflowClient, destination: MlflowClient, source_name: str,
                 proxied_artifacts: Path | None, report: Callable[[str], None]) -> None:
        self.source, self.destination, self.report = source, destination, report
        self.source_name = source_name
        self.proxied_artifacts = proxied_artifacts
        self.run_ids: dict[str, str] = {}
        """Source run id to its copy's id."""
        self.model_copies: dict[str, str] = {}
        """A source logged model's id, and its files' location, to its copy's id: a version
        registered from a logged model names it by either (a SQLite store keeps only the location)."""
        self.summary = CopySummary()
        self.copying = "the history"
        """What is being copied, for an error to name."""
        self.experiment: str | None = None
        """The experiment being copied, for an error to name; None while copying registered models."""

    def copy(self) -> CopySummary:
        for experiment in _every(self.source.search_experiments, view_type=ViewType.ACTIVE_ONLY, max_results=PAGE):
            self._copy_experiment(experiment.experiment_id, experiment.name, experiment.tags)
        for model in _every(self.source.search_registered_models, max_results=PAGE):
            self._copy_registered_model(model.name)
        return self.summary

    def _copy_experiment(self, source_id: str, name: str, tags: dict[str, str]) -> None:
        runs = {run.info.run_id: run for run in self._runs(self.source, source_id)}
        if not runs:
            return
        self.copying, self.experiment = f"the experiment {name}", name
        self.summary.experiments += 1
        destination_id = self._destination_experiment(name, tags)
        copied, half_written = self._copies_in(destination_id)
        for run_id, original_id in half_written.items():
            if original_id in runs:  # not a teammate's copy under way
                self.destination.delete_run(run_id)
        before = self.summary.runs_copied
        for run in runs.values():
            self._copy_run(run, runs, copied, destination_id)
        self.report(f"{name}: {self.summary.runs_copied - before} runs copied, "
                    f"{len(runs) - (self.summary.runs_copied - before)} already there")

    def _destination_experiment(self, name: str, tags: dict[str, str]) -> str:
        existing = self.destination.get_experiment_by_name(name)
        if existing is None:
            return self.destination.create_experiment(name, tags=tags)
        if existing.lifecycle_stage == "deleted":
            self.destination.restore_experiment(existing.experiment_id)
        for key, value in tags.items():
            if key not in existing.tags:
                self.destination.set_experiment_tag(existing.experiment_id, key, value)
        return existing.experiment_id

    def _copies_in(self, experiment_id: str) -> tuple[dict[str, str], dict[str, str]]:
        """The runs of the destination's experiment that are copies: the complete ones' ids by
        their source run id, and the source run id of each that is half-written (by a copy that
        stopped, or one under way) by its id."""
        complete: dict[str, str] = {}
        half_written: dict[str, str] = {}
        for run in self._runs(self.destination, experiment_id, f"tags.`{COPIED_FROM_TAG}` LIKE '%'"):
            if run.data.tags.get(COPY_COMPLETE_TAG) == "true":
                complete[run.data.tags[COPIED_FROM_TAG]] = run.info.run_id
            else:
                half_written[run.info.run_id] = run.data.tags[COPIED_FROM_TAG]
        return complete, half_written

    def _copy_run(self, run: Run, runs: dict[str, Run], copied: dict[str, str], experiment_id: str) -> str:
        """The id of the copy of ``run``, made now unless found in ``copied``; its parent first."""
        source_id = run.info.run_id
        if source_id in self.run_ids:
            return self.run_ids[source_id]
        if source_id in copied:
            self.summary.runs_found += 1
            self.run_ids[source_id] = copied[source_id]
            return copied[source_id]
        tags = {key: value for key, value in run.data.tags.items() if key != MLFLOW_RUN_NAME}
        parent = tags.get(MLFLOW_PARENT_RUN_ID)
        if parent is not None and parent in runs:
            tags[MLFLOW_PARENT_RUN_ID] = self._copy_run(runs[parent], runs, copied, experiment_id)
        tags.update({COPIED_FROM_TAG: source_id, COPIED_FROM_STORE_TAG: self.source_name})
        new = self.destination.create_run(experiment_id, start_time=run.info.start_time, tags=tags,
                                          run_name=run.info.run_name)
        new_id = new.info.run_id
        self._copy_params_and_metrics(run, new_id)
        if run.inputs and run.inputs.dataset_inputs:
            self.destination.log_inputs(new_id, datasets=run.inputs.dataset_inputs)
        with tempfile.TemporaryDirectory(prefix="gptflow-history-") as folder:
            local = self._download(run.info.artifact_uri, Path(folder))
            self.destination.log_artifacts(new_id, str(local))
        self._copy_logged_models(run, new_id, experiment_id)
        if run.info.status != "RUNNING":
            self.destination.set_terminated(new_id, run.info.status, run.info.end_time)
        self.destination.set_tag(new_id, COPY_COMPLETE_TAG, "true")
        self.summary.runs_copied += 1
        self.run_ids[source_id] = new_id
        return new_id

    def _copy_params_and_metrics(self, run: Run, new_id: str) -> None:
        params = [Param(key, value) for key, value in run.data.params.items()]
        for start in range(0, len(params), PARAMS_PER_BATCH):
            self.destination.log_batch(new_id, params=params[start:start + PARAMS_PER_BATCH])
        metrics = [Metric(point.key, point.value, point.timestamp, point.step)
                   for key in run.data.metrics for point in self.source.get_metric_history(run.info.run_id, key)]
        for start in range(0, len(metrics), PAGE):
            self.destination.log_batch(new_id, metrics=metrics[start:start + PAGE])

    def _copy_logged_models(self, run: Run, new_run_id: str, experiment_id: str) -> None:
        """The models ``run`` logged (MLflow 3's logged models), as models of its copy."""
        for output in run.outputs.model_outputs if run.outputs else []:
            model = self.source.get_logged_model(output.model_id)
            copy = self.destination.create_logged_model(
                experiment_id, name=model.name, source_run_id=new_run_id, model_type=model.model_type,
                params=model.params, tags={key: value for key, value in model.tags.items()
                                           if not key.startswith("mlflow.")})
            with tempfile.TemporaryDirectory(prefix="gptflow-history-") as folder:
                local = self._download(model.artifact_location, Path(folder))
                self.destination.log_model_artifacts(copy.model_id, str(local))
            self.destination.finalize_logged_model(copy.model_id, model.status)
            self.destination.log_outputs(new_run_id, [LoggedModelOutput(copy.model_id, step=output.step)])
            self.model_copies[model.model_id] = self.model_copies[model.artifact_location] = copy.model_id

    def _copy_registered_model(self, name: str) -> None:
        model = self.source.get_registered_model(name)
        versions = sorted(self._versions(self.source, name), key=lambda version: int(version.version))
        if not any(version.run_id in self.run_ids for version in versions):
            return
        self.copying, self.experiment = f"the registered model {name}", None
        if self.destination.search_registered_models(f"name = '{_quoted(name)}'"):
            for key, value in model.tags.items():
                self.destination.set_registered_model_tag(name, key, value)
        else:
            self.destination.create_registered_model(name, tags=model.tags, description=model.description)
        found = {version.tags.get(COPIED_FROM_TAG): version.version
                 for version in self._versions(self.destination, name)}
        numbers: dict[str, str] = {}
        before = self.summary.versions_copied
        for version in versions:
            if version.run_id not in self.run_ids:
                continue  # its run is deleted in the source
            key = f"{version.run_id}/{name}/{version.version}"
            if key in found:
                numbers[version.version] = found[key]
                self.summary.versions_found += 1
                continue
            numbers[version.version] = self._copy_version(version, key)
            self.summary.versions_copied += 1
        for alias, number in model.aliases.items():
            if number in numbers:
                self.destination.set_registered_model_alias(name, alias, numbers[number])
        self.report(f"model {name}: {self.summary.versions_copied - before} versions copied, "
                    f"{len(numbers) - (self.summary.versions_copied - before)} already there")

    def _copy_version(self, version, key: str) -> str:
        """Register the copy of ``version`` on the copy of its run's model; its number."""
        new_run_id = self.run_ids[version.run_id]
        model_id = self.model_copies.get(version.model_id or version.source)
        if model_id is not None:
            source = self.destination.get_logged_model(model_id).artifact_location
        else:  # registered from the run's artifacts, before runs logged models
            source = f"runs:/{new_run_id}/{_path_in_run(version.source, version.run_id)}"
        tags = {**version.tags, COPIED_FROM_TAG: key}
        copy = self.destination.create_model_version(version.name, source, run_id=new_run_id, model_id=model_id,
                                                     tags=tags, description=version.description,
                                                     await_creation_for=0)
        return copy.version

    def _download(self, artifact_uri: str, folder: Path) -> Path:
        """The files under ``artifact_uri`` of the source, in ``folder``."""
        parsed = urlparse(artifact_uri)
        if parsed.scheme == PROXIED_SCHEME and self.proxied_artifacts is not None:
            artifact_uri = (self.proxied_artifacts / parsed.path.lstrip("/")).as_uri()
        if urlparse(artifact_uri).scheme in ("", "file") and not Path(local_path(artifact_uri)).exists():
            return folder  # a run that logged no artifacts has no folder
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(folder),
                                                        tracking_uri=self.source.tracking_uri))

    @staticmethod
    def _runs(client: MlflowClient, experiment_id: str, filter_string: str = "") -> Iterator[Run]:
        return _every(client.search_runs, [experiment_id], filter_string, ViewType.ACTIVE_ONLY, PAGE,
                      order_by=["attributes.start_time ASC"])

    @staticmethod
    def _versions(client: MlflowClient, name: str) -> list:
        return list(_every(client.search_model_versions, f"name = '{_quoted(name)}'", max_results=PAGE))


def _every(search: Callable[..., PagedList], *args: Any, **kwargs: Any) -> Iterator[Any]:
    """Every result of one of the client's searches, page after page."""
    token = None
    while True:
        page = search(*args, page_token=token, **kwargs)
        yield from page
        token = page.token
        if not token:
            return


def _path_in_run(source: str, run_id: str) -> str:
    """A model version's path inside its run's artifacts, from its source (``runs:/<id>/<path>``
    or a location ending ``<id>/artifacts/<path>``)."""
    if source.startswith("runs:/"):
        return source.removeprefix(f"runs:/{run_id}/")
    return source.partition(f"{run_id}/artifacts/")[2]


def _quoted(name: str) -> str:
    return name.replace("'", "\\'")
