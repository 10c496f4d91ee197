"""MLflow conventions against a real SQLite tracking store in a temp workspace."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from gptflow.data.store import OutOfSpaceError
from gptflow.tasks.tracking import HOST_TAG, KILLED_TAG, PID_TAG, BufferedMetrics, pipeline_run
from gptflow.tasks.workspace import Workspace


@pytest.fixture()
def workspace(tmp_path, monkeypatch) -> Workspace:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return Workspace.resolve(tmp_path / "ws")


def test_run_logs_params_tags_stage_status_and_artifacts_into_the_workspace(workspace, tmp_path):
    report = tmp_path / "report.json"
    report.write_text("{}")
    with pipeline_run(workspace, tags={"gptflow.flow": "pretrain"}, name="pretrain-test") as run:
        run.log_params({f"section.field_{i}": i for i in range(150)})  # more than one batch
        run.record_stage("ingest", "cached")
        run.log_metrics({"eval/val_loss": 2.5}, step=7)
        run.log_artifact(report, "eval")
    stored = MlflowClient(workspace.tracking_uri).get_run(run.run_id)
    assert stored.info.status == "FINISHED" and stored.info.run_name == "pretrain-test"
    assert len([k for k in stored.data.params if k.startswith("section.")]) == 150
    assert stored.data.tags["gptflow.stage.ingest"] == "cached" and run.stage_statuses == {"ingest": "cached"}
    assert stored.data.metrics["eval/val_loss"] == 2.5
    assert stored.info.artifact_uri.startswith(workspace.mlflow_artifacts.as_uri())
    assert (workspace.mlflow_artifacts / run.run_id / "artifacts/eval/report.json").exists()


def test_run_is_marked_failed_when_the_flow_raises(workspace):
    with pytest.raises(RuntimeError), pipeline_run(workspace, tags={}, name="doomed") as run:
        raise RuntimeError("stage exploded")
    assert MlflowClient(workspace.tracking_uri).get_run(run.run_id).info.status == "FAILED"


def test_buffered_metrics_send_every_step_in_few_batches(workspace):
    with pipeline_run(workspace, tags={}, name="metrics") as run:
        buffered = BufferedMetrics(run, flush_every_s=3600)
        for step in range(1, 601):
            buffered.add(step, {"train/loss": 10.0 / step, "train/lr": 1e-3})
        assert len(buffered.pending) == 200  # 1200 metrics: one full batch of 1000 already sent
        buffered.flush()
        assert buffered.pending == []
    history = MlflowClient(workspace.tracking_uri).get_metric_history(run.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, 601))
    assert history[-1].value == pytest.approx(10.0 / 600)


def test_runs_this_host_left_running_in_a_process_now_gone_are_marked_killed(workspace):
    with pipeline_run(workspace, tags={}, name="first") as first:
        pass
    client = MlflowClient(workspace.tracking_uri)
    experiment_id = client.get_run(first.run_id).info.experiment_id
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    host = socket.gethostname()

    def running(name: str, host: str, pid: int) -> str:
        return client.create_run(experiment_id, run_name=name, tags={HOST_TAG: host, PID_TAG: str(pid)}).info.run_id

    gone = running("gone", host, ended.pid)
    alive = running("alive", host, os.getpid())
    elsewhere = running("elsewhere", "another-machine", ended.pid)

    with pipeline_run(workspace, tags={}, name="next") as run:
        assert client.get_run(gone).info.status == "KILLED"
    assert "ended without ending the run" in client.get_run(gone).data.tags[KILLED_TAG]
    assert client.get_run(alive).info.status == client.get_run(elsewhere).info.status == "RUNNING"
    tags = client.get_run(run.run_id).data.tags
    assert (tags[HOST_TAG], tags[PID_TAG]) == (host, str(os.getpid()))


def test_an_artifact_that_does_not_fit_names_where_it_went_and_leaves_nothing(workspace, tmp_path, monkeypatch):
    report = tmp_path / "report.json"
    report.write_text("{}" * 1000)

    def copy_until_the_disk_is_full(source, target, length=0):
        target.write(source.read(10))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("mlflow.store.artifact.local_artifact_repo.shutil.copyfileobj", copy_until_the_disk_is_full)
    with pipeline_run(workspace, tags={}, name="full") as run, pytest.raises(OutOfSpaceError) as raised:
        run.log_artifact(report, "eval")
    artifacts = workspace.mlflow_artifacts / run.run_id / "artifacts"
    assert str(raised.value).startswith(f"out of space writing {artifacts}/eval: the disk is full")
    assert [path for path in artifacts.rglob("*") if path.is_file()] == []
