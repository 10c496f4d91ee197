"""Each kind of work in an MLflow experiment of its own, holding the runs table gptflow's addresses
open, against a real SQLite tracking store in a temp workspace."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.tracking.experiments import WORKFLOWS, experiment_id
from gptflow.tasks.tracking.run import PipelineRun, pipeline_run
from gptflow.tasks.tracking.runs_view import VIEW_TAG

RUNS_VIEW = "viewStateShareKey=gptflow&workflowType=machine_learning"


@pytest.fixture()
def workspace(tmp_path, monkeypatch) -> Workspace:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return Workspace.resolve(tmp_path / "ws")


def _experiment_name(client: MlflowClient, run: PipelineRun) -> str:
    return client.get_experiment(client.get_run(run.run_id).info.experiment_id).name


def test_pretrain_and_finetune_runs_land_in_experiments_of_their_own(workspace):
    with pipeline_run(workspace, "pretrain", tags={}, name="pretraining") as pretraining:
        pass
    with pipeline_run(workspace, "finetune", tags={}, name="fine-tuning") as finetuning:
        pass
    client = MlflowClient(workspace.tracking_uri)
    assert _experiment_name(client, pretraining) == "gptflow-pretrain"
    assert _experiment_name(client, finetuning) == "gptflow-finetune"


def test_mlflow_experiment_name_replaces_the_prefix_of_every_experiment(workspace, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "alice")
    with pipeline_run(workspace, "evaluate", tags={}, name="evaluation") as run:
        pass
    assert _experiment_name(MlflowClient(workspace.tracking_uri), run) == "alice-evaluate"


def test_every_experiment_holds_the_saved_view_of_its_runs_table(workspace):
    client = MlflowClient(workspace.tracking_uri)
    states = {}
    for workflow, expected in WORKFLOWS.items():
        experiment = client.get_experiment(experiment_id(client, workspace, workflow))
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
        assert experiment.tags["mlflow.note.content"] == expected.description  # the experiments list's Description
        # The envelope MLflow's own "Save view" writes, whose state is JSON of the UI's state.
        envelope = json.loads(experiment.tags[VIEW_TAG])
        assert envelope["name"] == expected.view.name and isinstance(envelope["createdAt"], int)
        states[workflow] = json.loads(envelope["state"])
    pretrain = states["pretrain"]
    assert pretrain["selectedColumns"] == ["metrics.`eval/val_loss`", "metrics.`eval/bits_per_byte`",
                                           "metrics.`eval_corpus/bits_per_byte`", "attributes.`Models`",
                                           "attributes.`Dataset`"]
    assert pretrain["orderByKey"] == "metrics.`eval/val_loss`" and pretrain["orderByAsc"] is True
    # The columns right after the run's name, which is wide enough for the settings it starts with.
    assert pretrain["columnOrder"] == ["attributes.`Run Name`", *pretrain["selectedColumns"]]
    assert pretrain["columnWidths"]["attributes.`Run Name`"] >= 300
    assert "params.`objective`" in states["finetune"]["selectedColumns"]
    assert "orderByKey" not in states["import"]  # newest first, MLflow's default


def test_a_view_a_user_saved_over_gptflow_s_stays(workspace):
    client = MlflowClient(workspace.tracking_uri)
    experiment = experiment_id(client, workspace, "pretrain")
    client.set_experiment_tag(experiment, VIEW_TAG, '{"name": "mine"}')
    assert experiment_id(client, workspace, "pretrain") == experiment
    assert client.get_experiment(experiment).tags[VIEW_TAG] == '{"name": "mine"}'


def test_every_address_a_run_gives_opens_the_runs_view(workspace):
    with pipeline_run(workspace, "pretrain", tags={}, name="addresses") as run:
        pass
    experiment = f"/#/experiments/{run.experiment_id}"
    # The workspace's own store: the address of the run and the table in the `mlflow ui` serving it.
    assert run.how_to_view().endswith(f"http://127.0.0.1:5000{experiment}/runs/{run.run_id}?workflowType="
                                      "machine_learning")
    assert run.runs_table == f"http://127.0.0.1:5000{experiment}/runs?{RUNS_VIEW}"
    served = PipelineRun(MlflowClient("http://mlflow.example:5000"), run.run_id, run.outbox, run.name,
                         run.experiment_id, "pretrain")
    assert served.how_to_view() == served.url == (f"http://mlflow.example:5000{experiment}/runs/{run.run_id}"
                                                  "?workflowType=machine_learning")
    assert served.url_of("0" * 32) == f"http://mlflow.example:5000{experiment}/runs/{'0' * 32}?workflowType=" \
                                      "machine_learning"
    assert served.runs_table == f"http://mlflow.example:5000{experiment}/runs?{RUNS_VIEW}"


def test_a_copied_store_sets_each_experiment_aside_and_the_copy_s_runs_go_to_new_ones(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    original = Workspace.resolve(tmp_path / "original")
    for workflow in ("pretrain", "finetune"):
        with pipeline_run(original, workflow, tags={}, name=f"{workflow} in the original"):
            pass
    shutil.copytree(original.root, tmp_path / "copy")
    copy = Workspace.resolve(tmp_path / "copy")
    client = MlflowClient(copy.tracking_uri)
    for workflow in ("pretrain", "finetune"):
        with pipeline_run(copy, workflow, tags={}, name=f"{workflow} in the copy") as run:
            pass
        experiment = client.get_experiment(run.experiment_id)
        assert experiment.name == f"gptflow-{workflow}"
        assert experiment.artifact_location == copy.mlflow_artifacts.as_uri()
        assert VIEW_TAG in experiment.tags
        aside = client.get_experiment_by_name(f"gptflow-{workflow} (copied from {original.root})")
        [earlier] = client.search_runs([aside.experiment_id])
        assert earlier.info.run_name == f"{workflow} in the original"


def test_mlflow_s_ui_still_reads_the_view_and_the_query_gptflow_writes():
    """What ``tasks.tracking.runs_view`` relies on, in the UI bundle of the installed MLflow: an
    upgrade that drops it fails here rather than in a user's browser."""
    bundle = "".join(path.read_text(errors="replace")
                     for path in (Path(mlflow.__file__).parent / "server/js/build/static/js").glob("*.js"))
    for relied_on in ('"viewStateShareKey"', '"mlflow.sharedViewState."', '"workflowType"', '"machine_learning"',
                      '["searchFilter","orderByKey","orderByAsc"', '["selectedColumns","columnOrder","columnWidths"',
                      '".`"'):  # a column's name: <type>.`<key>`
        assert relied_on in bundle, relied_on


def test_a_sqlite_store_named_by_the_user_keeps_artifacts_beside_it_whatever_folder_the_command_starts_in(
    workspace, tmp_path, monkeypatch
):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for store in (workspace.root, tmp_path / "team-store"):  # the workspace's own store, and another one
        store.mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
        with pipeline_run(workspace, "evaluate", tags={}, name="deployment run") as run:
            run.log_text("{}", "eval/report.json")
        assert (store / "mlartifacts" / run.run_id / "artifacts" / "eval" / "report.json").read_text() == "{}"
    assert list(elsewhere.iterdir()) == []  # no ./mlruns
