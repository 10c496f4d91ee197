"""Artifacts altered behind an unchanged size and mtime: trusted by the cache check, refused by the
consumers that read them whole, and recomputed by the next run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from gptflow.data.commits import CONTENTS_FILE, CorruptArtifactError, atomic_directory, is_complete, verify_contents
from gptflow.data.config import TokenizeConfig
from gptflow.data.hashing import hash_file
from gptflow.data.loader import TokenWindows
from gptflow.data.shards import iter_token_arrays
from gptflow.data.store import LOCAL_STORE
from gptflow.data.tokenize import TokenManifest, tokenize_corpus


def overwrite_keeping_size_and_mtime(path: Path, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` of ``path`` and put its mtime back, as a careless tool or a
    bad disk might: ``is_complete``'s size and mtime check cannot see it."""
    stat = path.stat()
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def token_offset(path: Path, index: int) -> int:
    """Byte offset in ``path`` of the ``index``-th token of its first record batch."""
    first = next(iter_token_arrays(path))
    with open(path, "rb") as file:
        content = file.read()
    # The batch's values are one contiguous run of the file's bytes; find it by content.
    offset = content.find(first.tobytes())
    assert offset > 0
    return offset + index * first.itemsize


@pytest.fixture
def tokens(tiny_manifest, tiny_tokenizer, tmp_path) -> TokenManifest:
    return tokenize_corpus(tiny_manifest, tiny_tokenizer, TokenizeConfig(), tmp_path / "store")


@pytest.fixture
def largest_train_shard(tokens) -> Path:
    return max(tokens.paths("train"), key=lambda path: path.stat().st_size)


def test_a_shard_altered_behind_an_unchanged_size_and_mtime_is_refused_and_recomputed(
    tokens, largest_train_shard, tiny_manifest, tiny_tokenizer, tmp_path
):
    shard = largest_train_shard
    original = hash_file(shard)
    overwrite_keeping_size_and_mtime(shard, token_offset(shard, 100), b"\x05\x00\x06\x00")
    assert is_complete(shard.parent)  # the cheap check the cache decision uses is fooled

    with pytest.raises(CorruptArtifactError) as error:
        LOCAL_STORE.verify_files(tokens.paths("train"))
    message = str(error.value)
    assert str(shard) in message and "altered after it was written" in message and "next run recomputes" in message
    assert not is_complete(shard.parent)  # never trusted again

    again = tokenize_corpus(tiny_manifest, tiny_tokenizer, TokenizeConfig(), tmp_path / "store")
    assert [unit.directory for unit in again.units if not unit.reused] == [str(shard.parent)]
    assert hash_file(shard) == original
    LOCAL_STORE.verify_files(again.paths("train") + again.paths("val"))


def test_verification_names_a_missing_or_unlisted_file(tokens, largest_train_shard):
    unit = largest_train_shard.parent
    with pytest.raises(CorruptArtifactError, match="notes.txt is not listed"):
        verify_contents(unit, ["notes.txt"])
    assert not is_complete(unit)


def test_a_shard_holding_an_id_beyond_the_vocabulary_is_refused_when_read(tokens, largest_train_shard):
    shard = largest_train_shard
    # Same size, same mtime, one id past the vocabulary: before the check, training indexed past
    # the embedding (IndexError) or, within the padding rows, trained on garbage.
    overwrite_keeping_size_and_mtime(shard, token_offset(shard, 7), np.array([tokens.vocab_size], np.uint16).tobytes())
    windows = TokenWindows(tokens.paths("train"), block_size=16, vocab_size=tokens.vocab_size)  # reads no token
    first = int(windows.shard_starts[windows.paths.index(shard)])
    with pytest.raises(CorruptArtifactError) as error:
        windows.read(first, 17)
    message = str(error.value)
    assert str(shard) in message and f"token id {tokens.vocab_size}" in message
    assert f"vocabulary of {tokens.vocab_size} ids" in message
    assert not is_complete(shard.parent)


def test_a_shard_read_through_its_store_is_checked_against_its_hash_when_first_read(tokens, largest_train_shard):
    shard = largest_train_shard
    overwrite_keeping_size_and_mtime(shard, token_offset(shard, 7), np.array([3], np.uint16).tobytes())  # in range
    windows = TokenWindows(tokens.paths("train"), block_size=16, vocab_size=tokens.vocab_size, store=LOCAL_STORE)
    others = [index for index, path in enumerate(windows.paths) if path != shard]
    windows.read(int(windows.shard_starts[others[0]]), 17)  # another shard reads
    with pytest.raises(CorruptArtifactError, match=f"{shard} does not hold the bytes written there"):
        windows.read(int(windows.shard_starts[windows.paths.index(shard)]), 17)
    assert not is_complete(shard.parent)


def test_a_truncated_shard_is_refused_and_named_when_the_split_opens(tokens, largest_train_shard):
    with open(largest_train_shard, "r+b") as file:
        file.truncate(largest_train_shard.stat().st_size // 2)
    with pytest.raises(CorruptArtifactError, match=f"{largest_train_shard} is not a whole token shard"):
        TokenWindows(tokens.paths("train"), block_size=16, vocab_size=tokens.vocab_size)
    assert not is_complete(largest_train_shard.parent)


def test_the_largest_id_of_the_vocabulary_is_accepted(tmp_path, write_shard):
    ids = np.arange(0, 512, dtype=np.uint16)
    TokenWindows([write_shard(tmp_path / "all-ids.arrow", ids)], block_size=16, vocab_size=512).read(0, 512)
    with pytest.raises(CorruptArtifactError, match="token id 511"):
        TokenWindows([write_shard(tmp_path / "all-ids.arrow", ids)], block_size=16, vocab_size=511).read(0, 512)


def test_verification_rehashes_a_file_whose_mtime_did_not_move(tmp_path):
    directory = tmp_path / "artifact"
    with atomic_directory(directory) as tmp:
        (tmp / "a.txt").write_text("hello")
    verify_contents(directory)
    overwrite_keeping_size_and_mtime(directory / "a.txt", 0, b"J")
    with pytest.raises(CorruptArtifactError, match="a.txt does not hold the bytes written there"):
        verify_contents(directory)
    assert not (directory / CONTENTS_FILE).exists() and (directory / "a.txt").exists()
    with atomic_directory(directory) as tmp:  # the next commit of the key replaces it
        (tmp / "a.txt").write_text("hello")
    verify_contents(directory)
    shutil.rmtree(directory)
    with pytest.raises(CorruptArtifactError, match="not a complete store directory"):
        verify_contents(directory)
