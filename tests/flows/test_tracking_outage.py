"""A tracking server killed mid-training: the run finishes, keeps its MLflow writes in the
workspace, and `gptflow sync` sends them once the server is back."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[2]
MLFLOW = str(Path(sys.executable).with_name("mlflow"))
STEPS = 100
"""Enough for training to go on well after the server is killed (the tiny preset logs every 5 steps)."""

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_server(root: Path, port: int) -> subprocess.Popen:
    """An MLflow server on ``root``'s SQLite store and artifacts, answering on ``port``."""
    command = [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--artifacts-destination", (root / "artifacts").as_uri(), "--host", "127.0.0.1", "--port", str(port)]
    with open(root / "server.log", "ab") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except (urllib.error.URLError, OSError):
            assert server.poll() is None and time.monotonic() < deadline, (root / "server.log").read_text()[-3000:]
            time.sleep(0.5)


def _kill(process: subprocess.Popen) -> None:
    """Kill ``process`` and what it started, as a crash would."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _gptflow(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptflow.flows.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _training_metrics_arrived(client: MlflowClient) -> bool:
    experiment = client.get_experiment_by_name("gptflow-pretrain")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return any("train/loss" in run.data.metrics for run in runs)


def test_training_outlives_its_tracking_server_and_sync_sends_what_it_kept(prefect_api_url, tiny_corpus_dir, tmp_path):
    server_root, workspace = tmp_path / "server", tmp_path / "workspace"
    server_root.mkdir()
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update(PREFECT_API_URL=prefect_api_url, GPTFLOW_HOME=str(workspace), MLFLOW_TRACKING_URI=uri)
    client = MlflowClient(uri)

    server = _start_server(server_root, port)
    # To a file, not a pipe: nothing reads the output until the end, and a full pipe would block the run.
    training_log = tmp_path / "training.log"
    with training_log.open("w") as log:
        training = subprocess.Popen(
            [sys.executable, "-m", "gptflow.flows.cli", "pretrain", "--corpus", str(tiny_corpus_dir), "--preset",
             "tiny", "--set", f"train.max_steps={STEPS}"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 300
        while not _training_metrics_arrived(client):
            assert training.poll() is None and time.monotonic() < deadline, "no training metrics reached the server"
            time.sleep(0.5)
        _kill(server)
        training.wait(timeout=600)
    finally:
        _kill(server)
        _kill(training)
    output = training_log.read_text()

    assert training.returncode == 0, output[-5000:]
    [outbox] = (workspace / "mlflow-outbox").glob("*.jsonl")
    run_id = outbox.stem
    assert f"{uri} cannot be reached" in output and "the run goes on" in output
    assert f"operations of run {run_id}" in output and f"are kept in {outbox}" in output
    assert f"gptflow sync --workspace {workspace}" in output
    assert list(workspace.glob("store/runs/*/final/model.safetensors"))  # the trained model, in the workspace

    server = _start_server(server_root, port)
    try:
        synced = _gptflow("sync", "--workspace", str(workspace), env=env)
        assert synced.returncode == 0, synced.stdout + synced.stderr
        assert f"run {run_id}: sent" in synced.stdout and "registered gptflow-tiny/1" in synced.stdout
        assert not list((workspace / "mlflow-outbox").glob("*.jsonl"))

        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run_id, "train/loss")
        assert [metric.step for metric in history] == list(range(5, STEPS + 1, 5))
        assert run.data.metrics["eval/val_loss"] > 0
        [output_model] = run.outputs.model_outputs
        model = client.get_logged_model(output_model.model_id)
        # The final eval metrics, kept before the model had an id, measure it (MLflow's Models tab).
        assert model.name == "gptflow-tiny" and "eval/val_loss" in {metric.key for metric in model.metrics}
        # Described, with its settings, when the outbox logged it: as a run reaching its server would.
        assert model.tags["mlflow.note.content"].startswith("Text generator: a GPT of ")
        assert model.params["preset"] == "tiny" and model.params["train.max_steps"] == str(STEPS)
        [version] = client.search_model_versions("name='gptflow-tiny'")
        assert (version.version, version.run_id) == ("1", run_id)
        assert run.data.tags["gptflow.registered_model"] == "gptflow-tiny/1"

        generated = _gptflow("generate", "--model", "models:/gptflow-tiny/1", "--prompt", "x",
                             "--max-new-tokens", "8", env=env)
        assert generated.returncode == 0 and generated.stdout.startswith("x"), generated.stdout + generated.stderr
    finally:
        _kill(server)
