"""How a flow's summary names the registered version of its model, in the terminal and in Prefect."""

from __future__ import annotations

from gptflow.flows.summaries import model_cell, model_line

RUN_URL = "http://127.0.0.1:5000/#/experiments/1/runs/abc?workflowType=machine_learning"


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
