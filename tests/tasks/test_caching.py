"""run_stage against a real Prefect server: cached across calls, recomputed when artifacts break."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from prefect import flow, task

from data.store import atomic_directory, is_complete
from tasks.caching import run_stage, stage_key
from tasks.workspace import Workspace


@task
def write_artifact(directory: str, text: str) -> str:
    with atomic_directory(Path(directory)) as tmp:
        (tmp / "artifact.txt").write_text(text)
    return directory


@flow
def run_write_artifact(workspace_root: str, text: str) -> tuple[str, str]:
    workspace = Workspace.resolve(workspace_root)
    key = stage_key("write", config={"text": text}, modules=[sys.modules[__name__]], inputs={})
    outcome = run_stage(
        write_artifact,
        key=key,
        workspace=workspace,
        is_valid=lambda directory: is_complete(Path(directory)),
        directory=str(workspace.store / key),
        text=text,
    )
    return outcome.status, outcome.result


@pytest.fixture()
def workspace_root(prefect_api_url, tmp_path) -> str:
    return str(tmp_path / "workspace")


def test_second_call_is_cached_and_new_config_executes(workspace_root):
    status, directory = run_write_artifact(workspace_root, "hello")
    assert status == "executed" and (Path(directory) / "artifact.txt").read_text() == "hello"
    assert run_write_artifact(workspace_root, "hello") == ("cached", directory)
    other_status, other_directory = run_write_artifact(workspace_root, "bye")
    assert other_status == "executed" and other_directory != directory


def test_deleted_artifact_is_recomputed_not_returned(workspace_root):
    _, directory = run_write_artifact(workspace_root, "hello")
    (Path(directory) / "artifact.txt").unlink()
    assert run_write_artifact(workspace_root, "hello") == ("executed", directory)
    assert (Path(directory) / "artifact.txt").read_text() == "hello"
    assert run_write_artifact(workspace_root, "hello")[0] == "cached"


def test_altered_artifact_is_recomputed(workspace_root):
    _, directory = run_write_artifact(workspace_root, "hello")
    (Path(directory) / "artifact.txt").write_text("HELLO")  # same size, new bytes and mtime
    assert run_write_artifact(workspace_root, "hello")[0] == "executed"
    assert (Path(directory) / "artifact.txt").read_text() == "hello"


def test_stage_key_follows_the_code_of_every_module_it_names(tmp_path, monkeypatch):
    import importlib

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "stage_helper.py").write_text("def work():\n    return 1\n")
    helper = importlib.import_module("stage_helper")
    before = stage_key("write", config={"a": 1}, modules=[helper], inputs={"corpus": "x"})
    assert stage_key("write", config={"a": 1}, modules=[helper], inputs={"corpus": "x"}) == before
    assert stage_key("write", config={"a": 2}, modules=[helper], inputs={"corpus": "x"}) != before
    assert stage_key("write", config={"a": 1}, modules=[helper], inputs={"corpus": "y"}) != before
    (tmp_path / "stage_helper.py").write_text("def work():\n    return 2\n")
    assert stage_key("write", config={"a": 1}, modules=[helper], inputs={"corpus": "x"}) != before
