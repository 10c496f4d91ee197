"""A sweep stopped (SIGTERM, Ctrl-C) or killed outright (SIGKILL) takes its points along, in worker
processes here and on a real Ray cluster: no point trains on, no process holds the workspace, each
point's MLflow run is marked, and a rerun resumes the points (docs/FAULTS.md)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.tracking.killed_runs import KILLED_TAG, mark_runs_of_dead_processes_killed

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STOPPED_WITHIN_S = 120
"""The issue asks for seconds (about 2 s measured on a quiet machine); the bound is generous because
Prefect's flow teardown took over a minute on this 2-core machine running two suites at once."""
ENDLESS = ["--set", "train.max_steps=100000", "--set", "train.val_interval=100000",
           "--set", "train.checkpoint_interval=100000", "--set", "train.log_interval=2"]


@pytest.fixture
def small_corpus(tiny_corpus_dir, tmp_path) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for source in sorted(tiny_corpus_dir.glob("json_*.py")):
        shutil.copy2(source, corpus / source.name)
    return corpus


def _start_sweep(prefect_api_url: str, workspace: Path, corpus: Path, *options: str) -> subprocess.Popen:
    """``gptflow sweep`` of two points training at once, in a session of its own (its process group is
    what a terminal's Ctrl-C reaches); its output in ``workspace``'s sibling ``sweep.log``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("MLFLOW_")}
    env.update(PREFECT_API_URL=prefect_api_url, GPTFLOW_HOME=str(workspace))
    command = [sys.executable, "-m", "gptflow.flows.cli", "sweep", "--corpus", str(corpus), "--preset", "tiny",
               "--grid", "train.learning_rate=1e-3,3e-3", "--max-parallel", "2", *options]
    with (workspace.parent / "sweep.log").open("a") as log:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _log(workspace: Path) -> str:
    return (workspace.parent / "sweep.log").read_text()


def _client(workspace: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")


def _until(condition: Callable[[], object], within: float, failure: Callable[[], str]) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, failure()
        time.sleep(0.2)


def _points_training(workspace: Path, sweep: subprocess.Popen, ready: Callable[[], bool] = lambda: True) -> list[Run]:
    """The two points' MLflow runs, once both train (a loss logged) and ``ready()``."""
    # The sweep's run exists once it logs this: the MLflow store is created, a reader may open it.
    _until(lambda: "sweep: 2 points, 2 at a time" in _log(workspace) or sweep.poll() is not None, 300,
           lambda: _log(workspace)[-3000:])
    client = _client(workspace)
    experiment = client.get_experiment_by_name("gptflow-pretrain").experiment_id
    points: list[Run] = []

    def training() -> bool:
        assert sweep.poll() is None, _log(workspace)[-3000:]
        points[:] = [run for run in client.search_runs([experiment]) if "gptflow.sweep.point" in run.data.tags
                     and run.info.status == "RUNNING" and "train/loss" in run.data.metrics]
        return len(points) == 2 and ready()

    _until(training, 600, lambda: f"the points never trained: {_log(workspace)[-3000:]}")
    return points


def _ended(pid: int) -> bool:
    """Whether the process ended (a zombie nobody reaped has ended too)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def _holding(path: Path) -> set[int]:
    """The processes that have ``path`` open."""
    holders = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == str(path) for fd in fd_dir.iterdir()):
                holders.add(int(fd_dir.parent.name))
        except OSError:  # ended meanwhile, or another user's
            continue
    return holders


def _processes_of(workspace: Path) -> set[int]:
    """The processes whose environment names ``workspace``: the sweep's and all it started here
    (workers, torchrun, its ranks), whatever their parent now."""
    marker = f"GPTFLOW_HOME={workspace}".encode()
    found = set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0") and not _ended(int(environ.parent.name)):
                found.add(int(environ.parent.name))
        except OSError:  # ended meanwhile, or another user's
            continue
    return found


def _statuses(workspace: Path, runs: list[Run]) -> dict[str, str]:
    client = _client(workspace)
    return {run.info.run_id: client.get_run(run.info.run_id).info.status for run in runs}


def _assert_workers_end(workspace: Path, points: list[Run]) -> None:
    workers = {int(run.data.tags["gptflow.pid"]) for run in points}
    _until(lambda: all(map(_ended, workers)) and not _processes_of(workspace), STOPPED_WITHIN_S,
           lambda: f"workers {workers} or {_processes_of(workspace)} outlived the sweep: {_log(workspace)[-3000:]}")
    assert not _holding(workspace / "mlflow.db") - {os.getpid()}, "a process of the sweep holds the MLflow store"


def test_a_sweep_killed_outright_takes_its_worker_processes_along(prefect_api_url, small_corpus, tmp_path):
    workspace = tmp_path / "workspace"
    sweep = _start_sweep(prefect_api_url, workspace, small_corpus, *ENDLESS)
    points = _points_training(workspace, sweep)
    assert str(sweep.pid) not in {run.data.tags["gptflow.pid"] for run in points}

    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    _assert_workers_end(workspace, points)
    # Each worker stopped its point before it ended: its run is marked, not left RUNNING.
    assert set(_statuses(workspace, points).values()) == {"KILLED"}


@pytest.mark.parametrize(("signal_number", "reason"), [(signal.SIGTERM, "stopped by SIGTERM"),
                                                       (signal.SIGINT, "interrupted")])
def test_sigterm_or_ctrl_c_stops_every_point_within_seconds_and_a_rerun_resumes_them(
    prefect_api_url, small_corpus, tmp_path, signal_number, reason
):
    workspace = tmp_path / "workspace"
    # Enough steps that the point that started first is still training once the other has a checkpoint:
    # the second starts once the first has made the data stages, half a minute later on a busy machine
    # (150 steps were not enough there), and on a quiet one the first trained 600 steps meanwhile.
    steps = ["--set", "train.max_steps=2000", "--set", "train.checkpoint_interval=5", "--set", "train.log_interval=2",
             "--set", "train.val_interval=1000"]
    sweep = _start_sweep(prefect_api_url, workspace, small_corpus, *steps)
    runs = workspace / "store" / "runs"
    points = _points_training(workspace, sweep, ready=lambda: len([
        run for run in runs.iterdir() if any(run.glob("checkpoints/step-*"))]) == 2)

    os.killpg(sweep.pid, signal_number)  # Ctrl-C: the terminal signals its foreground process group
    sweep.wait(timeout=STOPPED_WITHIN_S)
    _assert_workers_end(workspace, points)
    client = _client(workspace)
    [sweep_run] = [run for run in client.search_runs([points[0].info.experiment_id])
                   if run.data.tags.get("gptflow.flow") == "sweep"]
    # The sweep stops its points with SIGTERM, whatever stopped it.
    for run, why in [*((point, "stopped by SIGTERM") for point in points), (sweep_run, reason)]:
        stopped = client.get_run(run.info.run_id)
        assert stopped.info.status == "KILLED" and stopped.data.tags[KILLED_TAG].startswith(why), (
            f"{run.info.run_name}: {_log(workspace)[-3000:]}")
    output = _log(workspace)
    assert "Traceback" not in output
    if signal_number == signal.SIGINT:
        assert sweep.returncode == 130 and "gptflow: interrupted (Ctrl-C); its runs are marked KILLED" in output

    rerun = _start_sweep(prefect_api_url, workspace, small_corpus, *steps)
    assert rerun.wait(timeout=600) == 0, _log(workspace)[-3000:]
    finished = client.search_runs([points[0].info.experiment_id], filter_string="attributes.status = 'FINISHED'")
    resumed = [run for run in finished if "gptflow.sweep.point" in run.data.tags]
    assert len(resumed) == 2 and all("gptflow.resumed_from_step" in run.data.tags for run in resumed)


def test_a_stopped_sweep_stops_the_torchrun_ranks_of_its_points(prefect_api_url, small_corpus, tmp_path):
    workspace = tmp_path / "workspace"
    sweep = _start_sweep(prefect_api_url, workspace, small_corpus, *ENDLESS, "--set", "train.nproc=2")
    # Each point's torchrun and its two ranks, in its worker's process group.
    _until(lambda: len(_processes_of(workspace)) >= 1 + 2 * 4 or sweep.poll() is not None, 600,
           lambda: f"the ranks never started: {_log(workspace)[-3000:]}")
    assert sweep.poll() is None, _log(workspace)[-3000:]

    sweep.send_signal(signal.SIGTERM)
    sweep.wait(timeout=STOPPED_WITHIN_S)
    _until(lambda: not _processes_of(workspace), STOPPED_WITHIN_S,
           lambda: f"{_processes_of(workspace)} outlived the sweep: {_log(workspace)[-3000:]}")


def test_a_sweep_on_ray_stopped_by_sigterm_cancels_its_points(prefect_api_url, small_corpus, tmp_path, ray_cluster):
    workspace = tmp_path / "workspace"
    sweep = _start_sweep(prefect_api_url, workspace, small_corpus, "--ray", ray_cluster, *ENDLESS)
    points = _points_training(workspace, sweep)

    sweep.send_signal(signal.SIGTERM)
    sweep.wait(timeout=STOPPED_WITHIN_S)
    _assert_workers_end(workspace, points)
    # A cancelled task is interrupted in its main thread, as Ctrl-C interrupts a process.
    client = _client(workspace)
    [sweep_run] = [run for run in client.search_runs([points[0].info.experiment_id])
                   if run.data.tags.get("gptflow.flow") == "sweep"]
    for run, why in [*((point, "interrupted") for point in points), (sweep_run, "stopped by SIGTERM")]:
        stopped = client.get_run(run.info.run_id)
        assert stopped.info.status == "KILLED" and stopped.data.tags[KILLED_TAG].startswith(why), run.info.run_name


def test_a_sweep_on_ray_killed_outright_has_ray_end_its_points(prefect_api_url, small_corpus, tmp_path, ray_cluster):
    workspace = tmp_path / "workspace"
    sweep = _start_sweep(prefect_api_url, workspace, small_corpus, "--ray", ray_cluster, *ENDLESS)
    points = _points_training(workspace, sweep)

    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    _assert_workers_end(workspace, points)
    # Ray ended them without a word: the next run on this machine marks their runs KILLED.
    client = _client(workspace)
    mark_runs_of_dead_processes_killed(client, [points[0].info.experiment_id], Workspace.resolve(str(workspace)))
    assert set(_statuses(workspace, points).values()) == {"KILLED"}
