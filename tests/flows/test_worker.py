"""Workers: `gptflow worker` on a training machine, prefect.yaml's deployments, runs started from a
client that holds nothing of gptflow's; a worker killed mid-run leaves its run Crashed, and the
next run resumes from the checkpoints."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from gptflow.flows.worker import SILENCE_S, ZOMBIE_AUTOMATION

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
CRASHED_WITHIN_S = 120
"""The issue's bound: a run whose worker was killed is Crashed within two minutes."""



def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _gptflow(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptflow.flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def _start_worker(env: dict[str, str], workspace: Path, log_path: Path) -> subprocess.Popen:
    """``gptflow worker`` for ``workspace``, its output to ``log_path``, once it polls the pool."""
    with log_path.open("a") as log:
        worker = subprocess.Popen([sys.executable, "-m", "gptflow.flows.cli", "worker", "--workspace", str(workspace)],
                                  cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while "started!" not in log_path.read_text():  # Prefect's "Worker ... started!"
        assert worker.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.5)
    return worker


def _kill_with_its_processes(worker: subprocess.Popen) -> None:
    """SIGKILL the worker and every process below it, as when its machine dies: the flow run's
    process is in a session of its own, which a signal to the worker's group would not reach."""
    doomed = [worker.pid]
    for pid in doomed:  # grows as it goes: children, then theirs
        for child_list in Path(f"/proc/{pid}/task").glob("*/children"):
            doomed += [int(child) for child in child_list.read_text().split()]
    for pid in doomed:
        os.kill(pid, signal.SIGKILL)
    worker.wait()


def _flow_run_state(api_url: str, flow_run_id: str) -> str:
    with urllib.request.urlopen(f"{api_url}/flow_runs/{flow_run_id}", timeout=10) as answer:
        return json.load(answer)["state"]["type"]


def test_a_worker_without_a_prefect_server_says_how_to_name_one(tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "PREFECT_", "GPTFLOW_"))}
    env["GPTFLOW_LOGIN_FILE"] = str(tmp_path / "login.json")  # none kept
    env["PREFECT_HOME"] = str(tmp_path / "prefect")  # nor a Prefect profile naming a server
    refused = _gptflow("worker", "--workspace", str(tmp_path / "workspace"), env=env)
    assert refused.returncode == 2
    assert refused.stderr == ("gptflow: error: A worker needs the team's Prefect server: run `gptflow login`, set "
                              "PREFECT_API_URL, or run it where `gptflow up` runs for --workspace.\n")


@pytest.mark.slow
def test_a_bare_client_s_run_trains_on_a_worker_crashes_with_it_and_resumes_when_run_again(tiny_corpus_dir, tmp_path):
    workspace, laptop = tmp_path / "workspace", tmp_path / "laptop"
    laptop.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "PREFECT_", "GPTFLOW_"))}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    started = _gptflow("up", "--workspace", str(workspace), "--prefect-port", str(_free_port()),
                       "--mlflow-port", str(_free_port()), env=env)
    assert started.returncode == 0, started.stdout + started.stderr
    exports = dict(line.removeprefix("export ").split("=", 1)
                   for line in started.stdout.splitlines() if line.startswith("export "))
    server_env = {**env, **exports}
    api_url = exports["PREFECT_API_URL"]
    # The teammate's laptop: the Prefect CLI and the server's address; no gptflow workspace, no
    # MLflow settings, not even gptflow's code on its path.
    laptop_env = {"PATH": os.environ["PATH"], "HOME": str(laptop), "PREFECT_HOME": str(laptop / ".prefect"),
                  "PREFECT_API_URL": api_url, "COLUMNS": "400"}
    workers: list[subprocess.Popen] = []
    try:
        workers.append(_start_worker(server_env, workspace, tmp_path / "worker.log"))
        first_words = (tmp_path / "worker.log").read_text()
        assert (f"gptflow worker: created the process work pool gptflow and the automation {ZOMBIE_AUTOMATION!r} on "
                f"{api_url}") in first_words
        deployed = subprocess.run([PREFECT, "--no-prompt", "deploy", "--all"], cwd=ROOT, env=server_env,
                                  capture_output=True, text=True, timeout=300)
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

        parameters = {"preset": "tiny", "corpus": [str(tiny_corpus_dir)],
                      "overrides": {"train.max_steps": 600, "train.checkpoint_interval": 20, "train.val_interval": 200}}
        run = [PREFECT, "deployment", "run", "pretrain/train-gpt", "--params", json.dumps(parameters)]
        submitted = subprocess.run(run, cwd=laptop, env=laptop_env, capture_output=True, text=True, timeout=120)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        [flow_run_id] = re.findall(r"UUID: (\S+)", submitted.stdout)

        checkpoints = workspace / "store" / "runs"
        deadline = time.monotonic() + 400
        while not list(checkpoints.glob("*/checkpoints/step-*")):
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.2)
        assert _flow_run_state(api_url, flow_run_id) == "RUNNING"
        _kill_with_its_processes(workers.pop())
        killed_at = time.monotonic()
        assert not list(checkpoints.glob("*/final")), "killed before the end, yet a final model exists"
        while (state := _flow_run_state(api_url, flow_run_id)) == "RUNNING":
            assert time.monotonic() - killed_at < CRASHED_WITHIN_S, f"still RUNNING {CRASHED_WITHIN_S} s after"
            time.sleep(2)
        assert state == "CRASHED", state
        print(f"Crashed {time.monotonic() - killed_at:.0f} s after the worker was killed (silence allowed: "
              f"{SILENCE_S} s)")

        workers.append(_start_worker(server_env, workspace, tmp_path / "worker.log"))
        again = subprocess.run([*run, "--watch"], cwd=laptop, env=laptop_env, capture_output=True, text=True,
                               timeout=600)
        assert again.returncode == 0 and "Completed" in again.stdout, again.stdout[-3000:] + again.stderr[-3000:]
        assert re.search(r"pretrain: resuming from step [1-9]\d* \(checkpoint ", again.stdout), again.stdout[-3000:]

        client = MlflowClient(exports["MLFLOW_TRACKING_URI"])
        runs = client.search_runs([client.get_experiment_by_name("gptflow-pretrain").experiment_id])
        assert sorted(run.info.status for run in runs) == ["FINISHED", "KILLED"]
        # The laptop downloads the model through the MLflow server, with nothing but its address.
        download = ("import mlflow, pathlib\n"
                    "folder = mlflow.artifacts.download_artifacts('models:/gptflow-tiny/1', dst_path='model')\n"
                    "print(sorted(path.name for path in pathlib.Path(folder).rglob('*.safetensors')))\n")
        downloaded = subprocess.run([sys.executable, "-c", download], cwd=laptop, capture_output=True, text=True,
                                    env={**laptop_env, "MLFLOW_TRACKING_URI": exports["MLFLOW_TRACKING_URI"]},
                                    timeout=300)
        assert downloaded.returncode == 0 and "model.safetensors" in downloaded.stdout, downloaded.stderr[-3000:]
    finally:
        for worker in workers:
            _kill_with_its_processes(worker)
        _gptflow("down", "--workspace", str(workspace), env=env)
