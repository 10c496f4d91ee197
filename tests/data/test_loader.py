from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from gptflow.data.loader import MixedWindows, TokenWindows, prefetch_batches

VOCAB_SIZE = 1 << 16


@pytest.fixture
def counting_shards(tmp_path, write_shard) -> list[Path]:
    """Two shards that continue one count, in record batches of 100: any window that skips or
    repeats a token shows a jump."""
    return [
        write_shard(tmp_path / "a.arrow", np.arange(0, 1000, dtype=np.uint16)),
        write_shard(tmp_path / "b.arrow", np.arange(1000, 4000, dtype=np.uint16)),
    ]


def test_windows_are_contiguous_across_record_batches_and_shards(counting_shards):
    windows = TokenWindows(counting_shards, block_size=64, vocab_size=VOCAB_SIZE)
    crossed_record_batch = crossed_shard = False
    for step in range(100):
        inputs, targets = windows.sample_batch(seed=0, step=step, micro_step=0, batch_size=16)
        assert inputs.shape == targets.shape == (16, 64)
        assert inputs.dtype == targets.dtype == torch.int64
        full = torch.cat([inputs, targets[:, -1:]], dim=1)  # (B, T + 1)
        assert torch.all(full[:, 1:] - full[:, :-1] == 1)
        assert torch.equal(targets[:, :-1], inputs[:, 1:])
        crossed_record_batch |= bool(torch.any(full[:, 0] // 100 != full[:, -1] // 100))
        crossed_shard |= bool(torch.any((full[:, 0] < 1000) & (full[:, -1] >= 1000)))
    assert crossed_record_batch and crossed_shard


def test_same_seed_and_step_give_the_same_batch(counting_shards):
    windows = TokenWindows(counting_shards, block_size=32, vocab_size=VOCAB_SIZE)
    first = windows.sample_batch(seed=7, step=3, micro_step=1, batch_size=8)
    again = TokenWindows(counting_shards, block_size=32, vocab_size=VOCAB_SIZE).sample_batch(
        seed=7, step=3, micro_step=1, batch_size=8)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    for other in (
        dict(seed=8, step=3, micro_step=1),
        dict(seed=7, step=4, micro_step=1),
        dict(seed=7, step=3, micro_step=0),
        dict(seed=7, step=3, micro_step=1, rank=1, world_size=2),
    ):
        assert not torch.equal(windows.sample_batch(batch_size=8, **other)[0], first[0]), other


def test_window_starts_are_uniform_over_the_stream(counting_shards):
    windows = TokenWindows(counting_shards, block_size=100, vocab_size=VOCAB_SIZE)
    starts = torch.cat([windows.sample_batch(0, step, 0, 64)[0][:, 0] for step in range(100)])
    share_in_first_shard = (starts < 1000).float().mean().item()
    assert abs(share_in_first_shard - 1000 / 3900) < 0.03
    assert starts.max().item() <= 4000 - 101


def test_evaluation_batches_with_room_for_the_whole_stream_tile_it_once_in_order(counting_shards):
    windows = TokenWindows(counting_shards, block_size=64, vocab_size=VOCAB_SIZE)
    batches = list(windows.evaluation_batches(batch_size=5, max_tokens=10**9))
    inputs = torch.cat([x for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    assert inputs.shape == ((4000 - 1) // 64, 64)
    assert all(len(x) == 5 for x, _ in batches[:-1])
    assert torch.equal(targets[:, :-1], inputs[:, 1:])
    # Targets never overlap, so each token is scored at most once; together they tile the stream.
    assert torch.equal(targets.flatten(), torch.arange(1, 1 + targets.numel()))


def test_evaluation_batches_stop_at_max_tokens(counting_shards):
    windows = TokenWindows(counting_shards, block_size=64, vocab_size=VOCAB_SIZE)
    batches = list(windows.evaluation_batches(batch_size=4, max_tokens=640))
    assert [len(x) for x, _ in batches] == [4, 4, 2]


def test_evaluation_windows_are_spread_over_the_whole_stream(counting_shards):
    windows = TokenWindows(counting_shards, block_size=64, vocab_size=VOCAB_SIZE)
    inputs = torch.cat([x for x, _ in windows.evaluation_batches(batch_size=4, max_tokens=640)])
    starts = inputs[:, 0]  # a counting stream: a window's first token is its position
    # One window in each tenth of the stream, both shards included, not the first ten windows.
    assert np.histogram(starts.numpy(), bins=10, range=(0, 4000))[0].tolist() == [1] * 10
    # Windows of the whole-stream tiling, so none overlaps another, in stream order.
    assert torch.all(starts % 64 == 0) and torch.all(starts.diff() >= 64)
    assert torch.all(inputs[:, 1:] - inputs[:, :-1] == 1)
    # A pure function of the shards and the budget.
    again = TokenWindows(counting_shards, block_size=64, vocab_size=VOCAB_SIZE)
    assert torch.equal(torch.cat([x for x, _ in again.evaluation_batches(batch_size=3, max_tokens=640)]), inputs)


def test_uint32_shards_load(tmp_path, write_shard):
    tokens = np.arange(70000, 70500, dtype=np.uint32)
    windows = TokenWindows([write_shard(tmp_path / "big-vocab.arrow", tokens)], block_size=16, vocab_size=100_000)
    inputs, _ = windows.sample_batch(0, 0, 0, 4)
    assert inputs.min() >= 70000


def test_too_little_text_names_a_file_and_the_fix(tmp_path, write_shard):
    short = [write_shard(tmp_path / f"short-{i}.arrow", np.arange(30, dtype=np.uint16)) for i in range(2)]
    with pytest.raises(ValueError) as error:
        TokenWindows(short, block_size=64, vocab_size=VOCAB_SIZE)
    message = str(error.value)
    assert "short-0.arrow" in message and "60 tokens" in message
    assert "block_size" in message and "65" in message


def test_shards_shorter_than_a_window_still_contribute_every_token(tmp_path, write_shard):
    tiny_files = [
        write_shard(tmp_path / f"tiny-{i}.arrow", np.arange(10 * i, 10 * i + 10, dtype=np.uint16)) for i in range(20)
    ]
    windows = TokenWindows(tiny_files, block_size=64, vocab_size=VOCAB_SIZE)
    assert windows.num_tokens == 200
    seen = torch.cat([torch.cat([x, y[:, -1:]], dim=1).flatten() for x, y in
                      (windows.sample_batch(0, step, 0, 8) for step in range(50))])
    assert set(seen.tolist()) == set(range(200))


def test_a_shard_without_a_tokens_column_is_rejected(tmp_path):
    path = tmp_path / "text.arrow"
    schema = pa.schema([("text", pa.string())])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(pa.record_batch([pa.array(["hello"])], schema=schema))
    with pytest.raises(ValueError, match="'tokens' column"):
        TokenWindows([path], block_size=4, vocab_size=VOCAB_SIZE)


def test_mixed_windows_draw_each_part_at_its_share_deterministically(counting_shards, tmp_path, write_shard):
    old = TokenWindows(counting_shards, block_size=32, vocab_size=VOCAB_SIZE)
    new = TokenWindows([write_shard(tmp_path / "new.arrow", np.arange(50000, 51000, dtype=np.uint16))], 32, VOCAB_SIZE)
    mixed = MixedWindows([(old, 0.75), (new, 0.25)])
    starts = torch.cat([mixed.sample_batch(3, step, 0, 64)[0][:, 0] for step in range(50)])
    assert abs((starts >= 50000).float().mean().item() - 0.25) < 0.03
    first = mixed.sample_batch(3, 7, 1, 16)[0]
    assert torch.equal(first, MixedWindows([(old, 0.75), (new, 0.25)]).sample_batch(3, 7, 1, 16)[0])
    only_new = MixedWindows([(old, 0.0), (new, 1.0)]).sample_batch(0, 0, 0, 32)[0]
    assert bool(torch.all(only_new >= 50000))


def test_ranks_take_slices_of_one_global_batch(counting_shards, tmp_path, write_shard):
    whole = TokenWindows(counting_shards, block_size=32, vocab_size=VOCAB_SIZE).sample_batch(5, 2, 1, batch_size=8)[0]
    ranks = [TokenWindows(counting_shards, 32, VOCAB_SIZE).sample_batch(5, 2, 1, batch_size=4, rank=r, world_size=2)[0]
             for r in range(2)]
    assert torch.equal(torch.cat(ranks), whole)
    new = TokenWindows([write_shard(tmp_path / "new.arrow", np.arange(50000, 51000, dtype=np.uint16))], 32, VOCAB_SIZE)
    mixed = MixedWindows([(TokenWindows(counting_shards, 32, VOCAB_SIZE), 0.5), (new, 0.5)])
    whole = mixed.sample_batch(5, 2, 1, batch_size=8)[0]
    ranks = [mixed.sample_batch(5, 2, 1, batch_size=4, rank=r, world_size=2)[0] for r in range(2)]
    assert torch.equal(torch.cat(ranks), whole)


def test_prefetched_batches_are_the_sampled_batches_in_order(counting_shards):
    windows = TokenWindows(counting_shards, block_size=16, vocab_size=VOCAB_SIZE)
    prefetched = list(prefetch_batches(windows, 3, range(2, 6), accum_steps=3, batch_size=4, rank=1, world_size=2))
    expected = [windows.sample_batch(3, step, micro, 4, rank=1, world_size=2) for step in range(2, 6) for micro in range(3)]
    assert len(prefetched) == len(expected) == 12
    for (x, y), (ex, ey) in zip(prefetched, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)
