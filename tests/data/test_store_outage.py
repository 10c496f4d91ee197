"""A workspace's object store that stops answering while a run uses it (a real moto server on
127.0.0.1, killed, paused with SIGSTOP, started again on its port): what is committed meanwhile is
kept locally and published once it answers; requests are bounded and say what they wait for; a
barrier gives up after its limit with one line naming the endpoint and what is kept; an object
altered in the bucket is named and not trusted."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import s3fs

from gptflow.data.commits import CONTENTS_FILE
from gptflow.data.mirror import ObjectStoreMirror
from gptflow.data.store import ArtifactStore
from gptflow.data.store_outage import OUTBOX_DIR, ObjectStoreAwayError

BUCKET = "gptflow-test"
URL = f"s3://{BUCKET}/team"


@pytest.fixture
def store(own_s3_server, tmp_path, monkeypatch, caplog) -> ArtifactStore:
    """The store of a workspace on the test's own S3 server, its requests giving up after 1 s."""
    monkeypatch.setenv("GPTFLOW_OBJECT_STORE_TIMEOUT_S", "1")
    caplog.set_level(logging.WARNING, logger="gptflow.data")
    return ArtifactStore(ObjectStoreMirror.attach(tmp_path / "copy", URL))


def _checkpoint(store: ArtifactStore, step: int) -> Path:
    directory = store.mirror.local_root / "store" / "runs" / "r" / "checkpoints" / f"step-{step:06d}"
    with store.commit(directory) as tmp:
        (tmp / "weights.bin").write_bytes(bytes([step]) * 1000)
    return directory


def _published(directory: Path, store: ArtifactStore) -> bool:
    filesystem = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    remote = store.mirror.remote(directory)
    return filesystem.exists(f"{remote}/{CONTENTS_FILE}") and filesystem.cat_file(f"{remote}/weights.bin") == (
        directory / "weights.bin").read_bytes()


def _outbox_once_it_lists(count: int, store: ArtifactStore) -> Path:
    """The process's outbox file (what it keeps for the store), once it lists ``count`` paths."""
    deadline = time.monotonic() + 30
    while True:
        outboxes = list(store.mirror.local_root.joinpath(OUTBOX_DIR).glob("*.json"))
        if outboxes and len(json.loads(outboxes[0].read_text())) == count:
            return outboxes[0]
        assert time.monotonic() < deadline, outboxes
        time.sleep(0.1)


def _restart_empty(server) -> None:
    """Start the server again on its port; moto kept its objects in memory, so the bucket is made again."""
    server.start()
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)


def test_commits_while_the_store_is_stopped_are_kept_locally_and_published_on_its_return(
        store, own_s3_server, caplog, monkeypatch):
    monkeypatch.setenv("GPTFLOW_OBJECT_STORE_WAIT_S", "120")
    first = _checkpoint(store, 1)
    store.wait_for_uploads()
    assert _published(first, store)
    folder = first.parent

    own_s3_server.stop()
    started = time.monotonic()
    kept = [_checkpoint(store, step) for step in (2, 3, 4)]
    assert store.list_folder(folder) == ["step-000001", "step-000002", "step-000003", "step-000004"]
    assert all(store.are_complete(kept))
    store.remove_directory(kept[0])  # pruned while away: never published
    assert time.monotonic() - started < 15, "a run goes on while the store is away: nothing waits on it"
    assert f"The object store at http://127.0.0.1:{own_s3_server.port} ({URL}) does not answer" in caplog.text
    outbox = _outbox_once_it_lists(3, store)  # every upload given up: none is under way when the store returns
    # In the order their uploads found the store away: those under way at once may swap.
    assert sorted(json.loads(outbox.read_text())) == [f"store/runs/r/checkpoints/step-00000{step}" for step in (2, 3, 4)]

    _restart_empty(own_s3_server)
    store.wait_for_uploads()
    assert [_published(directory, store) for directory in kept[1:]] == [True, True]
    filesystem = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    assert not filesystem.exists(store.mirror.remote(kept[0])), "a directory deleted while kept is not published"
    assert "answers again" in caplog.text


def test_a_barrier_waits_for_a_stopped_store_a_bounded_time_then_names_what_is_kept(
        store, own_s3_server, caplog, monkeypatch):
    monkeypatch.setenv("GPTFLOW_OBJECT_STORE_WAIT_S", "3")
    own_s3_server.stop()
    kept = _checkpoint(store, 7)
    started = time.monotonic()
    with pytest.raises(ObjectStoreAwayError) as stopped:
        store.wait_for_uploads()
    assert time.monotonic() - started < 30
    message = str(stopped.value)
    assert "\n" not in message
    outbox = _outbox_once_it_lists(1, store)
    assert f"http://127.0.0.1:{own_s3_server.port}" in message and "GPTFLOW_OBJECT_STORE_WAIT_S" in message
    assert "store/runs/r/checkpoints/step-000007" in message and str(store.mirror.local_root) in message
    assert "Rerun the same command once it answers" in message
    assert "Waiting up to 3 s for the object store" in caplog.text, "the wait says what it waits for"
    assert (kept / "weights.bin").exists()
    assert json.loads(outbox.read_text()) == ["store/runs/r/checkpoints/step-000007"], "listed for the next run"

    # The rerun: it publishes what its outbox lists as it starts.
    _restart_empty(own_s3_server)
    rerun = ArtifactStore(ObjectStoreMirror(store.mirror.local_root, URL))
    rerun.mirror.publish_what_earlier_runs_kept()
    rerun.wait_for_uploads()
    assert _published(kept, rerun)
    assert not outbox.exists()


def test_a_paused_store_is_waited_for_a_bounded_time_saying_what_for(store, own_s3_server, caplog, monkeypatch):
    monkeypatch.setenv("GPTFLOW_OBJECT_STORE_WAIT_S", "120")
    first = _checkpoint(store, 1)
    store.wait_for_uploads()
    own_s3_server.pause()
    try:
        started = time.monotonic()
        assert store.list_folder(first.parent) == ["step-000001"]
        assert time.monotonic() - started < 15, "a request to a paused store gives up after about three times its timeout"
        assert "Waiting for the object store at" in caplog.text and "(listing store/runs/r/checkpoints)" in caplog.text
        assert "does not answer" in caplog.text
        kept = _checkpoint(store, 2)
        assert time.monotonic() - started < 20, "once away, the store is not asked until it answers again"
    finally:
        own_s3_server.pause(False)
    store.wait_for_uploads()
    assert _published(kept, store)


def test_an_object_altered_in_the_bucket_is_named_and_its_directory_computed_again(store, tmp_path, caplog):
    directory = _checkpoint(store, 3)
    store.wait_for_uploads()
    filesystem = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    remote = f"{store.mirror.remote(directory)}/weights.bin"
    filesystem.pipe_file(remote, bytes(reversed(b"x" + filesystem.cat_file(remote)[1:])))  # same size

    elsewhere = ArtifactStore(ObjectStoreMirror.attach(tmp_path / "another-machine", URL))
    copy = elsewhere.mirror.local_root / directory.relative_to(store.mirror.local_root)
    assert not elsewhere.is_complete(copy)
    assert not copy.exists()
    named = f"{URL}/store/runs/r/checkpoints/step-000003/weights.bin in the object store does not hash to its commit"
    assert named in caplog.text
    assert json.loads((directory / CONTENTS_FILE).read_text())["files"], "this machine's copy is untouched"
