"""``gptflow push-history`` copies a workspace's MLflow history, a sweep with its nested points
and registered models included, into a real MLflow server that serves its artifacts; a second
copy copies nothing, and a copy a stop left half-written is made anew."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import mlflow.artifacts
import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, Metric, RunTag, ViewType

from gptflow.flows.cli import main
from gptflow.tasks.tracking.history_copy import COPIED_FROM_TAG, COPY_COMPLETE_TAG, copy_history

EXPERIMENT = "gptflow-pretrain"
MODEL = "gptflow-tiny"
SERVED_EXPERIMENT = "gptflow-evaluate"


@pytest.fixture
def laptop(tmp_path) -> Path:
    """A workspace whose own store holds a sweep (a parent run, two nested points that each logged
    a model), a registered model with two versions, the newest aliased ``champion``, and a run
    logged through `gptflow up`'s server (its artifacts in the workspace's mlartifacts/)."""
    workspace = tmp_path / "history-laptop"
    workspace.mkdir()
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.create_experiment(EXPERIMENT, artifact_location=(workspace / "mlartifacts").as_uri(),
                                          tags={"mlflow.note.content": "pretraining"})
    sweep = client.create_run(experiment, start_time=1_000, run_name="sweep lr", tags={"gptflow.kind": "sweep"})
    client.log_param(sweep.info.run_id, "grid", "train.learning_rate=1e-3,1e-2")
    for index, rate in enumerate(("0.001", "0.01"), start=1):
        point = client.create_run(experiment, start_time=2_000 + index, run_name=f"learning_rate={rate}",
                                  tags={"mlflow.parentRunId": sweep.info.run_id, "gptflow.sweep.point": str(index)})
        run_id = point.info.run_id
        client.log_batch(run_id, metrics=[Metric("val_loss", 5.0 / (step + index), 3_000 + step, step)
                                          for step in range(0, 30, 3)],
                         params=[], tags=[RunTag("gptflow.stage.pretrain", "executed")])
        client.log_param(run_id, "train.learning_rate", rate)
        samples = workspace / f"samples-{index}.txt"
        samples.write_bytes(f"point {index}\n".encode() + bytes(range(256)))
        client.log_artifact(run_id, str(samples), "samples")
        model = client.create_logged_model(experiment, name=MODEL, source_run_id=run_id, model_type="gptflow",
                                           params={"weights_hash": f"hash{index}"})
        weights = workspace / f"weights-{index}"
        weights.mkdir()
        (weights / "model.safetensors").write_bytes(os.urandom(4096))
        client.log_model_artifacts(model.model_id, str(weights))
        client.finalize_logged_model(model.model_id, "READY")
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
        if index == 1:
            client.create_registered_model(MODEL, description="tiny GPTs")
        client.create_model_version(MODEL, model.artifact_location, run_id=run_id, model_id=model.model_id,
                                    tags={"gptflow.weights_hash": f"hash{index}"}, await_creation_for=0)
        client.set_terminated(run_id, "FINISHED" if index == 1 else "FAILED", end_time=9_000 + index)
    client.set_registered_model_alias(MODEL, "champion", "2")
    client.set_terminated(sweep.info.run_id, "FINISHED", end_time=9_999)
    # A run logged through `gptflow up`'s server, which keeps its artifacts in the workspace's mlartifacts/.
    served = client.create_experiment(SERVED_EXPERIMENT, artifact_location="mlflow-artifacts:/7")
    evaluation = client.create_run(served, run_name="evaluate").info.run_id
    report = workspace / "mlartifacts" / "7" / evaluation / "artifacts" / "report.json"
    report.parent.mkdir(parents=True)
    report.write_text('{"accuracy": 0.75}')
    client.set_terminated(evaluation)
    return workspace


def _history(client: MlflowClient, root: Path) -> dict:
    """Everything the copy must carry over, keyed by run name, with the artifacts' bytes."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ACTIVE_ONLY)
    names = {run.info.run_id: run.info.run_name for run in runs}
    history = {}
    for run in runs:
        run_id = run.info.run_id
        folder = root / run.info.run_name.replace("=", "-").replace(" ", "-")
        folder.mkdir(parents=True)
        client.download_artifacts(run_id, "", str(folder))
        model_ids = [output.model_id for output in run.outputs.model_outputs]
        history[run.info.run_name] = {
            "times": (run.info.start_time, run.info.end_time), "status": run.info.status,
            "params": run.data.params,
            "tags": {key: value for key, value in run.data.tags.items()
                     if key.startswith("gptflow.") and not key.startswith((COPIED_FROM_TAG, COPY_COMPLETE_TAG))},
            "parent": names.get(run.data.tags.get("mlflow.parentRunId")),
            "val_loss": [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, "val_loss")],
            "artifacts": {str(path.relative_to(folder)): path.read_bytes()
                          for path in sorted(folder.rglob("*")) if path.is_file()},
            "models": [(client.get_logged_model(model_id).name, client.get_logged_model(model_id).params)
                       for model_id in model_ids],
        }
    versions = client.search_model_versions(f"name = '{MODEL}'")
    registered = client.get_registered_model(MODEL)
    history["registry"] = {
        "description": registered.description,
        "versions": sorted((names[v.run_id], v.tags["gptflow.weights_hash"]) for v in versions),
        "champion": names[client.get_model_version_by_alias(MODEL, "champion").run_id],
    }
    champion = client.get_model_version_by_alias(MODEL, "champion")
    weights = mlflow.artifacts.download_artifacts(champion.source, dst_path=str(root / "champion"),
                                                  tracking_uri=client.tracking_uri)
    history["registry"]["champion_weights"] = (Path(weights) / "model.safetensors").read_bytes()
    return history


@pytest.mark.slow  # starts an MLflow server
def test_a_sweep_and_its_registered_models_round_trip_and_a_second_copy_copies_nothing(
        laptop, artifact_serving_mlflow, tmp_path, capsys):
    assert main(["push-history", "--to", artifact_serving_mlflow, "--workspace", str(laptop)]) == 0
    output = capsys.readouterr()
    assert "2 experiments: 4 runs copied, 0 already there; 2 model versions copied" in output.out
    assert f"{EXPERIMENT}: 3 runs copied" in output.err

    team = MlflowClient(artifact_serving_mlflow)
    original = _history(MlflowClient(f"sqlite:///{laptop / 'mlflow.db'}"), tmp_path / "history-original")
    copied = _history(team, tmp_path / "history-copied")
    assert copied == original
    assert copied["learning_rate=0.01"]["parent"] == "sweep lr"
    assert len(copied["learning_rate=0.001"]["val_loss"]) == 10
    assert copied["learning_rate=0.01"]["status"] == "FAILED"
    assert set(copied["learning_rate=0.001"]["artifacts"]) == {"samples/samples-1.txt"}
    assert copied["registry"]["champion"] == "learning_rate=0.01"
    # The copies' files live on the team server, not in the laptop's folder.
    assert team.get_model_version_by_alias(MODEL, "champion").source.startswith("mlflow-artifacts:")
    [evaluation] = team.search_runs([team.get_experiment_by_name(SERVED_EXPERIMENT).experiment_id])
    report = team.download_artifacts(evaluation.info.run_id, "report.json", str(tmp_path / "history-report"))
    assert Path(report).read_text() == '{"accuracy": 0.75}'

    assert main(["push-history", "--to", artifact_serving_mlflow, "--workspace", str(laptop)]) == 0
    assert "0 runs copied, 4 already there; 0 model versions copied, 2 already there" in capsys.readouterr().out
    experiment = team.get_experiment_by_name(EXPERIMENT).experiment_id
    assert len(team.search_runs([experiment], run_view_type=ViewType.ALL)) == 3
    assert len(team.search_model_versions(f"name = '{MODEL}'")) == 2


@pytest.mark.slow  # starts an MLflow server
def test_a_copy_a_stop_left_half_written_is_made_anew(laptop, artifact_serving_mlflow):
    first = copy_history(laptop, artifact_serving_mlflow, lambda line: None)
    team = MlflowClient(artifact_serving_mlflow)
    experiment = team.get_experiment_by_name(EXPERIMENT).experiment_id
    point = team.search_runs([experiment], "attributes.run_name = 'learning_rate=0.001'")[0]
    team.delete_tag(point.info.run_id, COPY_COMPLETE_TAG)  # as if the copy stopped before its end

    again = copy_history(laptop, artifact_serving_mlflow, lambda line: None)

    assert (first.runs_copied, again.runs_copied, again.runs_found) == (4, 1, 3)
    active = team.search_runs([experiment], "attributes.run_name = 'learning_rate=0.001'")
    assert len(active) == 1 and active[0].info.run_id != point.info.run_id
    assert len(active[0].data.metrics) == 1
    # The registry found its versions: nothing was registered twice.
    versions = team.search_model_versions(f"name = '{MODEL}'")
    assert len(versions) == 2


def test_an_unreachable_server_and_a_missing_history_are_one_line(laptop, tmp_path, capsys):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    assert main(["push-history", "--to", f"http://127.0.0.1:{closed}", "--workspace", str(laptop)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "cannot be reached" in error[0] and "Traceback" not in error[0]

    empty = tmp_path / "history-empty"
    empty.mkdir()
    assert main(["push-history", "--to", "http://127.0.0.1:1", "--workspace", str(empty)]) == 2
    assert "holds no MLflow history" in capsys.readouterr().err
