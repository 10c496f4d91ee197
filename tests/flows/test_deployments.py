"""The team path: `gptflow up`, `gptflow serve`, `prefect deployment run ... --watch`, MLflow server."""

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
import yaml
from mlflow import MlflowClient

from gptflow.flows.deployments import DEPLOYMENT_NAME, FLOWS

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))

pytestmark = pytest.mark.slow


def test_prefect_yaml_declares_the_served_deployments():
    declared = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    served = {(flow.name, DEPLOYMENT_NAME) for flow in FLOWS}
    assert {(d["entrypoint"].split(":")[1], d["name"]) for d in declared} == served
    for deployment in declared:
        path, function = deployment["entrypoint"].split(":")
        assert (ROOT / path).is_file() and f"def {function}(" in (ROOT / path).read_text()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _gptflow(*args: str, env: dict[str, str], **options) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptflow.flows.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, **options)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A real Prefect server and MLflow server on free loopback ports, stopped even on failure."""
    workspace = tmp_path_factory.mktemp("stack")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "PREFECT_"))}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    try:
        ports = [_free_port(), _free_port()]
    except OSError as error:
        pytest.skip(f"cannot bind a loopback port: {error}")
    args = ("--workspace", str(workspace))
    started = _gptflow("up", *args, "--prefect-port", str(ports[0]), "--mlflow-port", str(ports[1]),
                       env=env, timeout=300)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        exports = dict(line.removeprefix("export ").split("=", 1)
                       for line in started.stdout.splitlines() if line.startswith("export "))
        assert exports["PREFECT_API_URL"] == f"http://127.0.0.1:{ports[0]}/api"
        assert exports["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports[1]}"
        _assert_it_prints_each_experiment_s_runs_table(started.stdout, exports["MLFLOW_TRACKING_URI"])
        # The Prefect UI served on this port calls the API on this port too (its default is 4200).
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/ui-settings", timeout=10) as answer:
            assert json.load(answer)["api_url"] == exports["PREFECT_API_URL"]
        yield {**env, **exports}
    finally:
        stopped = _gptflow("down", *args, env=env, timeout=120)
        assert "prefect" in stopped.stdout and "mlflow" in stopped.stdout, stopped.stdout + stopped.stderr


def _assert_it_prints_each_experiment_s_runs_table(output: str, mlflow_url: str) -> None:
    """``gptflow up`` and ``serve`` print each kind of work's experiment and the address of its runs
    table, in the machine-learning view with gptflow's saved view, which the experiment holds."""
    tables = dict(re.findall(r"(gptflow-\w+) +(http://\S+)", output))
    assert list(tables) == ["gptflow-pretrain", "gptflow-finetune", "gptflow-evaluate", "gptflow-import"], output
    client = MlflowClient(mlflow_url)
    for name, address in tables.items():
        experiment = client.get_experiment_by_name(name)
        assert address == f"{mlflow_url}/#/experiments/{experiment.experiment_id}/runs?viewStateShareKey=gptflow" \
                          "&workflowType=machine_learning"
        assert "mlflow.sharedViewState.gptflow" in experiment.tags


def test_a_served_deployment_trains_and_lands_in_the_mlflow_server(stack, tiny_corpus_dir, tmp_path):
    # To a file, not a pipe nobody reads: the served flow run's log lines would fill a pipe's buffer
    # and block the process on its next write, so that it could not even exit.
    serve_log = tmp_path / "serve.log"
    with serve_log.open("w") as log:
        # As from a terminal, where Ctrl-C reaches it: a test run started in the background of a
        # non-interactive shell ignores SIGINT, and so would a process it starts (Python then
        # installs no KeyboardInterrupt handler).
        serve = subprocess.Popen([sys.executable, "-m", "gptflow.flows.cli", "serve"], cwd=ROOT,
                                 env={**stack, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([PREFECT, "deployment", "inspect", f"pretrain/{DEPLOYMENT_NAME}"], env=stack,
                             capture_output=True).returncode != 0:
            assert time.monotonic() < deadline and serve.poll() is None, "the deployment was never served"
            time.sleep(1)
        parameters = {"preset": "tiny", "corpus": [str(tiny_corpus_dir)]}
        run = subprocess.run(
            [PREFECT, "deployment", "run", f"pretrain/{DEPLOYMENT_NAME}", "--params", json.dumps(parameters), "--watch"],
            env=stack, capture_output=True, text=True, timeout=600,
        )
        assert run.returncode == 0 and "Completed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
            raise AssertionError("gptflow serve did not stop on SIGINT; its output:\n"
                                 + serve_log.read_text()[-3000:]) from None

    client = MlflowClient(stack["MLFLOW_TRACKING_URI"])
    [mlflow_run] = client.search_runs([client.get_experiment_by_name("gptflow-pretrain").experiment_id])
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.params["preset"] == "tiny"
    flow_run_url = mlflow_run.data.tags["prefect.flow_run_url"]
    assert flow_run_url.startswith(stack["PREFECT_API_URL"].removesuffix("/api"))
    # The run's description links to its Prefect flow run, under the name both UIs show.
    assert mlflow_run.data.tags["mlflow.note.content"] == f"Prefect flow run: [{mlflow_run.info.run_name}]({flow_run_url})"
    assert mlflow_run.info.run_name.startswith("pretrain tiny ")
    assert mlflow_run.data.metrics["eval/val_loss"] > 0
    assert len(client.get_metric_history(mlflow_run.info.run_id, "train/loss")) == 6
    top_level = {artifact.path for artifact in client.list_artifacts(mlflow_run.info.run_id)}
    assert {"data", "eval", "tokenizer", "loss_curve.png"} <= top_level  # the curve where MLflow's compare view finds it
    _assert_it_prints_each_experiment_s_runs_table(serve_log.read_text(), stack["MLFLOW_TRACKING_URI"])
    [output] = mlflow_run.outputs.model_outputs  # the model: a logged model of the run, in MLflow's Models tab
    assert client.get_logged_model(output.model_id).name == "model"

    [version] = client.search_model_versions("name='gptflow-tiny'")
    assert version.run_id == mlflow_run.info.run_id
    # The registered model generates text from a fresh process outside the repository, with
    # gptflow's code taken from inside the logged model.
    probe = (
        "import mlflow\n"
        "generator = mlflow.pyfunc.load_model('models:/gptflow-tiny/1')\n"
        "import gptflow.model as model\n"
        "print(repr(generator.predict(['def '], params={'max_new_tokens': 8})[0]))\n"
        "print(model.__file__)\n"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=stack, capture_output=True, text=True,
                            timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    sample, module_file = loaded.stdout.strip().splitlines()[-2:]
    assert sample.startswith("'def ") and len(sample) > len("'def '")
    assert not module_file.startswith(str(ROOT))


def test_a_local_run_finds_the_running_stack_without_the_variables(stack, tiny_corpus_dir):
    """Last in this file: the served run above is the stack's only run of the `gptflow-pretrain` experiment;
    MLFLOW_EXPERIMENT_NAME names the experiments' prefix."""
    env = {key: value for key, value in stack.items() if key not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env["MLFLOW_EXPERIMENT_NAME"] = "gptflow-local"
    result = _gptflow("pretrain", "--preset", "tiny", "--corpus", str(tiny_corpus_dir), "--set", "train.max_steps=2",
                      env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    prefect_url = stack["PREFECT_API_URL"].removesuffix("/api")
    assert f"using the servers `gptflow up` started for {stack['GPTFLOW_HOME']}: Prefect {prefect_url}" in result.stderr
    assert "Starting temporary server" not in result.stderr

    client = MlflowClient(stack["MLFLOW_TRACKING_URI"])
    [mlflow_run] = client.search_runs([client.get_experiment_by_name("gptflow-local-pretrain").experiment_id])
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["prefect.flow_run_url"].startswith(prefect_url)
    assert f"{stack['MLFLOW_TRACKING_URI']}/#/experiments/" in result.stdout
