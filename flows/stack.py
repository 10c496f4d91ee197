"""The local stack: a Prefect server and an MLflow server, started and stopped with the workspace.

``gptflow up`` starts both on 127.0.0.1 as background processes whose state (SQLite databases,
artifacts, logs) lives in the workspace, waits until they answer, and records their process ids
in ``stack.json``; ``gptflow down`` stops them. While they run, the flows the command line runs on
that workspace use them even without the variables ``gptflow up`` prints (``use_running_stack``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from gptflow.tasks.runtime.workspace import WORKSPACE_ENV, WORKSPACE_SERVER_ENV, Workspace

HOST = "127.0.0.1"
STACK_FILE = "stack.json"
PREFECT_SERVER_HOME = "prefect-server"
"""In the workspace: the Prefect server's home (its database), for `gptflow up` and temporary servers alike."""
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
SERVER_NAMES = {"prefect": "Prefect", "mlflow": "MLflow"}
"""Each service's name as a message spells it."""
WAITING_REPORT_EVERY_S = 10.0
"""How often ``gptflow up`` says which server it still waits for."""


class StackError(RuntimeError):
    """The stack cannot be started or stopped; the message says why and what to do."""


@dataclass
class Service:
    name: str
    pid: int
    url: str
    health_url: str
    log: str


@dataclass
class Stack:
    workspace: str
    services: list[Service]

    @property
    def prefect_api_url(self) -> str:
        return self._service("prefect").url + "/api"

    @property
    def mlflow_url(self) -> str:
        return self._service("mlflow").url

    def environment(self) -> dict[str, str]:
        """The variables that point gptflow, Prefect and MLflow clients at this stack."""
        return {
            "PREFECT_API_URL": self.prefect_api_url,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            WORKSPACE_SERVER_ENV: self.mlflow_url,
            WORKSPACE_ENV: self.workspace,
        }

    def _service(self, name: str) -> Service:
        return next(service for service in self.services if service.name == name)


def up(workspace: Workspace, report: Callable[[str], None], prefect_port: int = 4200, mlflow_port: int = 5000,
       ) -> Stack:
    """Start the stack of ``workspace``, or find it running; ``report`` gets a line on each step
    and, while a server does not answer yet, every ``WAITING_REPORT_EVERY_S``: a first start
    creates the servers' databases, which takes a minute on a busy machine."""
    existing = _read_stack(workspace)
    if existing and all(_alive(service.pid) for service in existing.services):
        report(f"the servers of {workspace.root} are running already")
        return existing
    for port, flag in ((prefect_port, "--prefect-port"), (mlflow_port, "--mlflow-port")):
        if answers(f"http://{HOST}:{port}"):
            raise StackError(f"Port {port} on {HOST} is already in use. Stop what listens there, or pick "
                             f"another port with {flag}.")
    logs = workspace.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    prefect_home = workspace.root / PREFECT_SERVER_HOME
    report(f"starting a Prefect server on port {prefect_port} and an MLflow server on port {mlflow_port} "
           f"(their logs: {logs})")
    started = time.monotonic()
    services = [
        _start(
            "prefect",
            [_executable("prefect"), "server", "start", "--host", HOST, "--port", str(prefect_port)],
            # The server's own database lives in the workspace, beside the runs it describes. Its UI
            # must call the API on this port: by default it would call port 4200. It streams flow
            # runs' logs, which `prefect deployment run --watch` prints (by default it would print
            # state changes alone, and never the summary a run ends its log with).
            env={"PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                 "PREFECT_UI_API_URL": f"http://{HOST}:{prefect_port}/api",
                 "PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": "true",
                 "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED": "true"},
            url=f"http://{HOST}:{prefect_port}",
            health_path="/api/health",
            log=logs / "prefect-server.log",
        ),
        _start(
            "mlflow",
            [
                _executable("mlflow"), "server",
                "--backend-store-uri", f"sqlite:///{workspace.root / 'mlflow.db'}",
                "--artifacts-destination", workspace.mlflow_artifacts.as_uri(),
                "--host", HOST, "--port", str(mlflow_port),
            ],
            env={},
            url=f"http://{HOST}:{mlflow_port}",
            health_path="/health",
            log=logs / "mlflow-server.log",
        ),
    ]
    stack = Stack(workspace=str(workspace.root), services=services)
    (workspace.root / STACK_FILE).write_text(json.dumps(asdict(stack), indent=2))
    try:
        for service in services:
            _wait_until_healthy(service, started, report)
    except StackError:
        down(workspace)
        raise
    return stack


def down(workspace: Workspace) -> list[str]:
    """Stop the stack's servers; returns the names of those that were running."""
    stack = _read_stack(workspace)
    if stack is None:
        return []
    stopped = []
    for service in stack.services:
        if _alive(service.pid):
            _stop(service.pid)
            stopped.append(service.name)
    (workspace.root / STACK_FILE).unlink(missing_ok=True)
    return stopped


def use_running_stack(workspace: Workspace) -> Stack | None:
    """Point this process's Prefect, and its MLflow unless ``MLFLOW_TRACKING_URI`` names a server,
    at the stack ``gptflow up`` runs for ``workspace``, when ``PREFECT_API_URL`` is not set: flows
    then skip the temporary server Prefect starts for each run (seconds), and log through the
    stack's MLflow server (its experiment stores artifacts through it). Returns the stack used, or
    None. Call it before importing Prefect, which reads its settings once, at import."""
    if "PREFECT_API_URL" in os.environ:
        return None
    stack = _running_stack(workspace)
    if stack is not None:
        os.environ["PREFECT_API_URL"] = stack.prefect_api_url
        os.environ.setdefault("MLFLOW_TRACKING_URI", stack.mlflow_url)
        os.environ[WORKSPACE_SERVER_ENV] = stack.mlflow_url
    return stack


def keep_prefect_state_in(workspace: Workspace) -> None:
    """When no Prefect server is set, Prefect runs a temporary one per run on a database in
    ``~/.prefect``, which grows with every run of every workspace: keep it, and the results Prefect
    stores itself, in the workspace instead (``prefect-server/``, the folder of the server that
    ``gptflow up`` starts, so its UI later shows these runs too). Call it before importing Prefect.
    Settings the user made win."""
    if "PREFECT_API_URL" in os.environ:
        return
    home = workspace.root / PREFECT_SERVER_HOME
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{home / 'prefect.db'}")
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(home / "storage"))


def _running_stack(workspace: Workspace) -> Stack | None:
    """The stack ``gptflow up`` started for ``workspace``, if every server of it runs and answers."""
    stack = _read_stack(workspace)
    if stack is None or not all(_alive(service.pid) and answers(service.health_url) for service in stack.services):
        return None
    return stack


def _start(name: str, command: list[str], env: dict[str, str], url: str, health_path: str, log: Path) -> Service:
    with open(log, "ab") as log_file:
        # A new session, so the servers outlive this command and can be stopped as a group.
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **env}, start_new_session=True,
        )
    return Service(name=name, pid=process.pid, url=url, health_url=url + health_path, log=str(log))


def _wait_until_healthy(service: Service, started: float, report: Callable[[str], None]) -> None:
    """Wait until ``service``, started at ``started`` (``time.monotonic``), answers; ``report``
    how long that took, and every ``WAITING_REPORT_EVERY_S`` that it does not answer yet."""
    name = SERVER_NAMES[service.name]
    deadline = started + START_TIMEOUT_S
    next_report = started + WAITING_REPORT_EVERY_S
    while time.monotonic() < deadline:
        if answers(service.health_url):
            report(f"the {name} server answers at {service.url}, {time.monotonic() - started:.0f} s after its start")
            return
        if not _alive(service.pid):
            raise StackError(f"The {name} server exited while starting; see {service.log}.")
        if time.monotonic() >= next_report:
            report(f"waiting for the {name} server to answer at {service.health_url}: "
                   f"{time.monotonic() - started:.0f} s so far (its log: {service.log})")
            next_report += WAITING_REPORT_EVERY_S
        time.sleep(0.5)
    raise StackError(f"The {name} server did not answer at {service.health_url} within "
                     f"{START_TIMEOUT_S:.0f} s; see {service.log}.")


def _stop(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our exited child
        if finished == pid:
            return False
    except ChildProcessError:
        pass  # not our child: started by an earlier `gptflow up`
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def answers(url: str) -> bool:
    """Whether a server answers at ``url`` within 2 s, with whatever status."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # something answers there, even if not with 200
    except (urllib.error.URLError, OSError):
        return False


def _read_stack(workspace: Workspace) -> Stack | None:
    path = workspace.root / STACK_FILE
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text())
        stack = Stack(workspace=value["workspace"], services=[Service(**service) for service in value["services"]])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise StackError(f"{path} is not a stack file gptflow wrote ({type(error).__name__}: {error}). Stop any "
                         "servers it started by hand, delete the file, then run `gptflow up` again.") from None
    # A workspace copied with its stack file: those servers serve the original's databases.
    return stack if stack.workspace == str(workspace.root) else None


def _executable(name: str) -> str:
    """The console script installed beside this interpreter (the venv's), else one on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise StackError(f"Cannot find the `{name}` command; install gptflow's dependencies (make setup).")
    return found
