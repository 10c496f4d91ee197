"""The same global sequence of windows at any world size, through a kill and a resume at another
world size: no window repeated, none skipped, over two epochs, for one stream and a mixture
(gloo on CPU; the counting shards' first tokens name each window)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gptflow.data.loader import MixedWindows, TokenWindows

SCRIPT = Path(__file__).with_name("window_log_training.py")
ROOT = Path(__file__).resolve().parents[2]
BLOCK_SIZE, GLOBAL_BATCH, MICRO_BATCH, MAX_STEPS, SEED = 16, 8, 2, 50, 1337


def _train(world_size: int, run_dir: Path, log_dir: Path, shards: list[Path],
           *options: str) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world_size)]
                if world_size > 1 else [sys.executable])
    command = [*launcher, str(SCRIPT), str(run_dir), str(log_dir), *map(str, shards), *options]
    return subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)


def _global_sequence(log_dir: Path, world_size: int) -> dict[int, list[int]]:
    """Each logged step's windows (their first tokens) in global position order, from the ranks' logs."""
    logs = [[json.loads(line) for line in (log_dir / f"rank-{rank}-of-{world_size}.jsonl").read_text().splitlines()]
            for rank in range(world_size)]
    steps: dict[int, list[int]] = {}
    for records in zip(*logs):
        step = records[0]["step"]
        assert all(record["step"] == step for record in records)
        # Rank r's row k of micro-step m is position m·B·W + r + k·W of the step.
        sequence = [0] * GLOBAL_BATCH
        for rank, record in enumerate(records):
            for index, start in enumerate(record["starts"]):
                micro_step, row = divmod(index, MICRO_BATCH)
                sequence[micro_step * MICRO_BATCH * world_size + rank + row * world_size] = start
        steps[step] = sequence
    return steps


def _killed_and_resumed(tmp_path: Path, shards: list[Path], first: int, second: int, *options: str) -> list[int]:
    """Train at world size ``first``, killed after the checkpoint of step 20, then resumed at
    ``second``; the windows of every step, in global order, as the runs trained on them."""
    run_dir = tmp_path / "run"
    killed = _train(first, run_dir, tmp_path / "first", shards, *options, "--die-after-checkpoint", "20")
    assert killed.returncode != 0 and (run_dir / "checkpoints" / "step-00000020").is_dir(), killed.stderr[-3000:]
    resumed = _train(second, run_dir, tmp_path / "second", shards, *options, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    before = _global_sequence(tmp_path / "first", first)
    after = _global_sequence(tmp_path / "second", second)
    assert min(after) == 20 and max(after) == MAX_STEPS - 1  # resumed from the checkpoint, to the end
    # Steps a rank had begun past the checkpoint when the run died were never committed.
    trained = {**{step: windows for step, windows in before.items() if step < 20}, **after}
    assert sorted(trained) == list(range(MAX_STEPS))
    return [start for step in range(MAX_STEPS) for start in trained[step]]


@pytest.mark.slow
def test_a_run_killed_at_one_world_size_and_resumed_at_another_trains_on_the_same_epochs(tmp_path, write_shard):
    shard = write_shard(tmp_path / "count.arrow", np.arange(0, 3200, dtype=np.uint16))
    starts = _killed_and_resumed(tmp_path, [shard], 1, 4)

    windows = TokenWindows([shard], BLOCK_SIZE, 32768)
    expected = windows.window_ids(SEED, np.arange(MAX_STEPS * GLOBAL_BATCH)) * BLOCK_SIZE
    assert starts == expected.tolist()  # the sequence one uninterrupted process computes
    n = windows.num_windows
    assert len(starts) >= 2 * n
    for epoch in range(2):  # each epoch: every window once, none repeated, none skipped
        assert sorted(starts[epoch * n : (epoch + 1) * n]) == list(range(0, n * BLOCK_SIZE, BLOCK_SIZE))
    assert starts[:n] != starts[n : 2 * n]


@pytest.mark.slow
def test_a_mixture_killed_and_resumed_at_another_world_size_keeps_each_part_s_epochs(tmp_path, write_shard):
    shards = [write_shard(tmp_path / "big.arrow", np.arange(0, 1600, dtype=np.uint16)),
              write_shard(tmp_path / "small.arrow", np.arange(30000, 30800, dtype=np.uint16))]
    starts = np.array(_killed_and_resumed(tmp_path, shards, 2, 1, "--mixture"))

    parts = [TokenWindows([shard], BLOCK_SIZE, 32768) for shard in shards]
    sources = MixedWindows([(part, 0.5) for part in parts]).window_sources(SEED, np.arange(MAX_STEPS * GLOBAL_BATCH))
    first_tokens = np.array([0, 30000])[sources[:, 0]] + sources[:, 1] * BLOCK_SIZE
    assert starts.tolist() == first_tokens.tolist()
    assert abs((starts >= 30000).mean() - 0.5) < 0.02
    small = (starts[starts >= 30000] - 30000) // BLOCK_SIZE
    n = parts[1].num_windows
    assert len(small) >= 2 * n
    for epoch in range(2):  # the small part runs through its own epochs, none cut short
        assert sorted(small[epoch * n : (epoch + 1) * n].tolist()) == list(range(n))
