"""Token shards streamed from a workspace on a real S3 server (moto's), within a disk cap."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import s3fs

from gptflow.data.commits import CONTENTS_FILE, CorruptArtifactError
from gptflow.data.loader import TokenWindows, rank_positions
from gptflow.data.mirror import ObjectStoreMirror
from gptflow.data.store import ArtifactStore
from gptflow.data.streaming import ShardCache
from gptflow.model.config import ModelConfig, TrainConfig
from gptflow.model.pretraining import run_pretraining

SHARDS, SHARD_TOKENS, BLOCK_SIZE = 100, 600, 16
SMALL = {"piece_tokens": 512, "buffer_pieces": 2}
"""Buffers of two pieces of 32 windows: each reads at most four shards, so two fit in a tenth of the corpus."""


def _tree_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder``, commits and partial fetches included."""
    total = 0
    for parent, _, files in os.walk(folder):  # passes over folders evicted meanwhile, as rglob does not
        for file in files:
            with contextlib.suppress(FileNotFoundError):
                total += (Path(parent) / file).stat().st_size
    return total


@pytest.fixture
def published_shards(s3_bucket, tmp_path, write_shard) -> tuple[str, list[str]]:
    """A counting token stream of ``SHARDS`` shards committed to the workspace at ``s3_bucket`` by
    another machine: its URL, and each shard's path inside the workspace."""
    writer = ArtifactStore(ObjectStoreMirror.attach(tmp_path / "writer", s3_bucket))
    names = [f"store/tokens/{index:03d}/train.arrow" for index in range(SHARDS)]
    for index, name in enumerate(names):
        tokens = np.arange(index * SHARD_TOKENS, (index + 1) * SHARD_TOKENS, dtype=np.uint16)
        with writer.commit(tmp_path / "writer" / Path(name).parent) as directory:
            write_shard(directory / "train.arrow", tokens)
    writer.wait_for_uploads()
    return s3_bucket, names


def _streamed_windows(root: Path, url: str, names: list[str], cap_bytes: int, caches: list[ShardCache]) -> TokenWindows:
    cache = ShardCache(ArtifactStore(ObjectStoreMirror.attach(root, url)), cap_bytes)
    caches.append(cache)
    return TokenWindows([root / name for name in names], BLOCK_SIZE, 1 << 16, num_tokens=[SHARD_TOKENS] * SHARDS,
                        cache=cache, **SMALL)


def test_a_cache_of_a_tenth_of_the_corpus_reads_every_window_of_two_epochs_and_stays_under_its_cap(
        published_shards, tmp_path, caches):
    url, names = published_shards
    corpus_bytes = _tree_bytes(tmp_path / "writer" / "store")
    cap = corpus_bytes // 10
    windows = _streamed_windows(tmp_path / "reader", url, names, cap, caches)
    assert not (tmp_path / "reader" / "store").exists()  # opening the split fetched nothing

    starts, largest = [], 0
    for first in range(0, 2 * windows.num_windows, 64):
        inputs, targets = windows.batch(3, np.arange(first, min(first + 64, 2 * windows.num_windows)))
        assert np.array_equal(inputs[:, 1:].numpy(), targets[:, :-1].numpy())
        starts.extend(inputs[:, 0].tolist())
        largest = max(largest, _tree_bytes(tmp_path / "reader" / "store"))

    tiling = list(range(0, windows.num_windows * BLOCK_SIZE, BLOCK_SIZE))
    epochs = np.reshape(starts, (2, windows.num_windows))
    assert sorted(epochs[0].tolist()) == sorted(epochs[1].tolist()) == tiling
    assert 0 < largest <= cap
    assert windows.cache.fetched_bytes >= corpus_bytes - SHARDS * 300  # each shard at least once, commits aside


def test_two_ranks_sharing_one_cache_read_their_slices_of_the_order(published_shards, tmp_path, caches):
    url, names = published_shards
    cap = _tree_bytes(tmp_path / "writer" / "store") // 10
    ranks = [_streamed_windows(tmp_path / "one-machine", url, names, cap, caches) for _ in range(2)]
    alone = TokenWindows([tmp_path / "writer" / name for name in names], BLOCK_SIZE, 1 << 16, **SMALL)
    for first in range(0, alone.num_windows, 2 * 32):
        for rank, windows in enumerate(ranks):
            positions = rank_positions(first, 32, rank, 2)
            assert np.array_equal(windows.batch(9, positions)[0].numpy(), alone.batch(9, positions)[0].numpy())
        assert _tree_bytes(tmp_path / "one-machine" / "store") <= cap


def test_a_cap_below_two_buffers_of_shards_is_named_once_and_training_reads_on(published_shards, tmp_path, caplog,
                                                                                caches):
    url, names = published_shards
    windows = _streamed_windows(tmp_path / "reader", url, names, 1, caches)
    caplog.set_level(logging.WARNING, logger="gptflow.data")
    for first in range(0, 256, 64):
        windows.batch(0, np.arange(first, first + 64))
    windows.cache.close()
    [warning] = [record.getMessage() for record in caplog.records if "GPTFLOW_CACHE_GB" in record.getMessage()]
    assert "more than the cache's cap" in warning


def test_a_shard_altered_in_the_bucket_is_refused_by_name_and_never_read(published_shards, tmp_path, caplog, caches):
    url, names = published_shards
    altered = names[7]
    filesystem = s3fs.S3FileSystem(skip_instance_cache=True)
    original = filesystem.cat_file(f"{url}/{altered}")
    filesystem.pipe_file(f"{url}/{altered}", original[:-8] + b"\x00" * 8)
    windows = _streamed_windows(tmp_path / "reader", url, names, 1 << 30, caches)

    with pytest.raises(CorruptArtifactError, match=r"tokens/007 could not be fetched whole from the object store"):
        windows.batch(0, np.arange(windows.num_windows))
    assert f"{altered.removeprefix('store/')}" in caplog.text or altered in caplog.text
    directory = tmp_path / "reader" / Path(altered).parent
    assert not (directory / CONTENTS_FILE).exists()
    assert not list(directory.parent.glob(".tmp-*"))  # nothing half-fetched is left to be taken for whole


def test_pretraining_on_an_object_store_workspace_streams_its_shards_and_validates_from_them(
        s3_bucket, tmp_path, write_shard, caches):
    writer = ArtifactStore(ObjectStoreMirror.attach(tmp_path / "writer", s3_bucket))
    rng, counts = np.random.default_rng(0), {}
    for index in range(6):
        with writer.commit(tmp_path / "writer" / "store" / "tokens" / f"{index}") as directory:
            for split, length in (("train", 2000), ("val", 300)):
                write_shard(directory / f"{split}.arrow", rng.integers(0, 64, length, dtype=np.uint16))
                counts[Path("store/tokens") / f"{index}" / f"{split}.arrow"] = length
    writer.wait_for_uploads()

    root = tmp_path / "another-machine"
    reader = ArtifactStore(ObjectStoreMirror.attach(root, s3_bucket))
    cache = ShardCache(reader, 1 << 30)
    caches.append(cache)
    shard_tokens = {root / name: count for name, count in counts.items()}
    train = sorted(path for path in shard_tokens if path.name == "train.arrow")
    val = sorted(path for path in shard_tokens if path.name == "val.arrow")
    config = TrainConfig(max_steps=6, micro_batch_size=4, warmup_steps=1, log_interval=3, val_interval=3,
                         val_tokens=256, checkpoint_interval=3, device="cpu")
    result = run_pretraining(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=64), config,
                             train, val, root / "store" / "runs" / "streamed", artifacts=reader, verify_shards=True,
                             shard_tokens=shard_tokens, shard_cache=cache)
    reader.wait_for_uploads()  # the checkpoints, before the bucket goes

    assert result.steps == 6 and result.final_val_loss is not None
    assert 0 < cache.fetched_bytes and all((path.parent / CONTENTS_FILE).exists() for path in train)
