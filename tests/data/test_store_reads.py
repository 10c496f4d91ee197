"""Reading a store directory without copying it (a real moto server on 127.0.0.1): a commit checked
with nothing fetched, one file read alone and checked against its commit, a directory fetched
whole only by whoever reads it, and an object altered in the bucket refused by its reader, its
commit withdrawn so that the next check computes it again."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import s3fs

from gptflow.data.commits import CONTENTS_FILE, CorruptArtifactError, atomic_directory
from gptflow.data.mirror import ObjectStoreMirror
from gptflow.data.store import LOCAL_STORE, ArtifactStore

UNIT = "store/tokens/unit-1"


def _machine(tmp_path: Path, name: str, url: str) -> ArtifactStore:
    return ArtifactStore(ObjectStoreMirror.attach(tmp_path / name, url))


@pytest.fixture
def published(s3_bucket, tmp_path) -> tuple[str, ArtifactStore]:
    """A unit of two files committed to the workspace at ``s3_bucket`` by a machine ``writer``."""
    writer = _machine(tmp_path, "writer", s3_bucket)
    with writer.commit(tmp_path / "writer" / UNIT) as tmp:
        (tmp / "unit.json").write_text('{"n_tokens": 7}')
        (tmp / "train.arrow").write_bytes(bytes(range(256)) * 64)
    writer.wait_for_uploads()
    return s3_bucket, writer


def test_a_commit_is_checked_and_one_file_read_with_nothing_else_fetched(published, tmp_path):
    url, _ = published
    reader = _machine(tmp_path, "reader", url)
    unit = tmp_path / "reader" / UNIT
    assert reader.are_committed([unit, unit.with_name("unit-2")]) == [True, False]
    assert reader.read_files([unit / "unit.json", unit / "missing.json"]) == [b'{"n_tokens": 7}', None]
    assert not unit.exists(), "neither check nor read copies the directory"
    assert reader.read_files([unit.with_name("unit-2") / "unit.json"]) == [None]


def test_a_reader_fetches_the_whole_directory_it_reads_and_names_one_the_store_lacks(published, tmp_path):
    url, _ = published
    reader = _machine(tmp_path, "reader", url)
    unit = tmp_path / "reader" / UNIT
    reader.fetch_whole([unit], "tokenize")
    assert (unit / "train.arrow").read_bytes() == bytes(range(256)) * 64
    with pytest.raises(CorruptArtifactError, match=r"unit-2, which tokenize reads, is not in the store whole"):
        reader.fetch_whole([unit, unit.with_name("unit-2")], "tokenize")


def test_an_altered_object_is_refused_by_its_reader_and_its_commit_withdrawn(published, tmp_path, caplog):
    url, writer = published
    filesystem = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    remote = writer.mirror.remote(tmp_path / "writer" / UNIT / "unit.json")
    filesystem.pipe_file(remote, b'{"n_tokens": 8}')  # same size, other bytes
    caplog.set_level(logging.WARNING, logger="gptflow.data")

    reader = _machine(tmp_path, "reader", url)
    unit = tmp_path / "reader" / UNIT
    assert reader.read_files([unit / "unit.json"]) == [None]
    assert f"{url}/{UNIT}/unit.json in the object store does not hash to its commit" in caplog.text
    assert not _machine(tmp_path, "third", url).is_committed(tmp_path / "third" / UNIT), "the commit was withdrawn"

    # The writer's copy is whole: its next check publishes it again rather than computing it.
    assert writer.is_committed(tmp_path / "writer" / UNIT)
    writer.wait_for_uploads()
    assert reader.read_files([unit / "unit.json"]) == [b'{"n_tokens": 7}']


def test_a_commit_published_anew_since_the_read_is_kept(published, tmp_path):
    url, writer = published
    directory = tmp_path / "writer" / UNIT
    old_listing = writer.mirror.committed_listing(directory)
    with writer.replace(directory) as tmp:
        (tmp / "unit.json").write_text('{"n_tokens": 9}')
    writer.wait_for_uploads()
    writer.mirror.withdraw_commit(directory, old_listing)
    assert writer.mirror.committed_listing(directory) not in (None, old_listing)
    assert _machine(tmp_path, "reader", url).read_files([tmp_path / "reader" / UNIT / "unit.json"]) == [
        b'{"n_tokens": 9}']


def test_a_local_store_reads_only_files_of_committed_directories(tmp_path):
    with atomic_directory(tmp_path / "unit") as tmp:
        (tmp / "unit.json").write_text("{}")
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "unit.json").write_text("{}")
    assert LOCAL_STORE.read_files([tmp_path / "unit" / "unit.json", tmp_path / "unit" / CONTENTS_FILE,
                                   tmp_path / "loose" / "unit.json"]) == [b"{}", None, None]
    assert LOCAL_STORE.are_committed([tmp_path / "unit", tmp_path / "loose"]) == [True, False]
