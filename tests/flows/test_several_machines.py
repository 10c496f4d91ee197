"""Training on several machines through torchrun's c10d rendezvous, with two "nodes" on this one:
the head runs the flow and holds rank 0, the other joins with ``gptflow train-node``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _gptflow(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gptflow.flows.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture()
def cli_env(prefect_api_url, tmp_path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update(PREFECT_API_URL=prefect_api_url, GPTFLOW_HOME=str(tmp_path / "workspace"))
    return env


def test_two_nodes_train_one_model_and_log_one_mlflow_run(cli_env, tiny_corpus_dir):
    rendezvous = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
                  "--rdzv-timeout", "300"]
    # The other node starts first and waits for the head, which runs the data stages before training.
    other = _gptflow("train-node", *rendezvous, env=cli_env)
    head = _gptflow("pretrain", "--corpus", str(tiny_corpus_dir), "--preset", "tiny", "--set", "train.max_steps=10",
                    *rendezvous, env=cli_env)
    head_out, head_err = head.communicate(timeout=600)
    other_out, other_err = other.communicate(timeout=120)
    assert head.returncode == 0, head_out[-3000:] + head_err[-3000:]
    assert other.returncode == 0, other_out[-3000:] + other_err[-3000:]
    assert "launching 1 of 2 processes here" in head_out + head_err

    client = MlflowClient(f"sqlite:///{Path(cli_env['GPTFLOW_HOME']) / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gptflow-pretrain")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.nproc"] == "2"
    assert run.data.tags["gptflow.stage.pretrain"] == "executed"
    # Rank 0 alone reported, once per log interval: the other node logged nothing.
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [5, 10]
    assert run.data.tags["gptflow.registered_model"] == "gptflow-tiny/1"


@pytest.mark.parametrize(("endpoint", "message"), [
    # This node hosts the rendezvous store, and no other node ever joins it.
    (f"127.0.0.1:{_free_port()}", "did not all join the rendezvous"),
    # TEST-NET-1 (RFC 5737): an address nothing answers at.
    ("192.0.2.1:29500", "nothing answered at the rendezvous endpoint 192.0.2.1:29500"),
])
def test_a_rendezvous_nobody_completes_fails_in_one_line_within_its_timeout(tmp_path, endpoint, message):
    env = {**os.environ, "GPTFLOW_HOME": str(tmp_path / "workspace")}
    started = time.monotonic()
    other = _gptflow("train-node", "--nnodes", "2", "--rdzv-endpoint", endpoint, "--rdzv-timeout", "5", env=env)
    _, stderr = other.communicate(timeout=120)
    assert other.returncode == 2, stderr[-3000:]
    assert message in stderr.splitlines()[-1]
    assert time.monotonic() - started < 60
