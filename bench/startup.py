"""gptflow's fixed cost: how fast a bad command is refused, and how long a quick run takes to start.

    python bench/startup.py                 # 5 refusals, 3 timed runs per Prefect setup
    python bench/startup.py --runs 1        # quicker, noisier
    python bench/startup.py --before DIR    # and the same for the gptflow checkout in DIR/gptflow

Every figure is a ``gptflow`` command run as a user runs it (a fresh process, ``python -m
gptflow.flows.cli``), timed from its start:

- refused: ``gptflow pretrain --set trian.max_steps=3`` (a typo in the section), until it exits
  with status 2; wall time (median of ``--refusals``) and its maximum resident memory.
- to the first step: ``gptflow pretrain --preset tiny`` on ~20 files of the standard library's
  ``json`` and ``email`` packages, until it prints its first ``pretrain: step`` line (``--set
  train.log_interval=1``: after step 1), median of ``--runs``. Each setup's workspace is warmed
  by an untimed run first (its data stages cached, Prefect's and MLflow's databases created),
  and each timed run sets another ``train.seed``, so training always runs: what is timed is
  what a quick run pays before it learns anything, not its data stages. Three setups:
  (a) no Prefect server: Prefect starts a temporary one for the run; (b) the stack of ``gptflow
  up`` (on free ports), pointed at with the variables ``gptflow up`` prints; (c) the same stack,
  no variables set: what gptflow finds in the workspace's ``stack.json``.
- up: ``gptflow up`` on a new workspace (both servers create their databases), until it exits,
  ready: its servers answer and its experiments exist.

With ``--before DIR``, each figure is measured for both checkouts (``PYTHONPATH=DIR`` runs the
other), the temporary server's timed runs taking turns between them, so that both see the same
kind of load on a shared machine.

Prefect's home (its profile and its temporary server's database) is a scratch folder, and the
``PREFECT_API_URL``, ``MLFLOW_TRACKING_URI`` and ``GPTFLOW_HOME`` of the calling shell are
ignored, so the figures do not depend on the machine's own Prefect setup.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CLI = [sys.executable, "-m", "gptflow.flows.cli"]
REFUSED_ARGS = ["pretrain", "--set", "trian.max_steps=3"]
CORPUS_PACKAGES = ("json", "email")
CORPUS_FILES = 20
FIRST_STEP = re.compile(r"pretrain: step \d+/")
FLOW_STARTED = "Beginning flow run"
OUTSIDE_SETTINGS = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "GPTFLOW_HOME")


class RunFailed(Exception):
    """A timed run exited with an error; the message is its last line of output."""


@dataclass
class RunTiming:
    flow_started_s: float
    first_step_s: float


def main() -> None:
    args = _parser().parse_args()
    with tempfile.TemporaryDirectory(prefix="gptflow-startup-") as scratch_dir:
        scratch = Path(scratch_dir)
        env = {name: value for name, value in os.environ.items() if name not in OUTSIDE_SETTINGS}
        env |= {"PREFECT_HOME": str(scratch / "prefect-home"), "PYTHONUNBUFFERED": "1"}
        versions = {"": env}
        if args.before:
            versions = {"before": env | {"PYTHONPATH": str(args.before.resolve())}, "after": env}
        corpus = _small_corpus(scratch / "corpus")
        print(f"machine   {os.cpu_count()} CPUs, load average {_load()} at the start", flush=True)

        refusals = [_refuse(env) for _ in range(args.refusals)]
        seconds = [wall_s for wall_s, _ in refusals]
        print(f"refused   gptflow {' '.join(REFUSED_ARGS)}: {statistics.median(seconds):.2f} s "
              f"(median of {len(seconds)}: {_listed(seconds)}), max RSS {max(rss for _, rss in refusals):.0f} MB",
              flush=True)

        seeds = iter(range(1, 10_000))
        results = {f"(a) temporary Prefect server {version}": timings for version, timings in zip(
            versions, _time_runs_alternating(list(versions.values()), corpus, scratch, seeds, args.runs))}
        for version, version_env in versions.items():
            stack_workspace = scratch / f"ws-stack-{version}"
            started = time.perf_counter()
            printed = _gptflow(version_env, "up", "--workspace", str(stack_workspace),
                               "--prefect-port", str(_free_port()), "--mlflow-port", str(_free_port()))
            print(f"up        gptflow up {version}: ready in {time.perf_counter() - started:.1f} s on a new workspace "
                  f"(load average {_load()})", flush=True)
            try:
                exported = dict(re.findall(r"^export (\w+)=(.*)$", printed, flags=re.MULTILINE))
                stack_env = version_env | {name: exported[name] for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
                results[f"(b) gptflow up, variables exported {version}"] = _time_runs(
                    stack_env, corpus, stack_workspace, seeds, args.runs)
                results[f"(c) gptflow up, found in stack.json {version}"] = _time_runs(
                    version_env, corpus, stack_workspace, seeds, args.runs)
            finally:
                _gptflow(version_env, "down", "--workspace", str(stack_workspace))

        print(f"\nto the first step of `gptflow pretrain --preset tiny` ({CORPUS_FILES} files), median of {args.runs}:")
        for setup, timings in results.items():
            if isinstance(timings, RunFailed):
                print(f"  {setup:45s} failed, {timings}")
                continue
            first = [timing.first_step_s for timing in timings]
            flow = [timing.flow_started_s for timing in timings]
            print(f"  {setup:45s} {statistics.median(first):5.1f} s   flow run began at "
                  f"{statistics.median(flow):4.1f} s   (each run: {_listed(first)})")
        print(f"machine   load average {_load()} at the end")


def _load() -> str:
    return " ".join(f"{load:.1f}" for load in os.getloadavg())


def _refuse(env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and maximum RSS (MB) of a refused command."""
    started = time.perf_counter()
    process = subprocess.Popen([*CLI, *REFUSED_ARGS], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall_s = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    error = process.stderr.read().decode()
    process.stderr.close()
    if process.returncode != 2:
        raise SystemExit(f"expected exit status 2, got {process.returncode}:\n{error}")
    return wall_s, usage.ru_maxrss / 1024  # Linux reports KB


def _time_runs(
    env: dict[str, str], corpus: Path, workspace: Path, seeds: Iterator[int], runs: int
) -> list[RunTiming] | RunFailed:
    try:
        _tiny_run(env, corpus, workspace, next(seeds))  # warms the workspace and the servers' databases
        return [_tiny_run(env, corpus, workspace, next(seeds)) for _ in range(runs)]
    except RunFailed as failure:
        return failure


def _time_runs_alternating(
    envs: list[dict[str, str]], corpus: Path, scratch: Path, seeds: Iterator[int], runs: int
) -> list[list[RunTiming] | RunFailed]:
    """``_time_runs`` for each environment, each on a workspace of its own, their runs taking
    turns, so that each sees the same kind of load."""
    workspaces = [scratch / f"ws-temporary-{index}" for index in range(len(envs))]
    timings: list[list[RunTiming] | RunFailed] = []
    for env, workspace in zip(envs, workspaces):
        timings.append(_time_runs(env, corpus, workspace, seeds, 0))
    for _ in range(runs):
        for index, (env, workspace) in enumerate(zip(envs, workspaces)):
            if isinstance(timings[index], list):
                try:
                    timings[index].append(_tiny_run(env, corpus, workspace, next(seeds)))
                except RunFailed as failure:
                    timings[index] = failure
    return timings


def _tiny_run(env: dict[str, str], corpus: Path, workspace: Path, seed: int) -> RunTiming:
    command = [
        *CLI, "pretrain", "--preset", "tiny", "--corpus", str(corpus), "--workspace", str(workspace), "--from-scratch",
        "--set", "train.max_steps=3", "--set", "train.log_interval=1", "--set", f"train.seed={seed}",
    ]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    flow_started_s = first_step_s = None
    output = []
    for line in process.stdout:
        output.append(line)
        elapsed = time.perf_counter() - started
        if flow_started_s is None and FLOW_STARTED in line:
            flow_started_s = elapsed
        if first_step_s is None and FIRST_STEP.search(line):
            first_step_s = elapsed
    if process.wait() != 0 or first_step_s is None:
        raise RunFailed(f"exit status {process.returncode}: {output[-1].strip() if output else ''}")
    return RunTiming(flow_started_s or float("nan"), first_step_s)


def _gptflow(env: dict[str, str], *args: str) -> str:
    """What ``gptflow *args`` prints."""
    return subprocess.run([*CLI, *args], env=env, check=True, capture_output=True, text=True).stdout


def _small_corpus(folder: Path) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = [path for package in CORPUS_PACKAGES for path in sorted((stdlib / package).glob("*.py"))]
    folder.mkdir()
    for source in sources[:CORPUS_FILES]:
        shutil.copy2(source, folder / f"{source.parent.name}_{source.name}")
    return folder


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _listed(values: list[float]) -> str:
    return " ".join(f"{value:.2f}" for value in values)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refusals", type=int, default=5, help="timed refusals of a bad --set")
    parser.add_argument("--runs", type=int, default=3, help="timed tiny runs per Prefect setup")
    parser.add_argument("--before", type=Path, help="a folder holding another checkout of gptflow as gptflow/ (a "
                        "commit before a change: `git archive COMMIT | tar -x -C DIR/gptflow`): every setup is "
                        "timed with it too, the temporary server's runs taking turns with this checkout's")
    return parser


if __name__ == "__main__":
    main()
