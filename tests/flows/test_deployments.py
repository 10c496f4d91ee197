"""The team path: `gptflow up`, `gptflow serve`, `prefect deployment run ... --watch`, MLflow server."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from gptflow.flows.deployments import DEPLOYMENTS

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))

pytestmark = pytest.mark.slow


def test_prefect_yaml_declares_the_served_deployments():
    declared = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    served = {(flow.name, name) for flow, name in DEPLOYMENTS}
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


@contextlib.contextmanager
def _stack(workspace: Path) -> Iterator[dict[str, str]]:
    """``gptflow up`` on free loopback ports: the environment of its exports; ``gptflow down`` on
    leaving, even on failure (when the body has not stopped it already)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "PREFECT_"))}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    try:
        ports = [_free_port(), _free_port()]
    except OSError as error:
        pytest.skip(f"cannot bind a loopback port: {error}")
    started = _gptflow("up", "--workspace", str(workspace), "--prefect-port", str(ports[0]),
                       "--mlflow-port", str(ports[1]), env=env, timeout=300)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        # What it waits for, as it waits (a first start may take a minute).
        progress = started.stderr.splitlines()
        assert progress[0] == (f"gptflow: starting a Prefect server on port {ports[0]} and an MLflow server on port "
                               f"{ports[1]} (their logs: {workspace / 'logs'})")
        for name, port in (("Prefect", ports[0]), ("MLflow", ports[1])):
            assert any(line.startswith(f"gptflow: the {name} server answers at http://127.0.0.1:{port}, ")
                       for line in progress), started.stderr
        # Then, not silent, what it does before it prints the tables.
        assert "gptflow: finding or making the experiments on the MLflow server (seconds on a busy machine)" in progress
        exports = dict(line.removeprefix("export ").split("=", 1)
                       for line in started.stdout.splitlines() if line.startswith("export "))
        assert exports["PREFECT_API_URL"] == f"http://127.0.0.1:{ports[0]}/api"
        assert exports["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports[1]}"
        _assert_it_prints_each_experiment_s_runs_table(started.stdout, exports["MLFLOW_TRACKING_URI"])
        yield {**env, **exports}
    finally:
        _gptflow("down", "--workspace", str(workspace), env=env, timeout=120)


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


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A real Prefect server and MLflow server, shared by this module's tests."""
    with _stack(tmp_path_factory.mktemp("stack")) as env:
        # The Prefect UI served on this port calls the API on this port too (its default is 4200).
        ui = env["PREFECT_API_URL"].removesuffix("/api")
        with urllib.request.urlopen(f"{ui}/ui-settings", timeout=10) as answer:
            assert json.load(answer)["api_url"] == env["PREFECT_API_URL"]
        yield env


def _serve(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """``gptflow serve``, its output to ``log_path``: to a file, not a pipe nobody reads, whose full
    buffer would block the process on its next write, so that it could not even exit."""
    with log_path.open("w") as log:
        # As from a terminal, where Ctrl-C reaches it: a test run started in the background of a
        # non-interactive shell ignores SIGINT, and so would a process it starts (Python then
        # installs no KeyboardInterrupt handler).
        serve = subprocess.Popen([sys.executable, "-m", "gptflow.flows.cli", "serve"], cwd=ROOT,
                                 env={**env, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while subprocess.run([PREFECT, "deployment", "inspect", "pretrain/train-gpt"], env=env,
                         capture_output=True).returncode != 0:
        if time.monotonic() > deadline or serve.poll() is not None:
            serve.kill()
            raise AssertionError("the deployments were never served:\n" + log_path.read_text()[-3000:])
        time.sleep(1)
    return serve


def _stop(serve: subprocess.Popen, how: signal.Signals, log_path: Path, within_s: float) -> str:
    """Stop ``serve`` by the signal ``how``, as a terminal's Ctrl-C or a service manager does, and
    return its output; fail if it takes over ``within_s``."""
    os.killpg(serve.pid, how)
    try:
        serve.wait(timeout=within_s)
    except subprocess.TimeoutExpired:
        serve.kill()
        raise AssertionError(f"gptflow serve did not stop on {how.name} within {within_s:g} s; its output:\n"
                             + log_path.read_text()[-3000:]) from None
    assert serve.returncode == 0, log_path.read_text()[-3000:]
    return log_path.read_text()


def test_the_deployments_are_named_for_what_they_do_and_offer_the_users_parameters_alone(stack, tmp_path):
    serve = _serve(stack, tmp_path / "serve.log")
    try:
        listed = subprocess.run([PREFECT, "deployment", "ls"], env={**stack, "COLUMNS": "200"}, capture_output=True,
                                text=True, timeout=120).stdout
        assert {"pretrain/train-gpt", "sweep/compare-settings", "finetune/tune-pretrained",
                "evaluate/score-model"} <= set(listed.split()), listed
        inspected = subprocess.run([PREFECT, "deployment", "inspect", "pretrain/train-gpt", "--output", "json"],
                                   env=stack, capture_output=True, text=True, timeout=120)
        offered = json.loads(inspected.stdout)["parameter_openapi_schema"]["properties"]
        # The run form's fields: what gptflow's own callers set (the rendezvous, a sweep's point) is not there.
        assert {"corpus", "preset", "overrides", "init_from"} <= set(offered)
        assert not {"rendezvous", "sweep"} & set(offered)
    finally:
        _stop(serve, signal.SIGINT, tmp_path / "serve.log", within_s=60)


def test_a_served_deployment_trains_and_lands_in_the_mlflow_server(stack, tiny_corpus_dir, tmp_path):
    serve = _serve(stack, tmp_path / "serve.log")
    try:
        parameters = {"preset": "tiny", "corpus": [str(tiny_corpus_dir)]}
        # Wide, so that the console prints each line whole (the MLflow address included).
        run = subprocess.run(
            [PREFECT, "deployment", "run", "pretrain/train-gpt", "--params", json.dumps(parameters), "--watch"],
            env={**stack, "COLUMNS": "400"}, capture_output=True, text=True, timeout=600,
        )
        assert run.returncode == 0 and "Completed" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        _stop(serve, signal.SIGINT, tmp_path / "serve.log", within_s=60)

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
    # The watch prints the flow run's log as it comes, which ends with the summary: the val loss,
    # the MLflow run's address, then its experiment's runs table; after it only the run's end.
    watched = run.stdout.splitlines()
    [loss] = [index for index, line in enumerate(watched) if line.strip().startswith("val loss ")]
    [link] = [index for index, line in enumerate(watched) if f"/runs/{mlflow_run.info.run_id}" in line]
    [table] = [index for index, line in enumerate(watched) if "compare     gptflow-pretrain: http" in line]
    assert f"{mlflow_run.data.metrics['eval/val_loss']:.3f} nats/token" in watched[loss]
    assert loss < link < table and "pretrain: step 30/30" in run.stdout  # the progress lines, as they come
    assert all(any(end in line for end in ("Finished in state", "prefect.flow-run.Completed", "finished successfully"))
               for line in watched[table + 1:]), "\n".join(watched[loss:])
    assert len(client.get_metric_history(mlflow_run.info.run_id, "train/loss")) == 6
    top_level = {artifact.path for artifact in client.list_artifacts(mlflow_run.info.run_id)}
    assert {"data", "eval", "tokenizer", "loss_curve.png"} <= top_level  # the curve where MLflow's compare view finds it
    _assert_it_prints_each_experiment_s_runs_table((tmp_path / "serve.log").read_text(), stack["MLFLOW_TRACKING_URI"])
    [output] = mlflow_run.outputs.model_outputs  # the model: a logged model of the run, in MLflow's Models tab
    assert client.get_logged_model(output.model_id).name == "gptflow-tiny"  # named as its registered model

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
    assert re.search(r"^wall time   \S+ since the command started, \S+ in the flow run$", result.stdout, re.MULTILINE)


def test_serve_stops_at_once_on_sigterm_when_the_servers_are_gone(tmp_path):
    """``gptflow down`` while ``gptflow serve`` runs, then SIGTERM (a service manager stopping it):
    one line each, no traceback, and serve ends in seconds rather than retrying the Prefect API."""
    workspace = tmp_path / "workspace"
    with _stack(workspace) as env:
        serve = _serve(env, tmp_path / "serve.log")
        try:
            assert _gptflow("down", "--workspace", str(workspace), env=env, timeout=120).returncode == 0
            deadline = time.monotonic() + 60
            while "FlowRunCancellingObserver" not in (tmp_path / "serve.log").read_text():
                assert time.monotonic() < deadline, "serve never noticed the Prefect server go away"
                time.sleep(0.5)
        except BaseException:
            serve.kill()
            raise
        output = _stop(serve, signal.SIGTERM, tmp_path / "serve.log", within_s=15)
    assert "Traceback" not in output
    prefect_url = env["PREFECT_API_URL"].removesuffix("/api")
    assert (f"gptflow serve: stopping; the Prefect server at {prefect_url} no longer answers, so its deployments "
            "stay as they were") in output.splitlines()
