"""``gptflow pretrain`` on a workspace kept on S3 (a real moto server of the test's own) whose
endpoint stops answering mid-training: killed, it is waited for while training goes on and gets the
kept checkpoints when it is started again on its port; killed for longer than a run waits, the run
ends with one line naming the endpoint and what is kept, and the same command continues once it
answers; paused with SIGSTOP, training goes on and the log says what it waits for."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import s3fs

from gptflow.data.commits import CONTENTS_FILE

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "gptflow-test"
URL = f"s3://{BUCKET}/team"
CHECKPOINT = re.compile(r"pretrain: checkpoint of step (\d+) saved")


def _pretrain(tiny_corpus_dir: Path, env: dict[str, str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "gptflow.flows.cli", "pretrain", "--corpus", str(tiny_corpus_dir), "--preset",
               "tiny", "--set", "train.max_steps=150", "--set", "train.checkpoint_interval=25", "--workspace", URL]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _env(prefect_api_url: str, server, tmp_path: Path, wait_s: int) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    return {**env, **server.environment, "PREFECT_API_URL": prefect_api_url, "GPTFLOW_CACHE": str(tmp_path / "cache"),
            "GPTFLOW_OBJECT_STORE_TIMEOUT_S": "2", "GPTFLOW_OBJECT_STORE_WAIT_S": str(wait_s)}


def _follow(run: subprocess.Popen, on_line: Callable[[str], None], timeout_s: float = 600) -> str:
    """Feed each line of ``run``'s output to ``on_line`` until it exits; its whole output."""
    deadline = time.monotonic() + timeout_s
    lines = []
    for line in run.stdout:
        lines.append(line)
        on_line(line)
        assert time.monotonic() < deadline, "".join(lines)[-4000:]
    run.wait(timeout=60)
    return "".join(lines)


def _restart_empty(server) -> None:
    """Start the server again on its port; moto kept its objects in memory, so the bucket is made again."""
    server.start()
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)


def _published_checkpoints() -> list[str]:
    filesystem = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    return sorted(commit.split("/")[-2] for commit in filesystem.glob(f"{BUCKET}/team/store/runs/*/checkpoints/*/"
                                                                      f"{CONTENTS_FILE}"))


def test_training_goes_on_while_the_store_is_stopped_and_publishes_its_checkpoints_on_its_return(
        prefect_api_url, own_s3_server, tiny_corpus_dir, tmp_path):
    steps_after_outage: list[int] = []
    outage = {"seen": False, "restarted": False}

    def on_line(line: str) -> None:
        checkpoint = CHECKPOINT.search(line)
        if checkpoint and own_s3_server.process is not None and not outage["restarted"]:
            own_s3_server.stop()  # at the first checkpoint
        elif checkpoint and outage["seen"]:
            steps_after_outage.append(int(checkpoint.group(1)))
        if "does not answer" in line:
            outage["seen"] = True
        if not outage["restarted"] and (len(steps_after_outage) >= 2 or "Waiting up to" in line):
            _restart_empty(own_s3_server)
            outage["restarted"] = True

    output = _follow(_pretrain(tiny_corpus_dir, _env(prefect_api_url, own_s3_server, tmp_path, 300)), on_line)
    assert "Traceback" not in output, output[-6000:]
    assert f"The object store at http://127.0.0.1:{own_s3_server.port} ({URL}) does not answer" in output
    assert steps_after_outage, "training went on while the store was away"
    assert "answers again" in output
    assert "step-00000150" in _published_checkpoints(), "the kept checkpoints were published on its return"


def test_a_store_away_longer_than_a_run_waits_ends_it_in_one_line_and_the_same_command_continues(
        prefect_api_url, own_s3_server, tiny_corpus_dir, tmp_path):
    def on_line(line: str) -> None:
        if CHECKPOINT.search(line) and own_s3_server.process is not None:
            own_s3_server.stop()

    env = _env(prefect_api_url, own_s3_server, tmp_path, 10)
    run = _pretrain(tiny_corpus_dir, env)
    output = _follow(run, on_line)
    assert run.returncode == 2, output[-6000:]
    assert "Traceback" not in output, output[-6000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith(f"gptflow: error: The object store at http://127.0.0.1:{own_s3_server.port} ({URL}) "
                           "did not answer within 10 s"), output[-3000:]
    assert re.search(r"file\(s\) and folder\(s\) in \S+ \(store/runs/\w+/checkpoints/step-\d+, .*/final", last), last
    assert last.endswith("are kept locally and not yet published. Rerun the same command once it answers: it "
                         "publishes them and continues from them.")

    _restart_empty(own_s3_server)
    rerun = _pretrain(tiny_corpus_dir, env)
    output = _follow(rerun, lambda line: None)
    assert rerun.returncode == 0, output[-6000:]
    assert "resuming from step 150" in output, output[-6000:]
    assert "step-00000150" in _published_checkpoints()


def test_training_goes_on_while_the_store_is_paused_and_says_what_it_waits_for(
        prefect_api_url, own_s3_server, tiny_corpus_dir, tmp_path):
    checkpoints: list[int] = []

    def on_line(line: str) -> None:
        checkpoint = CHECKPOINT.search(line)
        if checkpoint:
            checkpoints.append(int(checkpoint.group(1)))
            if len(checkpoints) == 1:
                own_s3_server.pause()
            elif len(checkpoints) == 3:
                own_s3_server.pause(False)

    try:
        run = _pretrain(tiny_corpus_dir, _env(prefect_api_url, own_s3_server, tmp_path, 300))
        output = _follow(run, on_line)
    finally:
        own_s3_server.pause(False)
    assert run.returncode == 0, output[-6000:]
    assert "Traceback" not in output, output[-6000:]
    assert re.search(r"Waiting for the object store at http://127\.0\.0\.1:\d+ \(s3://\S+\) to answer \(\w+ ", output)
    assert len(checkpoints) >= 3, "training went on while the store was paused"
    assert "step-00000150" in _published_checkpoints()
