"""The local stack: a Prefect server and an MLflow server, started and stopped with the workspace.

``gptflow up`` starts both on 127.0.0.1 as background processes whose state (SQLite databases,
artifacts, logs) lives in the workspace, waits until they answer, and records their process ids
in ``stack.json``; ``gptflow down`` stops them. While they run, the flows the command line runs on
that workspace use them even without the variables ``gptflow up`` prints (``use_running_stack``).
``gptflow up --team`` runs them on PostgreSQL with logins on (``flows.team``), and may serve
beyond loopback; without logins, only loopback is served.
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

from gptflow.flows import team as team_stack
from gptflow.flows.postgres import port_in_use
from gptflow.tasks.runtime.workspace import WORKSPACE_ENV, WORKSPACE_SERVER_ENV, Workspace

HOST = "127.0.0.1"
STACK_FILE = "stack.json"
PREFECT_SERVER_HOME = "prefect-server"
"""In the workspace: the Prefect server's home (its database), for `gptflow up` and temporary servers alike."""
START_TIMEOUT_S = 120.0
TEAM_START_TIMEOUT_S = 300.0
"""A team stack's first start migrates three PostgreSQL databases: minutes on a busy machine."""
STOP_TIMEOUT_S = 20.0
SERVER_NAMES = {"prefect": "Prefect", "mlflow": "MLflow", "postgres": "PostgreSQL"}
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
    leader_signal: str | None = None
    """A signal that stops the service sent to its first process alone (PostgreSQL's postmaster
    stops its own children), instead of SIGTERM to its whole process group."""


@dataclass
class Stack:
    workspace: str
    services: list[Service]
    team: bool = False
    """Logins on: clients need the credentials of ``flows.team.TeamSecrets`` or a login."""

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
       host: str = HOST, team: team_stack.TeamOptions | None = None) -> Stack:
    """Start the stack of ``workspace``, or find it running; ``report`` gets a line on each step
    and, while a server does not answer yet, every ``WAITING_REPORT_EVERY_S``: a first start
    creates the servers' databases, which takes a minute on a busy machine. The servers listen on
    ``host``; with ``team``, on PostgreSQL with logins on (``flows.team``)."""
    team_stack.check_binding(host, team is not None)
    existing = _read_stack(workspace)
    if existing and all(_alive(service.pid) for service in existing.services):
        report(f"the servers of {workspace.root} are running already")
        return existing
    for port, flag in ((prefect_port, "--prefect-port"), (mlflow_port, "--mlflow-port")):
        _check_free(port, flag)
    logs = workspace.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    client_host = HOST if host in ("0.0.0.0", "::") else host  # this machine's clients reach a wildcard here
    stack = Stack(workspace=str(workspace.root), services=[], team=team is not None)
    started = time.monotonic()
    try:
        if team is None:
            prefect_env = {"PREFECT_HOME": str(workspace.root / PREFECT_SERVER_HOME)}
            # One worker process: MLflow's default of four, each importing MLflow, keeps a small
            # machine's cores busy for most of a minute before the server answers; one user's runs and
            # UI need one.
            mlflow_arguments = ["--backend-store-uri", f"sqlite:///{workspace.root / 'mlflow.db'}",
                                "--artifacts-destination", workspace.mlflow_artifacts.as_uri(), "--workers", "1"]
            mlflow_env: dict[str, str] = {}
        else:
            prefect_env, mlflow_arguments, mlflow_env = _team_settings(workspace, team, stack, logs, report)
        report(f"starting a Prefect server on port {prefect_port} and an MLflow server on port {mlflow_port} "
               f"(their logs: {logs})")
        started = time.monotonic()
        _add(workspace, stack, _start(
            "prefect",
            [_executable("prefect"), "server", "start", "--host", host, "--port", str(prefect_port)],
            # The server's own database lives in the workspace, beside the runs it describes. Its UI
            # must call the API on this port: by default it would call port 4200. It streams flow
            # runs' logs, which `prefect deployment run --watch` prints (by default it would print
            # state changes alone, and never the summary a run ends its log with).
            env={**prefect_env, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                 "PREFECT_UI_API_URL": (f"{team.prefect_public_url.rstrip('/')}/api" if team and team.prefect_public_url
                                        else f"http://{client_host}:{prefect_port}/api"),
                 "PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": "true",
                 "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED": "true"},
            url=f"http://{client_host}:{prefect_port}",
            health_path="/api/health",
            log=logs / "prefect-server.log",
        ))
        _add(workspace, stack, _start(
            "mlflow",
            [_executable("mlflow"), "server", *mlflow_arguments, "--host", host, "--port", str(mlflow_port)],
            env=mlflow_env,
            url=f"http://{client_host}:{mlflow_port}",
            health_path="/health",
            log=logs / "mlflow-server.log",
        ))
        for service in stack.services:
            if service.name != "postgres":
                _wait_until_healthy(service, started, report, TEAM_START_TIMEOUT_S if team else START_TIMEOUT_S)
    except Exception:
        down(workspace)
        raise
    return stack


def _team_settings(workspace: Workspace, team: team_stack.TeamOptions, stack: Stack, logs: Path,
                   report: Callable[[str], None]) -> tuple[dict[str, str], list[str], dict[str, str]]:
    """The team's database made ready (a local cluster initialised and started, recorded in
    ``stack``); the Prefect server's environment, the MLflow server's arguments and environment."""
    team_stack.require_team_packages()
    secrets = team_stack.TeamSecrets.load_or_create(workspace.root, team)
    database = secrets.database_server(team)
    if secrets.database is None:
        _check_free(team.postgres_port, "--postgres-port")
        cluster = team_stack.local_cluster(workspace.root)
        if not cluster.initialised:
            report(f"initialising a PostgreSQL cluster in {cluster.data}")
            cluster.initialise(secrets.database_password)
        report(f"starting PostgreSQL on port {team.postgres_port} (its log: {logs / 'postgres.log'})")
        command, as_user = cluster.server_command(team.postgres_port)
        url = f"postgresql://{HOST}:{team.postgres_port}"
        postgres = _start("postgres", command, {}, url, "", logs / "postgres.log", leader_signal="SIGINT", **as_user)
        _add(workspace, stack, postgres)
        _wait_until_healthy(postgres, time.monotonic(), report)
    database.create_databases()
    destination = f"{workspace.url.rstrip('/')}/mlartifacts" if workspace.url else workspace.mlflow_artifacts.as_uri()
    mlflow_arguments, mlflow_env = team_stack.mlflow_server(workspace.root, secrets, database, team, destination)
    return team_stack.prefect_environment(secrets, database, team.retention_days), mlflow_arguments, mlflow_env


def _check_free(port: int, flag: str) -> None:
    if port_in_use(port):
        raise StackError(f"Port {port} on {HOST} is already in use. Stop what listens there, or pick another port "
                         f"with {flag}.")


def _add(workspace: Workspace, stack: Stack, service: Service) -> None:
    """Record ``service`` as part of ``stack`` at once: ``gptflow down`` stops whatever started."""
    stack.services.append(service)
    (workspace.root / STACK_FILE).write_text(json.dumps(asdict(stack), indent=2))


def down(workspace: Workspace) -> list[str]:
    """Stop the stack's servers; returns the names of those that were running."""
    stack = _read_stack(workspace)
    if stack is None:
        return []
    stopped = []
    for service in reversed(stack.services):  # the database last, once its clients are gone
        if _alive(service.pid):
            _stop(service)
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
        if stack.team:  # this machine holds the admin's credentials; a login or the variables win
            for name, value in team_stack.TeamSecrets.load(workspace.root).client_environment().items():
                os.environ.setdefault(name, value)
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
    if stack is None or not all(_alive(service.pid) and _responds(service) for service in stack.services):
        return None
    return stack


def _start(name: str, command: list[str], env: dict[str, str], url: str, health_path: str, log: Path,
           leader_signal: str | None = None, **as_user) -> Service:
    """Start a server; ``as_user``: the ``Popen`` options that run it as another OS user."""
    with open(log, "ab") as log_file:
        # A new session, so the servers outlive this command and can be stopped as a group.
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **env}, start_new_session=True, **as_user,
        )
    return Service(name=name, pid=process.pid, url=url, health_url=url + health_path, log=str(log),
                   leader_signal=leader_signal)


def _wait_until_healthy(service: Service, started: float, report: Callable[[str], None],
                        timeout_s: float = START_TIMEOUT_S) -> None:
    """Wait until ``service``, started at ``started`` (``time.monotonic``), answers; ``report``
    how long that took, and every ``WAITING_REPORT_EVERY_S`` that it does not answer yet."""
    name = SERVER_NAMES[service.name]
    deadline = started + timeout_s
    next_report = started + WAITING_REPORT_EVERY_S
    while time.monotonic() < deadline:
        if _responds(service):
            report(f"the {name} server answers at {service.url}, {time.monotonic() - started:.0f} s after its start")
            return
        if not _alive(service.pid):
            raise StackError(f"The {name} server exited while starting; see {service.log}.")
        if time.monotonic() >= next_report:
            report(f"waiting for the {name} server to answer at {service.health_url}: "
                   f"{time.monotonic() - started:.0f} s so far (its log: {service.log})")
            while next_report <= time.monotonic():  # once per period, also after waiting on another server
                next_report += WAITING_REPORT_EVERY_S
        time.sleep(0.5)
    raise StackError(f"The {name} server did not answer at {service.health_url} within "
                     f"{timeout_s:.0f} s; see {service.log}.")


def _stop(service: Service) -> None:
    pid = service.pid
    try:
        if service.leader_signal:
            os.kill(pid, signal.Signals[service.leader_signal])
        else:
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


def _responds(service: Service) -> bool:
    """Whether ``service`` answers: an HTTP server at its health address, PostgreSQL on its port."""
    if service.health_url.startswith("postgresql://"):
        return port_in_use(int(service.health_url.rsplit(":", 1)[1]))
    return answers(service.health_url)


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
        stack = Stack(workspace=value["workspace"], services=[Service(**service) for service in value["services"]],
                      team=value.get("team", False))
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
