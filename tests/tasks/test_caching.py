"""run_stage against a real Prefect server: cached across calls, recomputed when artifacts break."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest
from prefect import flow, task
from prefect.filesystems import LocalFileSystem

from gptflow.data.commits import atomic_directory
from gptflow.data.disk_space import OutOfSpaceError
from gptflow.flows.user_errors import hide_tracebacks_of_user_errors
from gptflow.tasks.runtime.caching import nothing_stored, run_stage, stage_key
from gptflow.tasks.runtime.workspace import Workspace


@task
def write_artifact(directory: str, text: str) -> str:
    with atomic_directory(Path(directory)) as tmp:
        (tmp / "artifact.txt").write_text(text)
    return directory


@flow
def run_write_artifact(workspace_root: str, text: str) -> tuple[str, str]:
    workspace = Workspace.resolve(workspace_root)
    key = stage_key("write", config={"text": text}, modules=["gptflow.tasks.runtime.caching"], inputs={})
    outcome = run_stage(
        write_artifact,
        key=key,
        workspace=workspace,
        is_valid=lambda directory, artifacts: artifacts.is_complete(Path(directory)),
        directory=str(workspace.store / key),
        text=text,
    )
    return outcome.status, outcome.result


@task
def fill_the_disk(directory: str, in_store_directory: bool) -> str:
    no_space = OSError(errno.ENOSPC, "No space left on device")
    if not in_store_directory:
        raise no_space  # a write that names no file, like pyarrow's
    with atomic_directory(Path(directory)) as tmp:
        (tmp / "partial.bin").write_bytes(b"written before the disk filled up")
        raise no_space


@flow
def run_fill_the_disk(workspace_root: str, in_store_directory: bool) -> None:
    workspace = Workspace.resolve(workspace_root)
    run_stage(fill_the_disk, key="full", workspace=workspace, is_valid=nothing_stored,
              directory=str(workspace.store / "full"), in_store_directory=in_store_directory)


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


@pytest.mark.parametrize(("in_store_directory", "written"), [(True, "store/full"), (False, "")])
def test_running_out_of_space_names_the_stage_and_what_it_wrote(workspace_root, in_store_directory, written):
    with pytest.raises(OutOfSpaceError) as raised:
        run_fill_the_disk(workspace_root, in_store_directory)
    workspace = Path(workspace_root).resolve()
    assert str(raised.value).startswith(
        f"stage fill_the_disk: out of space writing {workspace / written}: the disk is full")
    assert not (workspace / "store").exists() or list((workspace / "store").iterdir()) == []


def test_a_result_record_that_does_not_fit_is_one_log_line_and_only_its_stage_reruns(
    workspace_root, monkeypatch, caplog
):
    write_record = LocalFileSystem.write_path

    def write_half_then_fill_the_disk(self, path, content, **options):
        write_record(self, path, content[: len(content) // 2], **options)
        raise OSError(errno.ENOSPC, "No space left on device")

    hide_tracebacks_of_user_errors()  # as every flow does
    monkeypatch.setattr(LocalFileSystem, "write_path", write_half_then_fill_the_disk)
    with caplog.at_level(logging.ERROR, logger="prefect.task_runs"):
        assert run_write_artifact(workspace_root, "hello")[0] == "executed"  # the artifact itself is committed
    monkeypatch.undo()
    [failed_write] = [record for record in caplog.records if "committing transaction" in record.getMessage()]
    assert failed_write.exc_info is None and failed_write.getMessage().endswith("[Errno 28] No space left on device")
    assert run_write_artifact(workspace_root, "hello")[0] == "executed"  # the half-written record is not trusted
    assert run_write_artifact(workspace_root, "hello")[0] == "cached"


def test_stage_key_follows_config_inputs_and_code():
    key = stage_key("write", config={"a": 1}, modules=["gptflow.tasks.stages.ingest"], inputs={"corpus": "x"})
    assert stage_key("write", config={"a": 1}, modules=["gptflow.tasks.stages.ingest"], inputs={"corpus": "x"}) == key
    assert stage_key("write", config={"a": 2}, modules=["gptflow.tasks.stages.ingest"], inputs={"corpus": "x"}) != key
    assert stage_key("write", config={"a": 1}, modules=["gptflow.tasks.stages.ingest"], inputs={"corpus": "y"}) != key
    assert stage_key("write", config={"a": 1}, modules=["gptflow.tasks.stages.tokenize"], inputs={"corpus": "x"}) != key
