from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from data.loader import TokenWindows


def write_shard(path: Path, tokens: np.ndarray, batch_tokens: int = 100) -> Path:
    schema = pa.schema([("tokens", pa.from_numpy_dtype(tokens.dtype))])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for start in range(0, len(tokens), batch_tokens):
            writer.write_batch(pa.record_batch([pa.array(tokens[start : start + batch_tokens])], schema=schema))
    return path


@pytest.fixture
def counting_shards(tmp_path) -> list[Path]:
    """Two shards of consecutive integers from disjoint ranges, in record batches of 100: any
    window that skips a token or crosses into the other shard shows a jump."""
    return [
        write_shard(tmp_path / "a.arrow", np.arange(0, 1000, dtype=np.uint16)),
        write_shard(tmp_path / "b.arrow", np.arange(30000, 33000, dtype=np.uint16)),
    ]


def test_windows_are_contiguous_within_one_shard_across_record_batches(counting_shards):
    windows = TokenWindows(counting_shards, block_size=64)
    crossed_record_batch = False
    for step in range(50):
        inputs, targets = windows.sample_batch(seed=0, step=step, micro_step=0, batch_size=16)
        assert inputs.shape == targets.shape == (16, 64)
        assert inputs.dtype == targets.dtype == torch.int64
        full = torch.cat([inputs, targets[:, -1:]], dim=1)  # (B, T + 1)
        assert torch.all(full[:, 1:] - full[:, :-1] == 1)
        assert torch.equal(targets[:, :-1], inputs[:, 1:])
        crossed_record_batch |= bool(torch.any(full[:, 0] // 100 != full[:, -1] // 100))
    assert crossed_record_batch


def test_same_seed_and_step_give_the_same_batch(counting_shards):
    windows = TokenWindows(counting_shards, block_size=32)
    first = windows.sample_batch(seed=7, step=3, micro_step=1, batch_size=8)
    again = TokenWindows(counting_shards, block_size=32).sample_batch(seed=7, step=3, micro_step=1, batch_size=8)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    for other in (
        dict(seed=8, step=3, micro_step=1),
        dict(seed=7, step=4, micro_step=1),
        dict(seed=7, step=3, micro_step=0),
        dict(seed=7, step=3, micro_step=1, rank=1),
    ):
        assert not torch.equal(windows.sample_batch(batch_size=8, **other)[0], first[0]), other


def test_window_starts_are_weighted_by_shard_length(counting_shards):
    windows = TokenWindows(counting_shards, block_size=100)
    starts = torch.cat([windows.sample_batch(0, step, 0, 64)[0][:, 0] for step in range(100)])
    share_of_long_shard = (starts >= 30000).float().mean().item()
    expected = (3000 - 100) / ((1000 - 100) + (3000 - 100))
    assert abs(share_of_long_shard - expected) < 0.03


def test_sequential_batches_cover_each_shard_once_in_order(counting_shards):
    windows = TokenWindows(counting_shards, block_size=64)
    batches = list(windows.sequential_batches(batch_size=5, max_tokens=10**9))
    inputs = torch.cat([x for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    expected_windows = (1000 - 1) // 64 + (3000 - 1) // 64
    assert inputs.shape == (expected_windows, 64)
    assert all(len(x) == 5 for x, _ in batches[:-1])
    assert torch.equal(targets[:, :-1], inputs[:, 1:])
    # Targets never overlap, so each token is scored at most once.
    assert len(torch.unique(targets)) == targets.numel()
    starts = inputs[:, 0].tolist()
    assert starts == sorted(starts) and starts[0] == 0 and 30000 in starts
    again = torch.cat([x for x, _ in windows.sequential_batches(batch_size=5, max_tokens=10**9)])
    assert torch.equal(inputs, again)


def test_sequential_batches_stop_at_max_tokens(counting_shards):
    windows = TokenWindows(counting_shards, block_size=64)
    batches = list(windows.sequential_batches(batch_size=4, max_tokens=640))
    assert sum(len(x) for x, _ in batches) == 10
    assert [len(x) for x, _ in batches] == [4, 4, 2]


def test_uint32_shards_load(tmp_path):
    tokens = np.arange(70000, 70500, dtype=np.uint32)
    windows = TokenWindows([write_shard(tmp_path / "big-vocab.arrow", tokens)], block_size=16)
    inputs, _ = windows.sample_batch(0, 0, 0, 4)
    assert inputs.min() >= 70000


def test_too_short_shards_name_the_files_and_the_fix(tmp_path):
    short = [write_shard(tmp_path / f"short-{i}.arrow", np.arange(50, dtype=np.uint16)) for i in range(2)]
    with pytest.raises(ValueError) as error:
        TokenWindows(short, block_size=64)
    message = str(error.value)
    assert "short-0.arrow" in message and "short-1.arrow" in message
    assert "block_size" in message and "65" in message


def test_short_shards_are_skipped_when_others_are_long_enough(tmp_path, counting_shards):
    short = write_shard(tmp_path / "short.arrow", np.arange(20000, 20010, dtype=np.uint16))
    windows = TokenWindows([short, *counting_shards], block_size=64)
    assert windows.short_shards == [short]
    assert windows.num_tokens == 4000
    samples = torch.cat([windows.sample_batch(0, step, 0, 32)[0] for step in range(20)])
    assert not torch.any((samples >= 20000) & (samples < 20010))


def test_a_shard_without_a_tokens_column_is_rejected(tmp_path):
    path = tmp_path / "text.arrow"
    schema = pa.schema([("text", pa.string())])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(pa.record_batch([pa.array(["hello"])], schema=schema))
    with pytest.raises(ValueError, match="'tokens' column"):
        TokenWindows([path], block_size=4)
