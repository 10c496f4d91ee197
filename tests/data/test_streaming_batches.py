"""Token shards streamed by their record batches from a workspace on a real S3 server (moto's):
each rank fetches the byte ranges it reads, checked against the shard's batch index."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import s3fs

from gptflow.data.commits import CorruptArtifactError
from gptflow.data.loader import TokenWindows, rank_positions
from gptflow.data.mirror import RANGES_DIR, ObjectStoreMirror
from gptflow.data.shards import TokenShardWriter
from gptflow.data.store import ArtifactStore
from gptflow.data.streaming import ShardCache
from gptflow.data.token_shards import BatchIndex, IndexedShardWriter

SHARDS, SHARD_TOKENS, BATCH_TOKENS, BLOCK_SIZE = 10, 1 << 16, 512, 16
SMALL = {"piece_tokens": 8192, "buffer_pieces": 2}
"""Pieces of 16 record batches, an eighth of a shard; two buffers of two pieces fit in a tenth of the corpus."""


def _tree_bytes(folder: Path) -> int:
    total = 0
    for parent, _, files in os.walk(folder):  # passes over folders evicted meanwhile, as rglob does not
        for file in files:
            with contextlib.suppress(FileNotFoundError):
                total += (Path(parent) / file).stat().st_size
    return total


def _shard_bytes(folder: Path) -> int:
    """Bytes of the token shards under ``folder``: the corpus that training streams."""
    return sum(path.stat().st_size for path in folder.rglob("*.arrow"))


def _local_bytes(root: Path) -> int:
    """What a reader's copy of the workspace holds: whole directories and fetched batches."""
    return _tree_bytes(root / "store") + _tree_bytes(root / RANGES_DIR)


@pytest.fixture
def published_shards(s3_bucket, tmp_path) -> tuple[str, list[str]]:
    """A counting token stream of ``SHARDS`` shards written as the tokenize stage writes them (with
    their batch indexes), committed to the workspace at ``s3_bucket`` by another machine."""
    writer = ArtifactStore(ObjectStoreMirror.attach(tmp_path / "writer", s3_bucket))
    names = [f"store/tokens/{index:03d}/train.arrow" for index in range(SHARDS)]
    for index, name in enumerate(names):
        with writer.commit(tmp_path / "writer" / Path(name).parent) as directory:
            shard = IndexedShardWriter(directory / "train.arrow", np.dtype(np.uint32), tokens_per_batch=BATCH_TOKENS)
            shard.write(np.arange(index * SHARD_TOKENS, (index + 1) * SHARD_TOKENS, dtype=np.uint32))
            shard.close()
    writer.wait_for_uploads()
    return s3_bucket, names


def _streamed(root: Path, url: str, names: list[str], cap_bytes: int, caches: list[ShardCache]) -> TokenWindows:
    cache = ShardCache(ArtifactStore(ObjectStoreMirror.attach(root, url)), cap_bytes)
    caches.append(cache)
    return TokenWindows([root / name for name in names], BLOCK_SIZE, 1 << 20, num_tokens=[SHARD_TOKENS] * SHARDS,
                        cache=cache, **SMALL)


def test_an_epoch_over_shards_larger_than_a_piece_fetches_the_corpus_about_once_within_a_tenth(
        published_shards, tmp_path, caches):
    url, names = published_shards
    corpus_bytes = _shard_bytes(tmp_path / "writer" / "store")
    cap = corpus_bytes // 10
    windows = _streamed(tmp_path / "reader", url, names, cap, caches)

    starts, largest = [], 0
    for first in range(0, windows.num_windows, 256):
        inputs, targets = windows.batch(5, np.arange(first, min(first + 256, windows.num_windows)))
        assert np.array_equal(inputs[:, 1:].numpy(), targets[:, :-1].numpy())
        starts.extend(inputs[:, 0].tolist())
        largest = max(largest, _local_bytes(tmp_path / "reader"))

    assert sorted(starts) == list(range(0, windows.num_windows * BLOCK_SIZE, BLOCK_SIZE))  # every window once
    assert 0 < largest <= cap
    assert not (tmp_path / "reader" / "store" / "tokens").exists()  # no shard was fetched whole
    assert corpus_bytes * 0.95 <= windows.cache.fetched_bytes <= 1.2 * corpus_bytes


def test_validation_fetches_only_the_batches_of_the_windows_it_scores(published_shards, tmp_path, caches):
    url, names = published_shards
    windows = _streamed(tmp_path / "reader", url, names, 1 << 30, caches)
    batches = list(windows.evaluation_batches(batch_size=4, max_tokens=12 * BLOCK_SIZE))

    scored = [int(token) for inputs, _ in batches for token in inputs[:, 0]]
    assert len(scored) == 12
    shard_of = {token // SHARD_TOKENS for token in scored}
    kept = [path for path in (tmp_path / "reader" / RANGES_DIR).rglob("*") if path.is_file()]
    # Each scored window lies in one batch (or two, across a batch's end): nothing else was fetched.
    needed = {(token // SHARD_TOKENS, token % SHARD_TOKENS // BATCH_TOKENS) for first in scored
              for token in (first, first + BLOCK_SIZE)}
    assert {(int(path.parent.parent.name), int(path.name)) for path in kept} == needed
    assert len(shard_of) == SHARDS
    assert windows.cache.fetched_bytes < _shard_bytes(tmp_path / "writer" / "store") / 20


def test_a_record_batch_altered_in_the_bucket_is_refused_by_name_and_nothing_of_it_kept(
        published_shards, tmp_path, caplog, caches):
    url, names = published_shards
    altered = names[3]
    writer_shard = tmp_path / "writer" / altered
    index = BatchIndex.from_json(json.loads(writer_shard.with_name("train.batches.json").read_text()))
    batch = 40
    start = index.offsets[batch] + index.lengths[batch] - 16  # the batch's last tokens: same size, other bytes
    data = bytearray(writer_shard.read_bytes())
    data[start : start + 8] = b"\x00" * 8
    s3fs.S3FileSystem(skip_instance_cache=True).pipe_file(f"{url}/{altered}", bytes(data))
    windows = _streamed(tmp_path / "reader", url, names, 1 << 30, caches)
    caplog.set_level(logging.WARNING, logger="gptflow.data")

    with pytest.raises(CorruptArtifactError, match=r"tokens/003/train.arrow could not be fetched"):
        windows.read_windows(range(windows.num_windows))
    assert f"{altered} bytes {index.offsets[batch]}-{index.offsets[batch] + index.lengths[batch]}" in caplog.text
    kept = tmp_path / "reader" / RANGES_DIR / altered
    assert not (kept / f"{batch:06d}").exists()
    assert not list(kept.glob(".tmp-*"))  # nothing half-fetched is left to be taken for whole
    assert (kept / f"{batch - 1:06d}").exists()  # the batches before it were whole, and are kept
    reader = windows.cache.mirror
    assert not reader.holds(reader.local_root / Path(altered).parent, fetch=False), (
        "its commit is withdrawn: the next run's tokenize stage computes the unit again")
    assert reader.holds(reader.local_root / Path(names[4]).parent, fetch=False)


def test_a_local_copy_of_a_batch_altered_on_disk_is_fetched_again(published_shards, tmp_path, caches):
    url, names = published_shards
    windows = _streamed(tmp_path / "reader", url, names, 1 << 30, caches)
    expected = windows.read_windows([0])
    copy = tmp_path / "reader" / RANGES_DIR / names[0] / "000000"
    copy.write_bytes(copy.read_bytes()[:-8] + b"\xff" * 8)

    again = _streamed(tmp_path / "reader", url, names, 1 << 30, caches)
    assert np.array_equal(again.read_windows([0]), expected)
    index = again.cache.batch_index(tmp_path / "reader" / names[0])
    assert copy.read_bytes() == (tmp_path / "writer" / names[0]).read_bytes()[index.offsets[0] : index.offsets[1]]


def test_the_machine_that_holds_the_shards_whole_reads_them_without_fetching_a_batch(
        published_shards, tmp_path, caches):
    url, names = published_shards
    windows = _streamed(tmp_path / "writer", url, names, 1 << 30, caches)  # the machine that tokenized them
    alone = TokenWindows([tmp_path / "writer" / name for name in names], BLOCK_SIZE, 1 << 20, **SMALL)
    positions = np.arange(0, alone.num_windows, 7)
    assert np.array_equal(windows.batch(3, positions)[0].numpy(), alone.batch(3, positions)[0].numpy())
    assert not (tmp_path / "writer" / RANGES_DIR).exists()
    assert windows.cache.fetched_bytes < 20_000 * SHARDS, "the batch indexes only"

    # Batches of a shard altered on this disk behind the cache's back: each is found out as it is
    # read and fetched from the store instead; a new cache no longer takes that shard for whole.
    fresh = _streamed(tmp_path / "writer", url, names, 1 << 30, caches)
    windows_of_shard_2 = 2 * SHARD_TOKENS // BLOCK_SIZE + np.arange(0, SHARD_TOKENS // BLOCK_SIZE - 1, 50)
    fresh.read_windows(windows_of_shard_2[:1])  # its first batch, read from the shard itself
    altered = tmp_path / "writer" / names[2]
    index = BatchIndex.from_json(json.loads(altered.with_name("train.batches.json").read_text()))
    data = bytearray(altered.read_bytes())
    for batch in range(1, len(index.offsets)):  # every later batch's tokens: same size, other bytes
        middle = index.offsets[batch] + index.lengths[batch] // 2
        data[middle : middle + 8] = b"\xff" * 8
    altered.write_bytes(bytes(data))
    expected = (windows_of_shard_2[:, None] * BLOCK_SIZE + np.arange(BLOCK_SIZE + 1)).astype(np.uint32)
    assert np.array_equal(fresh.read_windows(windows_of_shard_2), expected)
    fetched = [path for path in (tmp_path / "writer" / RANGES_DIR).rglob("*") if path.is_file()]
    assert fetched and {path.parent.parent.name for path in fetched} == {Path(names[2]).parent.name}
    again = _streamed(tmp_path / "writer", url, names, 1 << 30, caches)
    assert np.array_equal(again.batch(3, positions)[0].numpy(), windows.batch(3, positions)[0].numpy())


def test_shards_of_an_earlier_tokenize_without_a_batch_index_are_fetched_whole_beside_indexed_ones(
        s3_bucket, tmp_path, caches):
    writer = ArtifactStore(ObjectStoreMirror.attach(tmp_path / "writer", s3_bucket))
    names = [f"store/tokens/{index:03d}/train.arrow" for index in range(4)]
    for index, name in enumerate(names):
        indexed = index % 2 == 1
        with writer.commit(tmp_path / "writer" / Path(name).parent) as directory:
            shard = (IndexedShardWriter(directory / "train.arrow", np.dtype(np.uint32), tokens_per_batch=BATCH_TOKENS)
                     if indexed else TokenShardWriter(directory / "train.arrow", np.dtype(np.uint32)))
            shard.write(np.arange(index * 4096, (index + 1) * 4096, dtype=np.uint32))
            shard.close()
    writer.wait_for_uploads()
    root = tmp_path / "reader"
    cache = ShardCache(ArtifactStore(ObjectStoreMirror.attach(root, s3_bucket)), 1 << 30)
    caches.append(cache)
    windows = TokenWindows([root / name for name in names], BLOCK_SIZE, 1 << 20, num_tokens=[4096] * 4, cache=cache,
                           piece_tokens=1024, buffer_pieces=2)

    inputs, _ = windows.batch(0, np.arange(windows.num_windows))
    assert sorted(inputs[:, 0].tolist()) == list(range(0, windows.num_windows * BLOCK_SIZE, BLOCK_SIZE))
    assert [(root / Path(name).parent / "contents.json").exists() for name in names] == [True, False, True, False]
    assert [(root / RANGES_DIR / name).is_dir() for name in names] == [False, True, False, True]


def test_two_ranks_sharing_one_machine_s_copy_read_their_slices_within_the_cap(published_shards, tmp_path, caches):
    url, names = published_shards
    cap = _shard_bytes(tmp_path / "writer" / "store") // 10
    ranks = [_streamed(tmp_path / "one-machine", url, names, cap, caches) for _ in range(2)]
    alone = TokenWindows([tmp_path / "writer" / name for name in names], BLOCK_SIZE, 1 << 20, **SMALL)
    for first in range(0, alone.num_windows // 4, 2 * 128):
        for rank, windows in enumerate(ranks):
            positions = rank_positions(first, 128, rank, 2)
            assert np.array_equal(windows.batch(2, positions)[0].numpy(), alone.batch(2, positions)[0].numpy())
        assert _local_bytes(tmp_path / "one-machine") <= cap
