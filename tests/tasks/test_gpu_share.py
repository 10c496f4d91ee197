"""How a sweep's points share the GPUs: each worker its own, points sharing a GPU only when there
are more of them than GPUs, and any other --max-parallel refused in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gptflow.tasks.runtime.gpu_share import GPUS_VARIABLE, GpuShareError, machine_gpus, share_gpus

ROOT = Path(__file__).resolve().parents[2]
EIGHT = [str(index) for index in range(8)]


@pytest.mark.parametrize(("max_parallel", "devices", "per_point"), [
    (8, EIGHT, 1.0),
    (2, ["0,1,2,3", "4,5,6,7"], 4.0),
    (1, ["0,1,2,3,4,5,6,7"], 8.0),
    (16, EIGHT + EIGHT, 0.5),
])
def test_points_get_disjoint_gpus_or_share_each_alike(max_parallel, devices, per_point):
    share = share_gpus(EIGHT, max_parallel, "this machine")
    assert share.worker_devices() == devices
    assert share.per_point == per_point


def test_the_log_line_says_how_the_gpus_are_shared():
    assert share_gpus(EIGHT, 8, "here").describe() == ", each on one of the 8 GPUs"
    assert share_gpus(EIGHT, 2, "here").describe() == (
        ", each on 4 of the 8 GPUs (train.nproc=4 trains a point on all 4)")
    assert share_gpus(["3"], 2, "here").describe() == ", 2 sharing the GPU"
    assert share_gpus([], 4, "here").describe() == ""
    assert share_gpus([], 4, "here").worker_devices() == [None] * 4


@pytest.mark.parametrize("max_parallel", [3, 5, 12])
def test_a_max_parallel_that_does_not_divide_the_gpus_is_refused(max_parallel):
    with pytest.raises(GpuShareError) as refused:
        share_gpus(EIGHT, max_parallel, "this machine")
    assert str(refused.value) == (
        f"--max-parallel {max_parallel} does not divide the 8 GPUs of this machine: use 1, 2, 4 or 8 (each point "
        "then trains on 8/K of them) or a multiple of 8 (K/8 points then share each GPU)")


def test_the_gpus_handed_out_can_be_named(monkeypatch):
    monkeypatch.setenv(GPUS_VARIABLE, "2, 3,GPU-5b1c")
    assert machine_gpus() == ["2", "3", "GPU-5b1c"]


def test_the_sweep_command_refuses_such_a_max_parallel_in_one_line(tmp_path):
    env = {**os.environ, GPUS_VARIABLE: "0,1,2,3", "GPTFLOW_HOME": str(tmp_path / "workspace")}
    command = [sys.executable, "-m", "gptflow.flows.cli", "sweep", "--grid", "train.learning_rate=1e-3,3e-3",
               "--max-parallel", "3"]
    refused = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        "gptflow: error: --max-parallel 3 does not divide the 4 GPUs of this machine: use 1, 2 or 4 (each point then "
        "trains on 4/K of them) or a multiple of 4 (K/4 points then share each GPU)"]
    assert not (tmp_path / "workspace").exists()
