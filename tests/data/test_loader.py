from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from gptflow.data.loader import MIX_BLOCK, MixedWindows, TokenWindows, prefetch_batches, rank_positions

VOCAB_SIZE = 1 << 16


@pytest.fixture
def counting_shards(tmp_path, write_shard) -> list[Path]:
    """Two shards that continue one count, in record batches of 100: any window that skips or
    repeats a token shows a jump."""
    return [
        write_shard(tmp_path / "a.arrow", np.arange(0, 1000, dtype=np.uint16)),
        write_shard(tmp_path / "b.arrow", np.arange(1000, 4000, dtype=np.uint16)),
    ]


def _starts(windows, seed, positions) -> np.ndarray:
    """The first token of each window at ``positions``: in a counting stream, its place in the stream."""
    return windows.batch(seed, np.asarray(positions))[0][:, 0].numpy()


def test_windows_are_contiguous_across_record_batches_and_shards(counting_shards):
    windows = TokenWindows(counting_shards, block_size=64, vocab_size=VOCAB_SIZE)
    inputs, targets = windows.batch(seed=0, positions=np.arange(windows.num_windows))
    assert inputs.shape == targets.shape == (windows.num_windows, 64) == ((4000 - 1) // 64, 64)
    assert inputs.dtype == targets.dtype == torch.int64
    full = torch.cat([inputs, targets[:, -1:]], dim=1)  # (B, T + 1)
    assert torch.all(full[:, 1:] - full[:, :-1] == 1)
    assert torch.equal(targets[:, :-1], inputs[:, 1:])
    assert bool(torch.any(full[:, 0] // 100 != full[:, -1] // 100))  # across a record batch
    assert bool(torch.any((full[:, 0] < 1000) & (full[:, -1] >= 1000)))  # across the shards


def test_each_epoch_visits_every_window_once_in_a_new_order(counting_shards):
    windows = TokenWindows(counting_shards, block_size=16, vocab_size=VOCAB_SIZE, piece_tokens=64, buffer_pieces=3)
    n = windows.num_windows
    starts = _starts(windows, 5, np.arange(3 * n))
    epochs = starts.reshape(3, n)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(0, n * 16, 16))  # the tiling, each window once
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    # Every target token but the stream's first is scored exactly once an epoch.
    targets = windows.batch(5, np.arange(n))[1].flatten()
    assert sorted(targets.tolist()) == list(range(1, n * 16 + 1))


def test_the_order_is_a_pure_function_of_seed_and_position(counting_shards):
    windows = TokenWindows(counting_shards, block_size=32, vocab_size=VOCAB_SIZE, piece_tokens=128)
    whole = _starts(windows, 7, np.arange(500))
    again = TokenWindows(counting_shards, block_size=32, vocab_size=VOCAB_SIZE, piece_tokens=128)
    scattered = np.random.default_rng(0).permutation(500)
    assert np.array_equal(_starts(again, 7, scattered), whole[scattered])
    assert not np.array_equal(_starts(windows, 8, np.arange(500)), whole)


def test_the_shuffle_is_bounded_by_pieces_and_buffers(counting_shards):
    # Pieces of 4 windows, buffers of 3 pieces: each run of 12 positions holds 3 whole pieces.
    windows = TokenWindows(counting_shards, block_size=16, vocab_size=VOCAB_SIZE, piece_tokens=64, buffer_pieces=3)
    ids = _starts(windows, 1, np.arange(48)) // 16
    for buffer in ids.reshape(4, 12):
        pieces = np.unique(buffer // 4)
        assert len(pieces) == 3 and sorted(buffer.tolist()) == sorted(
            window for piece in pieces for window in range(piece * 4, piece * 4 + 4))
    assert not np.array_equal(ids, np.sort(ids))  # shuffled within buffers


def test_ranks_take_interleaved_slices_of_one_global_sequence(counting_shards):
    windows = TokenWindows(counting_shards, block_size=16, vocab_size=VOCAB_SIZE, piece_tokens=64)
    whole = _starts(windows, 3, rank_positions(40, micro_batch_size=8, rank=0, world_size=1))
    for world_size in (2, 4):
        per_rank = [_starts(windows, 3, rank_positions(40, 8 // world_size, rank, world_size))
                    for rank in range(world_size)]
        interleaved = np.stack(per_rank, axis=1).flatten()  # row k of rank r is position 40 + r + k·W
        assert np.array_equal(interleaved, whole)


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
    inputs, _ = windows.batch(0, np.arange(4))
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
    windows = TokenWindows(tiny_files, block_size=9, vocab_size=VOCAB_SIZE)
    assert windows.num_tokens == 200 and windows.num_windows == 22
    inputs, targets = windows.batch(0, np.arange(windows.num_windows))
    assert set(torch.cat([inputs, targets], dim=1).flatten().tolist()) == set(range(199))


def test_an_empty_shard_between_two_is_passed_over(tmp_path, write_shard):
    shards = [write_shard(tmp_path / "a.arrow", np.arange(0, 100, dtype=np.uint16)),
              write_shard(tmp_path / "empty.arrow", np.arange(0, dtype=np.uint16)),
              write_shard(tmp_path / "b.arrow", np.arange(100, 200, dtype=np.uint16))]
    windows = TokenWindows(shards, block_size=9, vocab_size=VOCAB_SIZE)
    inputs, targets = windows.batch(0, np.arange(windows.num_windows))
    full = torch.cat([inputs, targets[:, -1:]], dim=1)
    assert windows.num_windows == 22 and torch.all(full[:, 1:] - full[:, :-1] == 1)


def test_a_shard_without_a_tokens_column_is_rejected(tmp_path):
    path = tmp_path / "text.arrow"
    schema = pa.schema([("text", pa.string())])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_batch(pa.record_batch([pa.array(["hello"])], schema=schema))
    with pytest.raises(ValueError, match="'tokens' column"):
        TokenWindows([path], block_size=4, vocab_size=VOCAB_SIZE)


def test_mixed_windows_deal_each_part_its_share_and_run_each_through_its_epochs(counting_shards, tmp_path,
                                                                                 write_shard):
    old = TokenWindows(counting_shards, block_size=32, vocab_size=VOCAB_SIZE, piece_tokens=256)
    new = TokenWindows([write_shard(tmp_path / "new.arrow", np.arange(50000, 51000, dtype=np.uint16))], 32, VOCAB_SIZE)
    mixed = MixedWindows([(old, 0.75), (new, 0.25)])
    sources = mixed.window_sources(3, np.arange(3 * MIX_BLOCK))
    parts = sources[:, 0]
    for block in parts.reshape(3, MIX_BLOCK):  # the weights hold in every block, to one window
        assert abs((block == 1).sum() - MIX_BLOCK / 4) <= 1
    for part, windows in enumerate((old, new)):  # each part: whole epochs of its own, none repeated within
        ids = sources[parts == part, 1]
        for epoch in range(len(ids) // windows.num_windows):
            assert sorted(ids[epoch * windows.num_windows : (epoch + 1) * windows.num_windows]) == list(
                range(windows.num_windows))
    # Read at any position, alone, a window is the one the whole sequence puts there.
    starts = mixed.batch(3, np.arange(3 * MIX_BLOCK))[0][:, 0]
    assert bool(torch.all((starts >= 50000) == torch.from_numpy(parts == 1)))
    assert torch.equal(MixedWindows([(old, 0.75), (new, 0.25)]).batch(3, np.array([5000, 17, 9000]))[0][:, 0],
                       starts[[5000, 17, 9000]])
    only_new = MixedWindows([(old, 0.0), (new, 1.0)]).batch(0, np.arange(32))[0]
    assert bool(torch.all(only_new >= 50000))


def test_prefetched_batches_are_the_batches_of_the_positions_in_order(counting_shards):
    windows = TokenWindows(counting_shards, block_size=16, vocab_size=VOCAB_SIZE)
    positions = [rank_positions(first, 4, rank=1, world_size=2) for first in range(0, 96, 8)]
    prefetched = list(prefetch_batches(windows, 3, iter(positions)))
    assert len(prefetched) == 12
    for (x, y), batch_positions in zip(prefetched, positions):
        expected_x, expected_y = windows.batch(3, batch_positions)
        assert torch.equal(x, expected_x) and torch.equal(y, expected_y)
