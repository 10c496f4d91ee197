"""The MLflow experiment a run goes to: found or created, marked as holding trained models, and set
aside when its store was copied from another workspace along with the workspace.

The experiment is ``gptflow`` (or ``$MLFLOW_EXPERIMENT_NAME``), tagged
``mlflow.experimentKind=custom_model_development``; with the workspace's own SQLite store it keeps
its artifacts in the workspace's ``mlartifacts/``. MLflow writes those locations as absolute
paths, so when the experiment of the workspace's own store (``mlflow.db``, directly or through
``gptflow up``'s server) keeps its artifacts in another workspace's ``mlartifacts/``, the store
was copied: the first run on the copy renames that experiment ``gptflow (copied from
<original>)`` (its runs stay comparable, their artifacts where they were) and creates a fresh
``gptflow`` experiment in the copy. A registered version whose files lay in a folder since
deleted counts as lost (``tasks.tracking.registry``): the next cached run logs and registers the
model again from the copy's store. Every MLflow address gptflow prints carries ``ML_VIEW``, since
MLflow 3 opens experiments on its GenAI pages otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from mlflow import MlflowClient
from mlflow.entities import Experiment
from mlflow.exceptions import MlflowException

from gptflow.data.errors import UserError
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.tracking.progress import run_logger
from gptflow.tasks.tracking.server import server_unreachable

EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "gptflow"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""Tells MLflow 3's UI that the experiment holds trained models: it opens on the runs, not on the
GenAI traces page."""
ML_VIEW = "workflowType=machine_learning"
"""The query that opens an MLflow 3 UI page in its machine-learning view, for links gptflow prints."""


class TrackingServerUnreachable(UserError):
    """The tracking server a run starts on cannot be reached; the message says what to do."""


def experiment_id(client: MlflowClient, workspace: Workspace) -> str:
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


def local_path(uri: str) -> str:
    """The folder of a ``file:`` URI; any other URI as it is."""
    parsed = urlparse(uri)
    return url2pathname(parsed.path) if parsed.scheme == "file" else uri


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
    location = Path(local_path(artifact_location))
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
