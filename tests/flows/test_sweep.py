"""The sweep flow on a real Prefect server and a real MLflow store: its points train as child flow
runs in worker processes, nest under one MLflow run, share the data stages, and a rerun trains
only the points it adds."""

from __future__ import annotations

import math
import os
import shutil
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

from gptflow.flows.sweep import sweep
from gptflow.tasks.runtime.gpu_share import GPUS_VARIABLE, GpuShareError
from gptflow.tasks.runtime.point_workers import GPUS_TAG

pytestmark = pytest.mark.slow

DATA_STAGES = ("ingest", "tokenizer", "tokenize")
# Few steps: the sweep machinery is under test, not learning.
SHARED = {"train.max_steps": 6, "train.val_interval": 3, "train.log_interval": 3, "eval.eval_tokens": 1024}
LEARNING_RATES = ["1e-3", "3e-3", "1e-2", "3e-2"]


@pytest.fixture(scope="module")
def sweep_workspace(prefect_api_url, tiny_corpus_dir, tmp_path_factory):
    """A workspace and a small corpus (one package of the tiny corpus) for the module's sweeps."""
    corpus = tmp_path_factory.mktemp("sweep-corpus")
    for source in sorted(tiny_corpus_dir.glob("json_*.py")):
        shutil.copy2(source, corpus / source.name)
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield tmp_path_factory.mktemp("sweep-workspace"), corpus


def _sweep(workspace: Path, corpus: Path, grid: dict[str, list[str]], overrides=SHARED, **options):
    """The sweep's summary and its Prefect flow run id."""
    state = sweep(grid=grid, corpus=[str(corpus)], preset="tiny", overrides=overrides, workspace=str(workspace),
                  max_parallel=2, return_state=True, **options)
    return state.result(), state.state_details.flow_run_id


def _children(workspace: Path, parent_run_id: str) -> list:
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    return client.search_runs([client.get_run(parent_run_id).info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def test_a_sweep_nests_its_points_shares_the_data_stages_and_a_rerun_trains_only_the_new_point(
    sweep_workspace, artifact_paths
):
    workspace, corpus = sweep_workspace
    first, flow_run_id = _sweep(workspace, corpus, {"train.learning_rate": LEARNING_RATES})

    assert [outcome.status for outcome in first.outcomes] == ["completed"] * 4
    children = _children(workspace, first.mlflow_run_id)
    assert len(children) == 4
    assert {child.data.tags["gptflow.sweep.point"] for child in children} == {"1", "2", "3", "4"}
    assert {child.data.params["train.learning_rate"] for child in children} == {"0.001", "0.003", "0.01", "0.03"}
    # Each point's name leads with its swept setting, before the shared ones (whatever their names).
    assert sorted(child.info.run_name.split(" ")[0] for child in children) == sorted(
        f"learning_rate={rate}" for rate in LEARNING_RATES)
    # The data stages ran in one point; the three others found them in the cache, even while
    # the first was still computing them (two points start at once).
    for stage in DATA_STAGES:
        statuses = sorted(child.data.tags[f"gptflow.stage.{stage}"] for child in children)
        assert statuses == ["cached", "cached", "cached", "executed"], stage
    assert {child.data.tags["gptflow.stage.pretrain"] for child in children} == {"executed"}

    best = min(first.outcomes, key=lambda outcome: outcome.val_loss)
    assert first.best.point.index == best.point.index
    tagged_best = [child.info.run_id for child in children if child.data.tags.get("gptflow.sweep.best") == "true"]
    assert tagged_best == [best.mlflow_run_id]
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    parent = client.get_run(first.mlflow_run_id)
    assert parent.data.params["train.learning_rate"] == ",".join(LEARNING_RATES)
    assert parent.data.metrics["sweep/best_val_loss"] == pytest.approx(best.val_loss)
    assert parent.data.metrics["sweep/points_completed"] == 4
    assert parent.data.tags["gptflow.sweep.best_run"] == best.mlflow_run_id
    description = parent.data.tags["mlflow.note.content"]
    assert "| point | train.learning_rate | status | eval/val_loss |" in description and "| error |" not in description
    artifacts = artifact_paths(client, first.mlflow_run_id)
    assert {"sweep/points.csv", "sweep/points.md", "sweep/val_loss_vs_train.learning_rate.png",
            "sweep/val_loss_curves.png"} <= artifacts
    table = Path(client.download_artifacts(first.mlflow_run_id, "sweep/points.csv")).read_text().splitlines()
    assert len(table) == 5 and table[0].startswith("point,train.learning_rate,status,mlflow_run_id,val_loss")

    # Prefect: each point's pretrain flow run is a child flow run of the sweep's flow run.
    with get_client(sync_client=True) as prefect:
        for child in children:
            child_flow_run = prefect.read_flow_run(uuid.UUID(child.data.tags["prefect.flow_run_id"]))
            assert prefect.read_task_run(child_flow_run.parent_task_run_id).flow_run_id == flow_run_id
        [artifact] = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["sweep-summary"]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        assert "| 4 | 3e-2 | completed |" in artifact.data.replace(" (best)", "")

    second, _ = _sweep(workspace, corpus, {"train.learning_rate": [*LEARNING_RATES, "1e-1"]})
    trainings = {outcome.point.settings["train.learning_rate"]: outcome.training for outcome in second.outcomes}
    assert trainings == {"1e-3": "cached", "3e-3": "cached", "1e-2": "cached", "3e-2": "cached", "1e-1": "executed"}
    assert [o.val_loss for o in second.outcomes[:4]] == [o.val_loss for o in first.outcomes]
    assert len(_children(workspace, second.mlflow_run_id)) == 5
    # A cached point names the run that trained it, in the table and on its own run, whose
    # curves and model are that run's.
    cached, trained_by = second.outcomes[0], first.outcomes[0].mlflow_run_id
    assert f"| cached: trained by run {trained_by[:8]} |" in second.markdown(lambda run_id: None)
    cached_run = client.get_run(cached.mlflow_run_id)
    assert f"/runs/{trained_by}?" in cached_run.data.tags["mlflow.note.content"]
    assert [model.model_id for model in cached_run.inputs.model_inputs] == [
        output.model_id for output in client.get_run(trained_by).outputs.model_outputs]
    assert ([point.value for point in client.get_metric_history(cached.mlflow_run_id, "val/loss")]
            == [point.value for point in client.get_metric_history(trained_by, "val/loss")])


def test_a_failing_point_is_reported_and_the_others_complete(sweep_workspace):
    workspace, corpus = sweep_workspace
    # A context longer than the corpus's val split passes every setting's check and fails in training.
    summary, _ = _sweep(workspace, corpus, {"model.block_size": ["32", "60000"]})

    completed, failed = summary.outcomes
    assert completed.status == "completed" and completed.val_loss > 0
    assert failed.status == "failed" and "fewer than one window of block_size + 1 = 60001" in failed.error
    assert summary.best.point.index == 1
    children = {child.data.tags["gptflow.sweep.point"]: child for child in _children(workspace, summary.mlflow_run_id)}
    assert children["2"].info.status == "FAILED" and failed.mlflow_run_id == children["2"].info.run_id
    assert "failed      1 of 2 points" in summary.render()
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    assert client.get_run(summary.mlflow_run_id).data.metrics["sweep/points_failed"] == 1


def test_a_scaling_sweep_fits_the_law_and_logs_the_compute_optimal_size(sweep_workspace, artifact_paths):
    workspace, corpus = sweep_workspace
    steps_swept = {name: value for name, value in SHARED.items() if name != "train.max_steps"}
    summary, _ = _sweep(workspace, corpus, {"model.n_layer": ["1", "2", "3"], "train.max_steps": ["4", "8"]},
                        overrides=steps_swept, scaling=True, compute_budget=1e12)

    assert [outcome.status for outcome in summary.outcomes] == ["completed"] * 6
    assert len({outcome.parameters for outcome in summary.outcomes}) == 3
    assert len({outcome.tokens for outcome in summary.outcomes}) == 2
    report = summary.scaling
    assert report is not None and report.compute_budget == 1e12
    # The fitted law passes near the points it was fitted to, and its optimum spends the budget.
    for outcome in summary.outcomes:
        assert report.law.loss(outcome.parameters, outcome.tokens) == pytest.approx(outcome.val_loss, rel=0.05)
    assert 6 * report.optimal_parameters * report.optimal_tokens == pytest.approx(1e12, rel=1e-6)
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    metrics = client.get_run(summary.mlflow_run_id).data.metrics
    assert all(math.isfinite(metrics[f"scaling/{name}"]) for name in ("E", "A", "alpha", "B", "beta"))
    assert metrics["scaling/optimal_parameters"] == pytest.approx(report.optimal_parameters)
    assert "sweep/scaling_fit.png" in artifact_paths(client, summary.mlflow_run_id)
    assert "scaling     L(N, D) = " in summary.render()


def test_points_run_as_tasks_on_a_ray_cluster(sweep_workspace, ray_cluster):
    workspace, corpus = sweep_workspace
    summary, flow_run_id = _sweep(workspace, corpus, {"train.learning_rate": ["1e-3", "3e-2"]}, ray=ray_cluster)

    assert [outcome.status for outcome in summary.outcomes] == ["completed"] * 2
    children = _children(workspace, summary.mlflow_run_id)
    assert len(children) == 2
    with get_client(sync_client=True) as prefect:
        for child in children:
            child_flow_run = prefect.read_flow_run(uuid.UUID(child.data.tags["prefect.flow_run_id"]))
            assert prefect.read_task_run(child_flow_run.parent_task_run_id).flow_run_id == flow_run_id
    # Each point ran in a process of the cluster's, not in this one or a worker it started.
    assert {child.data.tags["gptflow.pid"] for child in children}.isdisjoint({str(os.getpid())})


def test_each_worker_process_trains_its_points_on_gpus_of_its_own(sweep_workspace, monkeypatch):
    workspace, corpus = sweep_workspace
    # Four GPUs named as if the sweep were started with CUDA_VISIBLE_DEVICES set: each of the two
    # workers sees its own two, whatever the sweep's environment says, which Prefect copies into tasks.
    monkeypatch.setenv(GPUS_VARIABLE, "4,5,6,7")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    summary, _ = _sweep(workspace, corpus, {"train.learning_rate": LEARNING_RATES[:2]})

    assert [outcome.status for outcome in summary.outcomes] == ["completed"] * 2
    children = _children(workspace, summary.mlflow_run_id)
    assert sorted(child.data.tags[GPUS_TAG] for child in children) == ["4,5", "6,7"]
    assert len({child.data.tags["gptflow.pid"] for child in children} - {str(os.getpid())}) == 2

    with pytest.raises(GpuShareError, match="--max-parallel 3 does not divide the 4 GPUs of this machine"):
        sweep(grid={"train.learning_rate": LEARNING_RATES}, corpus=[str(corpus)], preset="tiny", overrides=SHARED,
              workspace=str(workspace), max_parallel=3)


def test_each_point_on_ray_asks_for_its_share_of_the_cluster_s_gpus(sweep_workspace, ray_cluster_with_gpus):
    workspace, corpus = sweep_workspace
    summary, _ = _sweep(workspace, corpus, {"train.learning_rate": LEARNING_RATES[:2]}, ray=ray_cluster_with_gpus)

    assert [outcome.status for outcome in summary.outcomes] == ["completed"] * 2
    # One GPU each (2 GPUs, 2 points at once): Ray gave each task its own.
    children = _children(workspace, summary.mlflow_run_id)
    assert sorted(child.data.tags[GPUS_TAG] for child in children) == ["0", "1"]


def test_a_sweep_round_trips_through_push_history_into_a_team_server(sweep_workspace, artifact_serving_mlflow):
    from gptflow.tasks.tracking.history_copy import COPIED_FROM_TAG, copy_history

    workspace, corpus = sweep_workspace
    swept, _ = _sweep(workspace, corpus, {"train.learning_rate": LEARNING_RATES[:2]})  # cached after the first test
    local = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    team = MlflowClient(artifact_serving_mlflow)

    first = copy_history(workspace, artifact_serving_mlflow, lambda line: None)

    [parent] = team.search_runs([team.get_experiment_by_name("gptflow-pretrain").experiment_id],
                                f"tags.`{COPIED_FROM_TAG}` = '{swept.mlflow_run_id}'")
    copied = {child.data.tags[COPIED_FROM_TAG]: child for child in team.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    originals = _children(workspace, swept.mlflow_run_id)
    assert sorted(copied) == sorted(child.info.run_id for child in originals) and len(copied) == 2
    for original in originals:
        copy = copied[original.info.run_id]
        assert (copy.info.run_name, copy.info.status, copy.info.start_time, copy.info.end_time) == (
            original.info.run_name, original.info.status, original.info.start_time, original.info.end_time)
        assert copy.data.params == original.data.params and copy.data.metrics == original.data.metrics
        for key in original.data.metrics:
            history = [(m.step, m.value, m.timestamp) for m in local.get_metric_history(original.info.run_id, key)]
            assert [(m.step, m.value, m.timestamp) for m in team.get_metric_history(copy.info.run_id, key)] == history
    for model in local.search_registered_models():
        versions = local.search_model_versions(f"name = '{model.name}'")
        assert len(team.search_model_versions(f"name = '{model.name}'")) == len(versions)
        assert team.get_registered_model(model.name).aliases.keys() == model.aliases.keys()

    again = copy_history(workspace, artifact_serving_mlflow, lambda line: None)
    assert first.runs_copied > 0 and (again.runs_copied, again.versions_copied) == (0, 0)
    assert again.runs_found == first.runs_copied
