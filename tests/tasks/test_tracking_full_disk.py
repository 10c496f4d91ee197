"""A full disk under the MLflow store: the run's end is kept in its outbox, or the error says what
became of the run; the error the user sees stays the one that stopped the flow."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from mlflow import MlflowClient

from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.tracking.outbox import OUTBOX_DIR, Outbox
from gptflow.tasks.tracking.run import pipeline_run

DISK = 4 * 2**20
"""Room for a new MLflow store (~1 MB) and the runs of a test."""


def fill_up(folder: Path) -> Path:
    """Write a file into ``folder`` until its filesystem has no space left; the file."""
    ballast = folder / "ballast"
    descriptor = os.open(ballast, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(descriptor, b"\0" * 4096)
    except OSError as error:
        assert error.errno == errno.ENOSPC
    finally:
        os.close(descriptor)
    return ballast


@pytest.fixture()
def local_workspace(tmp_path, monkeypatch) -> Workspace:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return Workspace.resolve(tmp_path / "ws")


@pytest.mark.parametrize("small_tmpfs", [DISK], indirect=True)
def test_a_run_whose_store_fills_up_keeps_its_end_in_the_outbox_and_the_next_run_sends_it(
    local_workspace, small_tmpfs, monkeypatch, caplog
):
    store = f"sqlite:///{small_tmpfs / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    with pytest.raises(ValueError, match="the flow's own error") as raised:
        with pipeline_run(local_workspace, "pretrain", tags={}, name="full") as run:
            ballast = fill_up(small_tmpfs)
            raise ValueError("the flow's own error")
    assert not getattr(raised.value, "__notes__", [])
    outbox = Outbox(local_workspace, run.run_id)
    assert outbox.waiting() == {"set_terminated": 1}
    client = MlflowClient(store)
    assert client.get_run(run.run_id).info.status == "RUNNING"
    [warning] = [record.getMessage() for record in caplog.records if "no space left" in record.getMessage()]
    assert f"{store} has no space left to store the run's end: 1 operations of run {run.run_id}" in warning
    assert f"kept in {outbox.path}. Once there is space, send them with `gptflow sync" in warning

    ballast.unlink()
    with pipeline_run(local_workspace, "pretrain", tags={}, name="next"):
        assert client.get_run(run.run_id).info.status == "FAILED"
    assert outbox.is_empty()


@pytest.mark.parametrize("small_tmpfs", [DISK], indirect=True)
def test_a_run_whose_store_and_outbox_fill_up_says_so_in_the_error_and_leaves_no_outbox(small_tmpfs, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    workspace = Workspace.resolve(small_tmpfs / "ws")
    with pytest.raises(ValueError, match="the flow's own error") as raised:
        with pipeline_run(workspace, "pretrain", tags={}, name="full") as run:
            fill_up(small_tmpfs)
            raise ValueError("the flow's own error")
    assert raised.value.__notes__ == [
        f"MLflow run {run.run_id} is left RUNNING: the full disk holds its store and outbox too; the next gptflow "
        "run on this machine marks it KILLED."
    ]
    assert MlflowClient(workspace.tracking_uri).get_run(run.run_id).info.status == "RUNNING"
    assert list((workspace.root / OUTBOX_DIR).glob("*")) == []
