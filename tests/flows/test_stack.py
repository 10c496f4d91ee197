"""Finding the stack `gptflow up` runs for a workspace, without real servers (test_deployments starts them)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gptflow.flows.stack import STACK_FILE, Service, Stack, down, use_running_stack
from gptflow.tasks.runtime.workspace import WORKSPACE_SERVER_ENV, Workspace


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server_url() -> Iterator[str]:
    """A loopback HTTP server that answers every request with 200."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def no_servers_set(monkeypatch) -> None:
    """Neither variable set; whatever the test sets is undone afterwards."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(WORKSPACE_SERVER_ENV, raising=False)


def _write_stack(workspace: Workspace, url: str, pid: int) -> Stack:
    """``stack.json`` as ``gptflow up`` writes it, both services at ``url`` and run by ``pid``."""
    stack = Stack(workspace=str(workspace.root), services=[
        Service("prefect", pid, url, f"{url}/api/health", "prefect.log"),
        Service("mlflow", pid, url, f"{url}/health", "mlflow.log"),
    ])
    (workspace.root / STACK_FILE).write_text(json.dumps(asdict(stack)))
    return stack


def test_a_running_stack_is_used_when_no_server_is_set(tmp_path, server_url, no_servers_set):
    workspace = Workspace.resolve(tmp_path)
    _write_stack(workspace, server_url, os.getpid())
    stack = use_running_stack(workspace)
    assert stack is not None and stack.workspace == str(workspace.root)
    assert os.environ["PREFECT_API_URL"] == f"{server_url}/api"
    assert os.environ["MLFLOW_TRACKING_URI"] == server_url
    assert workspace.tracks_in_own_store  # through the stack's server


def test_a_prefect_server_set_in_the_environment_wins(tmp_path, server_url, no_servers_set, monkeypatch):
    workspace = Workspace.resolve(tmp_path)
    _write_stack(workspace, server_url, os.getpid())
    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.example/api")
    assert use_running_stack(workspace) is None
    assert os.environ["PREFECT_API_URL"] == "http://prefect.example/api"
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_an_mlflow_server_set_in_the_environment_is_kept(tmp_path, server_url, no_servers_set, monkeypatch):
    workspace = Workspace.resolve(tmp_path)
    _write_stack(workspace, server_url, os.getpid())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example")
    assert use_running_stack(workspace) is not None
    assert os.environ["PREFECT_API_URL"] == f"{server_url}/api"
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://mlflow.example"
    assert not workspace.tracks_in_own_store  # a team server's experiments are not the workspace's


def test_a_stack_that_stopped_or_does_not_answer_is_not_used(tmp_path, server_url, no_servers_set):
    exited = subprocess.Popen(["true"])
    exited.wait()
    workspace = Workspace.resolve(tmp_path)
    assert use_running_stack(workspace) is None  # no stack.json
    _write_stack(workspace, server_url, exited.pid)
    assert use_running_stack(workspace) is None
    _write_stack(workspace, "http://127.0.0.1:9", os.getpid())  # nothing listens on the discard port
    assert use_running_stack(workspace) is None
    assert "PREFECT_API_URL" not in os.environ and "MLFLOW_TRACKING_URI" not in os.environ


def test_a_stack_file_copied_with_its_workspace_is_not_the_copy_s(tmp_path, server_url, no_servers_set):
    """``cp -a`` of a workspace whose stack runs: the copy neither uses nor stops the original's servers."""
    original = Workspace.resolve(tmp_path / "original")
    server = subprocess.Popen(["sleep", "60"])
    try:
        _write_stack(original, server_url, server.pid)
        copy = Workspace.resolve(tmp_path / "copy")
        (copy.root / STACK_FILE).write_bytes((original.root / STACK_FILE).read_bytes())
        assert use_running_stack(copy) is None and "PREFECT_API_URL" not in os.environ
        assert down(copy) == [] and server.poll() is None
        assert use_running_stack(original) is not None
    finally:
        server.kill()
        server.wait()
