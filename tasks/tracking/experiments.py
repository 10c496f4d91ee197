"""The MLflow experiments runs go to, one per kind of work, so that runs compare with their own
kind: found or created, described, given the runs table gptflow's addresses open, and set aside
when their store was copied from another workspace along with the workspace.

Each kind of work (``WORKFLOWS``) has its experiment, ``gptflow-<workflow>``: ``gptflow-pretrain``
holds pretraining runs and sweeps (a sweep's points nest under its run, so they must share its
experiment), ``gptflow-finetune``, ``gptflow-evaluate`` and ``gptflow-import`` the others. A
fine-tune's losses are per example or per response token, a pretraining's per token: in one
experiment, one kind's curves squash the other's. ``$MLFLOW_EXPERIMENT_NAME`` replaces the prefix
``gptflow`` (``alice`` gives ``alice-pretrain``, ...), so that people sharing a tracking server
keep their runs apart and each kind still has its own experiment.

Each experiment is tagged ``mlflow.experimentKind=custom_model_development`` (trained models),
described (the experiments list's *Description*), and holds gptflow's saved view of its runs
table (``tasks.tracking.runs_view``), set when missing so that a view a user saved over it stays.
An experiment gptflow creates in a SQLite store keeps its artifacts in ``mlartifacts/`` beside
the database: the workspace's own for ``mlflow.db``, never ``./mlruns`` of whatever folder a
command started in (``artifacts_beside_store``). MLflow writes those locations as absolute paths, so when an experiment of the
workspace's own store (``mlflow.db``, directly or through ``gptflow up``'s server) keeps its
artifacts in another workspace's ``mlartifacts/``, the store was copied: the first run on the copy
renames that experiment ``<name> (copied from <original>)`` (its runs stay comparable, their
artifacts where they were) and creates a fresh one of the name in the copy. A registered version
whose files lay in a folder since deleted counts as lost (``tasks.tracking.registry``): the next
cached run logs and registers the model again from the copy's store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from mlflow import MlflowClient
from mlflow.entities import Experiment
from mlflow.exceptions import MlflowException

from gptflow.data.errors import UserError
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.tracking.progress import run_logger
from gptflow.tasks.tracking.runs_view import VIEW_TAG, RunsView, runs_table_address
from gptflow.tasks.tracking.server import permission_denied, server_unreachable

EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_PREFIX = "gptflow"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""The experiment's kind in MLflow 3: trained models, not GenAI apps. MLflow 3.17's UI opens its
pages in the view the browser keeps or the address asks for (``tasks.tracking.runs_view.ML_VIEW``),
not by this kind."""
DESCRIPTION_TAG = "mlflow.note.content"


@dataclass(frozen=True)
class Workflow:
    """A kind of work with its own experiment: what it holds, and how its runs table opens."""

    description: str
    view: RunsView


WORKFLOWS = {
    "pretrain": Workflow(
        "Pretraining and sweeps (gptflow pretrain, gptflow sweep); a sweep's points nest under its run.",
        RunsView("gptflow: lowest val loss first", ("eval/val_loss", "eval/bits_per_byte", "eval_corpus/bits_per_byte"),
                 attributes=("Models", "Dataset"), lowest_first="eval/val_loss")),
    "finetune": Workflow(
        "Fine-tuning (gptflow finetune). A loss is per response token (sft, chat) or per example "
        "(classification, tagging): compare runs of one objective.",
        RunsView("gptflow: newest first", ("eval/val_loss", "eval/accuracy", "eval/macro_f1"),
                 params=("objective", "base_model"))),
    "evaluate": Workflow(
        "Evaluations (gptflow evaluate); bits per byte compare models across tokenizers.",
        RunsView("gptflow: fewest bits per byte first",
                 ("eval/bits_per_byte", "eval/val_loss", "eval/mc_acc_norm", "eval/accuracy"),
                 params=("model_source",), attributes=("Dataset",), lowest_first="eval/bits_per_byte")),
    "import": Workflow(
        "Imported checkpoints (gptflow import) of Hugging Face Transformers models.",
        RunsView("gptflow: newest first", (), params=("source", "architecture"))),
}
"""Each kind of work: its experiment's description (what the experiments list shows, its start
first) and its runs table."""


def experiment_name(workflow: str) -> str:
    """``gptflow-pretrain``, or ``<$MLFLOW_EXPERIMENT_NAME>-pretrain``."""
    return f"{os.environ.get(EXPERIMENT_ENV) or DEFAULT_PREFIX}-{workflow}"


class TrackingPermissionDenied(UserError):
    """The tracking server refuses this user the experiment a run goes to; the admin grants it."""


class TrackingServerUnreachable(UserError):
    """The tracking server a run starts on cannot be reached; the message says what to do."""


def experiment_id(client: MlflowClient, workspace: Workspace, workflow: str) -> str:
    """The experiment of ``workflow`` (a key of ``WORKFLOWS``); ``TrackingServerUnreachable`` at
    once when the server cannot be reached, before anything is computed."""
    try:
        return _find_or_create_experiment(client, workspace, workflow)
    except MlflowException as error:
        if permission_denied(error):
            raise refusal_of(client, workflow) from None
        if not server_unreachable(error):
            raise
        raise TrackingServerUnreachable(
            f"The MLflow tracking server {client.tracking_uri} (MLFLOW_TRACKING_URI) cannot be reached. Start it "
            "(`gptflow up` starts one for this workspace), or unset MLFLOW_TRACKING_URI to log to the workspace's "
            "own store."
        ) from error


def refusal_of(client: MlflowClient, workflow: str) -> TrackingPermissionDenied:
    """What a user is told whom the tracking server refuses the experiment of ``workflow``."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME", "this user")
    return TrackingPermissionDenied(f"The MLflow server {client.tracking_uri} does not let {user} run in the "
                                    f"experiment {experiment_name(workflow)}: ask its admin for `gptflow user grant "
                                    f"{user} edit`.")


def runs_tables(client: MlflowClient, workspace: Workspace) -> dict[str, str]:
    """Each workflow's experiment name and the address of its runs table on the tracking server
    of ``client``, the experiment found or created: where ``gptflow up`` and ``serve`` point."""
    tables = {}
    for workflow in WORKFLOWS:
        experiment = experiment_id(client, workspace, workflow)
        tables[experiment_name(workflow)] = runs_table_address(client.tracking_uri, experiment)
    return tables


def existing_experiment_ids(client: MlflowClient) -> list[str]:
    """The ids of the workflows' experiments that exist."""
    found = (client.get_experiment_by_name(experiment_name(workflow)) for workflow in WORKFLOWS)
    return [experiment.experiment_id for experiment in found if experiment is not None]


def local_path(uri: str) -> str:
    """The folder of a ``file:`` URI; any other URI as it is."""
    parsed = urlparse(uri)
    return url2pathname(parsed.path) if parsed.scheme == "file" else uri


def _find_or_create_experiment(client: MlflowClient, workspace: Workspace, workflow: str) -> str:
    name = experiment_name(workflow)
    tags = {**EXPERIMENT_KIND, DESCRIPTION_TAG: WORKFLOWS[workflow].description,
            VIEW_TAG: WORKFLOWS[workflow].view.tag_value()}
    experiment = client.get_experiment_by_name(name)
    if experiment is not None and (original := _copied_from(experiment.artifact_location, workspace)):
        experiment = _set_aside(client, experiment, original)
    if experiment is not None:
        for key, value in tags.items():
            if key not in experiment.tags:  # made before gptflow set it; what a user set stays
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    location = artifacts_beside_store(client.tracking_uri, workspace)
    try:
        return client.create_experiment(name, artifact_location=location and location.as_uri(), tags=tags)
    except MlflowException:
        # A concurrent run created it first.
        return client.get_experiment_by_name(name).experiment_id


def artifacts_beside_store(tracking_uri: str, workspace: Workspace) -> Path | None:
    """Where a new experiment of a SQLite store keeps its artifacts: the ``mlartifacts/`` folder
    beside its database (the workspace's own, for its ``mlflow.db``), whatever folder a command
    starts in; MLflow's default would be ``./mlruns`` of that folder. None for a tracking server or
    a file store, whose artifacts have their place already."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = urlparse(tracking_uri).path.removeprefix("/")  # sqlite:///rel.db, sqlite:////abs/path.db
    if database in ("", ":memory:"):
        return None
    return Path(database).resolve().parent / workspace.mlflow_artifacts.name


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
