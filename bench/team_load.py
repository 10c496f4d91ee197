"""Many clients at once against the team stack (PostgreSQL) and against the SQLite `gptflow up`.

    python bench/team_load.py                          # 8 clients x 200 task runs, both stacks
    python bench/team_load.py --clients 16 --stacks team

For each stack it starts the servers as `gptflow up` (with `--team`: PostgreSQL, logins) does, in a
fresh workspace on free loopback ports; then starts K client processes at once, each running a
Prefect flow of N small task runs (4 threads at a time) where each task logs one point of a metric to
the client's MLflow run. While they run, a probe times one light request to each API every 0.25 s
and, on PostgreSQL, counts the server's client connections. Afterwards it checks what the servers
kept: a run is complete when its flow ended Completed, Prefect recorded all its N task runs
Completed, and MLflow holds all N metric points. Prints, per stack: complete runs, errors by kind
(from the clients and the servers' logs), peak PostgreSQL connections against `max_connections`,
and the p50/p95 latency of both APIs under load. The servers are stopped (`gptflow down`) at the end.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ERROR_KINDS = {
    "database is locked": re.compile(r"database is locked", re.IGNORECASE),
    "deadlock": re.compile(r"deadlock detected", re.IGNORECASE),
    # Prefect's server answers 503 for a database error its clients may retry: on SQLite, SQLITE_BUSY
    # ("database is locked"); a client that still gets it after its retries gives up.
    "busy (503)": re.compile(r"503 Service Unavailable", re.IGNORECASE),
    "connection": re.compile(r"too many clients|remaining connection slots|Connection refused|ConnectError|"
                             r"RemoteDisconnected|ConnectionResetError|Max retries exceeded|ReadTimeout|"
                             r"Server disconnected|status code 50[234]", re.IGNORECASE),
}
"""What the issue counts as errors; any other exception a client meets counts as "other"."""
PROBE_EVERY_S = 0.25
SETTLE_S = 120.0
"""How long the servers get, after the last client ends, to record what the clients sent."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---- a client: one flow of small task runs, each logging to MLflow ----

def run_client(run_id: str, tasks: int, result_file: Path) -> None:
    from mlflow import MlflowClient
    from prefect import flow, task, unmapped
    from prefect.cache_policies import NO_CACHE
    from prefect.task_runners import ThreadPoolTaskRunner

    @task(name="log-step", cache_policy=NO_CACHE)
    def log_step(run: str, step: int) -> float:
        started = time.perf_counter()
        MlflowClient().log_metric(run, "load/value", float(step), step=step)
        return time.perf_counter() - started

    @flow(name="team-load-client", task_runner=ThreadPoolTaskRunner(max_workers=4))
    def load_client(run: str, steps: int) -> dict:
        futures = log_step.map(unmapped(run), range(steps))
        latencies, errors = [], []
        for future in futures:
            future.wait()
            if future.state.is_completed():
                latencies.append(future.result())
            else:
                errors.append(str(future.state.message))
        return {"latencies": latencies, "errors": errors}

    outcome: dict = {"flow_run_id": None, "flow_completed": False, "latencies": [], "errors": []}
    try:
        state = load_client(run_id, tasks, return_state=True)
        outcome["flow_run_id"] = str(state.state_details.flow_run_id)
        outcome["flow_completed"] = state.is_completed()
        if state.is_completed():
            outcome.update(state.result())
        else:
            outcome["errors"].append(f"flow {state.name}: {state.message}")
    except Exception as error:  # what the user of this client would see: the bench counts it by kind
        outcome["errors"].append(f"{type(error).__name__}: {error}")
    result_file.write_text(json.dumps(outcome))


# ---- the bench: a stack, K clients, a probe ----

@dataclass
class Probe:
    """Latencies of one light request per API, and PostgreSQL's client connections, every ``PROBE_EVERY_S``."""

    prefect_api: str
    mlflow_url: str
    headers: dict[str, dict[str, str]]
    database: object | None = None
    prefect_s: list[float] = field(default_factory=list)
    mlflow_s: list[float] = field(default_factory=list)
    connections: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stopped: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        cursor = self._database_cursor()
        while not self.stopped.wait(PROBE_EVERY_S):
            self._time(self.prefect_s, urllib.request.Request(
                f"{self.prefect_api}/flow_runs/filter", data=b'{"limit": 1}', method="POST",
                headers={"Content-Type": "application/json", **self.headers["prefect"]}))
            self._time(self.mlflow_s, urllib.request.Request(
                f"{self.mlflow_url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=team-load",
                headers=self.headers["mlflow"]))
            if cursor is not None:
                cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'")
                self.connections.append(cursor.fetchone()[0] - 1)  # not the probe's own

    def max_connections(self) -> int | None:
        cursor = self._database_cursor()
        if cursor is None:
            return None
        cursor.execute("SHOW max_connections")
        return int(cursor.fetchone()[0])

    def _database_cursor(self):
        if self.database is None:
            return None
        import psycopg2

        connection = psycopg2.connect(host=self.database.host, port=self.database.port, user=self.database.user,
                                      password=self.database.password, dbname="postgres")
        connection.autocommit = True
        return connection.cursor()

    def _time(self, latencies: list[float], request: urllib.request.Request) -> None:
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                answer.read()
            latencies.append(time.perf_counter() - started)
        except Exception as error:  # a refused or failed request is an error of the stack under load
            self.failures.append(f"probe {request.full_url}: {error}")


def _headers(environment: dict[str, str]) -> dict[str, dict[str, str]]:
    def basic(credentials: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}

    headers: dict[str, dict[str, str]] = {"prefect": {}, "mlflow": {}}
    if "PREFECT_API_AUTH_STRING" in environment:
        headers["prefect"] = basic(environment["PREFECT_API_AUTH_STRING"])
        headers["mlflow"] = basic(f"{environment['MLFLOW_TRACKING_USERNAME']}:{environment['MLFLOW_TRACKING_PASSWORD']}")
    return headers


def _start_stack(kind: str, folder: Path):
    """``gptflow up`` (``--team`` for "team") in ``folder``: the stack, the clients' environment, and
    the database (None on SQLite)."""
    from gptflow.flows.stack import up
    from gptflow.flows.team import TeamOptions, TeamSecrets
    from gptflow.tasks.runtime.workspace import Workspace

    workspace = Workspace.resolve(str(folder / "workspace"))
    team = TeamOptions(postgres_port=_free_port()) if kind == "team" else None
    started = time.monotonic()
    stack = up(workspace, lambda line: print(f"  {kind}: {line}", flush=True), prefect_port=_free_port(),
               mlflow_port=_free_port(), team=team)
    print(f"  {kind}: servers up in {time.monotonic() - started:.0f} s", flush=True)
    environment = {name: value for name, value in os.environ.items() if not name.startswith(("MLFLOW_", "PREFECT_"))}
    environment |= stack.environment() | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    database = None
    if team is not None:
        secrets = TeamSecrets.load(workspace.root)
        environment |= secrets.client_environment()
        database = secrets.database_server(team)
    return workspace, stack, environment, database


def _errors_by_kind(lines: list[str]) -> dict[str, int]:
    counts = dict.fromkeys([*ERROR_KINDS, "other"], 0)
    for line in lines:
        kind = next((name for name, pattern in ERROR_KINDS.items() if pattern.search(line)), "other")
        counts[kind] += 1
    return counts


def _server_log_errors(logs: Path) -> list[str]:
    """The lines of the servers' logs that name an error of one of ``ERROR_KINDS``."""
    found = []
    for log in sorted(logs.glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if any(pattern.search(line) for pattern in ERROR_KINDS.values()):
                found.append(f"{log.name}: {line.strip()}")
    return found


def _kept_by_servers(environment: dict[str, str], outcomes: list[dict], run_ids: list[str], tasks: int) -> list[bool]:
    """Whether each client's run is complete on the servers: its flow Completed, all its task runs
    recorded Completed by Prefect, all its metric points kept by MLflow. Waits up to ``SETTLE_S``
    for Prefect, which records task runs from the events the clients sent."""
    from mlflow import MlflowClient

    mlflow = MlflowClient(environment["MLFLOW_TRACKING_URI"])
    metrics_kept = [len(mlflow.get_metric_history(run_id, "load/value")) == tasks for run_id in run_ids]
    headers = {"Content-Type": "application/json", **_headers(environment)["prefect"]}

    def completed_task_runs(flow_run_id: str | None) -> int:
        if not flow_run_id:
            return 0
        query = {"flow_runs": {"id": {"any_": [flow_run_id]}},
                 "task_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
        request = urllib.request.Request(f"{environment['PREFECT_API_URL']}/task_runs/count", method="POST",
                                         data=json.dumps(query).encode(), headers=headers)
        with urllib.request.urlopen(request, timeout=60) as answer:
            return int(answer.read())

    deadline = time.monotonic() + SETTLE_S
    while True:
        recorded = [completed_task_runs(outcome["flow_run_id"]) for outcome in outcomes]
        if all(count == tasks for count in recorded) or time.monotonic() > deadline:
            break
        time.sleep(2)
    return [outcome["flow_completed"] and count == tasks and kept
            for outcome, count, kept in zip(outcomes, recorded, metrics_kept)]


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(fraction * 100) - 1] if len(values) > 1 \
        else values[0]


def bench_stack(kind: str, clients: int, tasks: int) -> dict:
    from mlflow import MlflowClient

    from gptflow.flows.stack import down

    folder = Path(tempfile.mkdtemp(prefix=f"gptflow-bench-load-{kind}-", dir="/tmp"))
    folder.chmod(0o711)  # PostgreSQL's unprivileged user reaches its cluster's folder below
    workspace, stack, environment, database = _start_stack(kind, folder)
    try:
        mlflow = MlflowClient(environment["MLFLOW_TRACKING_URI"])
        os.environ.update({name: value for name, value in environment.items() if name.startswith("MLFLOW_TRACKING_")})
        experiment = mlflow.create_experiment("team-load")
        run_ids = [mlflow.create_run(experiment, run_name=f"client {index}").info.run_id for index in range(clients)]
        probe = Probe(stack.prefect_api_url, stack.mlflow_url, _headers(environment), database)
        cap = probe.max_connections()
        probing = threading.Thread(target=probe.run, daemon=True)
        probing.start()
        started = time.monotonic()
        processes = []
        for index, run_id in enumerate(run_ids):
            output = (folder / f"client-{index}.log").open("w")
            processes.append(subprocess.Popen(
                [sys.executable, __file__, "--client", run_id, "--tasks", str(tasks),
                 "--result", str(folder / f"client-{index}.json")],
                env=environment, stdout=output, stderr=subprocess.STDOUT))
        for process in processes:
            process.wait()
        elapsed = time.monotonic() - started
        print(f"  {kind}: the {clients} clients ended after {elapsed:.0f} s; checking what the servers kept", flush=True)
        probe.stopped.set()
        probing.join()
        outcomes = []
        for index in range(clients):
            result = folder / f"client-{index}.json"
            outcomes.append(json.loads(result.read_text()) if result.exists() else
                            {"flow_run_id": None, "flow_completed": False, "latencies": [],
                             "errors": [f"client {index} ended without a result (exit code {processes[index].returncode})"]})
        complete = _kept_by_servers(environment, outcomes, run_ids, tasks)
        client_errors = [error for outcome in outcomes for error in outcome["errors"]] + probe.failures
        client_log_errors = [line for index in range(clients)
                             for line in (folder / f"client-{index}.log").read_text(errors="replace").splitlines()
                             if any(pattern.search(line) for pattern in ERROR_KINDS.values())]
        server_errors = _server_log_errors(workspace.root / "logs")
        logged = [latency for outcome in outcomes for latency in outcome["latencies"]]
        return {"stack": kind, "complete": sum(complete), "clients": clients, "elapsed_s": elapsed,
                "task_runs_per_s": clients * tasks / elapsed, "client_errors": _errors_by_kind(client_errors),
                "client_log_errors": _errors_by_kind(client_log_errors), "server_errors": _errors_by_kind(server_errors),
                "examples": (client_errors + client_log_errors + server_errors)[:5],
                "peak_connections": max(probe.connections, default=None), "max_connections": cap,
                "prefect_p50_ms": 1000 * _percentile(probe.prefect_s, 0.5),
                "prefect_p95_ms": 1000 * _percentile(probe.prefect_s, 0.95),
                "mlflow_p50_ms": 1000 * _percentile(probe.mlflow_s, 0.5),
                "mlflow_p95_ms": 1000 * _percentile(probe.mlflow_s, 0.95),
                "log_metric_p95_ms": 1000 * _percentile(logged, 0.95)}
    finally:
        down(workspace)
        for name in [name for name in os.environ if name.startswith(("MLFLOW_", "PREFECT_"))]:
            del os.environ[name]
        shutil.rmtree(folder, ignore_errors=True)


def _report(results: list[dict], clients: int, tasks: int) -> None:
    def errors(counts: dict[str, int]) -> str:
        return " ".join(f"{kind.replace(' ', '-')}={count}" for kind, count in counts.items())

    print(f"\n{clients} clients x {tasks} task runs, each task logging one MLflow metric point")
    print(f"{'stack':<8} {'complete':>9} {'wall s':>7} {'tasks/s':>8} {'PG conns':>10} "
          f"{'Prefect p50/p95 ms':>19} {'MLflow p50/p95 ms':>18} {'log_metric p95 ms':>18}")
    for result in results:
        connections = (f"{result['peak_connections']}/{result['max_connections']}"
                       if result["max_connections"] is not None else "-")
        print(f"{result['stack']:<8} {result['complete']:>5}/{result['clients']:<3} {result['elapsed_s']:>7.0f} "
              f"{result['task_runs_per_s']:>8.1f} {connections:>10} "
              f"{result['prefect_p50_ms']:>9.0f}/{result['prefect_p95_ms']:<9.0f} "
              f"{result['mlflow_p50_ms']:>8.0f}/{result['mlflow_p95_ms']:<9.0f} {result['log_metric_p95_ms']:>18.0f}")
    for result in results:
        print(f"{result['stack']}: errors raised to clients: {errors(result['client_errors'])}; in clients' logs: "
              f"{errors(result['client_log_errors'])}; in servers' logs: {errors(result['server_errors'])}")
        for example in result["examples"]:
            print(f"  e.g. {example[:300]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8, help="clients running at once (default 8)")
    parser.add_argument("--tasks", type=int, default=200, help="task runs in each client's flow (default 200)")
    parser.add_argument("--stacks", default="team,sqlite", help="which stacks, in order (default team,sqlite)")
    parser.add_argument("--client", metavar="RUN_ID", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        run_client(args.client, args.tasks, args.result)
        return
    results = []
    for kind in args.stacks.split(","):
        print(f"{kind}: starting the stack, then {args.clients} clients", flush=True)
        results.append(bench_stack(kind, args.clients, args.tasks))
    _report(results, args.clients, args.tasks)


if __name__ == "__main__":
    main()
