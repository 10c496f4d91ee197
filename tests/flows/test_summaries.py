"""What a flow's summary says about how long its run took, where to see and compare it, and
which registered version holds its model, in the terminal and in its Prefect artifact, built from
made-up outcomes (no flow runs)."""

from __future__ import annotations

import dataclasses

from gptflow.flows.summaries import FlowSummary, model_cell, model_line
from gptflow.flows.sweep import SweepSummary
from gptflow.tasks.sweep_plan import PointOutcome, SweepPoint

SERVER = "http://127.0.0.1:5000/#/experiments/1"
TABLE = f"{SERVER}/runs?viewStateShareKey=gptflow&workflowType=machine_learning"
RUN_URL = f"{SERVER}/runs/abc?workflowType=machine_learning"


def _run_id(character: str) -> str:
    return character * 32


def _address(run_id: str) -> str:
    return f"{SERVER}/runs/{run_id}?workflowType=machine_learning"


def _sweep() -> SweepSummary:
    outcomes = [PointOutcome(SweepPoint(index, {"train.learning_rate": rate}), "completed", _run_id(character),
                             val_loss=loss, perplexity=2.0, parameters=1000, tokens=2000, steps=3, training="executed",
                             trained_in_run=_run_id(character), elapsed_s=1.0)
                for index, rate, character, loss in ((1, "1e-3", "a", 5.5), (2, "3e-3", "b", 5.25))]
    return SweepSummary(run_name="learning_rate×2 · sweep tiny stdlib", elapsed_s=3.0, mlflow_run_id=_run_id("c"),
                        mlflow_view=_address(_run_id("c")), experiment="gptflow-pretrain", runs_table=TABLE,
                        swept=["train.learning_rate"], outcomes=outcomes, scaling=None, scaling_note=None)


def test_the_sweep_artifact_links_each_point_s_run_by_the_start_of_its_id():
    markdown = _sweep().markdown(_address)
    assert f"MLflow run [{_run_id('c')}]({_address(_run_id('c'))}) nests a run per point." in markdown
    rows = [line for line in markdown.splitlines() if line.startswith(("| 1 ", "| 2 (best) "))]
    assert [row.rsplit("|", 2)[1].strip() for row in rows] == [f"[aaaaaaaa]({_address(_run_id('a'))})",
                                                                 f"[bbbbbbbb]({_address(_run_id('b'))})"]


def test_without_a_tracking_server_the_sweep_artifact_names_whole_run_ids():
    markdown = _sweep().markdown(lambda run_id: None)
    assert f"| {_run_id('a')} |" in markdown and "](" not in markdown


def test_a_printed_summary_ends_with_the_run_and_its_experiment_s_runs_table():
    lines = _sweep().render().splitlines()
    assert lines[-3:] == [f"mlflow      run {_run_id('c')} (the points are its nested runs)",
                          f"            {_address(_run_id('c'))}", f"compare     gptflow-pretrain: {TABLE}"]


def test_a_flow_s_artifact_links_its_run_and_its_experiment_s_runs_table():
    summary = _sweep()
    table = FlowSummary.table(summary, "pretrain", ["| val loss | 5.25 |"], _address(_run_id("c"))).splitlines()
    assert table[-2:] == [f"| MLflow run | [{_run_id('c')}]({_address(_run_id('c'))}) |",
                          f"| compare in | [gptflow-pretrain]({TABLE}) |"]
    assert FlowSummary.table(summary, "pretrain", [], None).splitlines()[-1] == "| compare in | gptflow-pretrain |"


def test_the_wall_time_says_what_it_measures():
    summary = FlowSummary(run_name="pretrain tiny", elapsed_s=38.4, mlflow_run_id="abc", mlflow_view="http://mlflow",
                          experiment="gptflow-pretrain", runs_table=TABLE)
    # A flow run no command ran (a deployment's): the flow run alone.
    assert summary.closing_lines()[0] == "wall time   38s in the flow run"
    # The command ran longer: it imported torch and Prefect, and started Prefect's temporary server.
    ran_by_command = dataclasses.replace(summary, command_s=60.2)
    assert ran_by_command.closing_lines() == ["wall time   1m00s since the command started, 38s in the flow run",
                                              "mlflow      run abc", "            http://mlflow",
                                              f"compare     gptflow-pretrain: {TABLE}"]



def test_the_model_line_names_the_version_and_how_to_use_it():
    assert model_line("gptflow-tiny/3", "gptflow generate --model {uri}") == (
        "model       models:/gptflow-tiny/3: gptflow generate --model models:/gptflow-tiny/3")
    assert model_line("gptflow-tiny/pending", "unused {uri}").startswith(
        "model       gptflow-tiny/pending: registered once the run's MLflow outbox is sent")


def test_the_artifact_links_the_version_in_mlflow_s_model_training_view():
    # Prefect's UI shows a link's text as it is: code backticks only where nothing links.
    assert model_cell("gptflow-tiny/3", RUN_URL) == (
        "[models:/gptflow-tiny/3](http://127.0.0.1:5000/#/models/gptflow-tiny/versions/3?workflowType=machine_learning)")
    assert model_cell("gptflow-tiny/3", None) == "`models:/gptflow-tiny/3`"
    assert model_cell("gptflow-tiny/pending", RUN_URL) == "`models:/gptflow-tiny/pending`"
