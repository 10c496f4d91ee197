"""The temporary Prefect server a run without one starts at the command's start: a real Prefect
server in its ephemeral mode, on the workspace's database; it answers, stops with its command, and
a server that cannot start is one line naming its log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gptflow.flows.stack import StackError, answers
from gptflow.flows.temporary_server import TemporaryPrefectServer

pytestmark = pytest.mark.slow


@pytest.fixture()
def no_prefect_server_set() -> Iterator[None]:
    """This process's environment as a user's without a Prefect server, restored after the test
    (``TemporaryPrefectServer.start`` sets ``PREFECT_API_URL``)."""
    previous = os.environ.pop("PREFECT_API_URL", None)
    yield
    os.environ.pop("PREFECT_API_URL", None)
    if previous is not None:
        os.environ["PREFECT_API_URL"] = previous


def test_the_server_answers_on_the_workspace_database_and_stops(tmp_path, no_prefect_server_set, monkeypatch):
    database = tmp_path / "prefect-server" / "prefect.db"
    database.parent.mkdir()
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{database}")
    waits: list[str] = []

    server = TemporaryPrefectServer.start(tmp_path / "logs")
    try:
        assert os.environ["PREFECT_API_URL"] == server.api_url
        server.wait_until_ready(120, waits.append)
        assert answers(f"{server.api_url}/health")
        assert database.exists()  # created by the server, in the workspace
    finally:
        server.stop()

    assert server.process.returncode is not None
    assert not answers(f"{server.api_url}/health")
    assert all("waiting for Prefect's temporary server" in wait for wait in waits)


@pytest.mark.skipif(sys.platform != "linux", reason="the kernel's parent-death signal is Linux's")
def test_a_command_killed_outright_takes_its_server_with_it(tmp_path, no_prefect_server_set):
    command = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from gptflow.flows.temporary_server import TemporaryPrefectServer; "
         "print(TemporaryPrefectServer.start(Path(sys.argv[1])).process.pid, flush=True); time.sleep(600)",
         str(tmp_path / "logs")],
        stdout=subprocess.PIPE, text=True,
    )
    server_pid = int(command.stdout.readline())
    os.kill(command.pid, signal.SIGKILL)  # no exit handler runs
    command.wait()
    deadline = time.monotonic() + 30
    while _is_running(server_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        assert not _is_running(server_pid)
    finally:
        if _is_running(server_pid):
            os.kill(server_pid, signal.SIGKILL)


def _is_running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has: it waits for ``init`` to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_server_that_cannot_start_is_one_line_naming_its_log(tmp_path, no_prefect_server_set, monkeypatch):
    not_a_folder = tmp_path / "prefect-server"
    not_a_folder.write_text("a file where the database's folder should be")
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL",
                       f"sqlite+aiosqlite:///{not_a_folder / 'prefect.db'}")

    server = TemporaryPrefectServer.start(tmp_path / "logs")
    try:
        with pytest.raises(StackError, match="Prefect's temporary server stopped as it started") as raised:
            server.wait_until_ready(120, lambda waiting: None)
    finally:
        server.stop()

    assert str(server.log) in str(raised.value) and "\n" not in str(raised.value)
    assert server.log.read_text().strip()  # the server's own account of why


def test_a_server_that_does_not_answer_in_time_is_stopped_and_one_line_naming_the_setting(
        tmp_path, no_prefect_server_set, monkeypatch):
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}")

    server = TemporaryPrefectServer.start(tmp_path / "logs")
    with pytest.raises(StackError, match="did not answer within 0 s") as raised:
        server.wait_until_ready(0, lambda waiting: None)  # it takes seconds to import itself

    message = str(raised.value)
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in message and str(server.log) in message
    assert server.process.returncode is not None
