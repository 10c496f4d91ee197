"""A workspace on S3 (a real moto server on 127.0.0.1): directories committed by their
``contents.json`` object last, fetched and checked on another machine's cache, and stage locks
between machines on S3's conditional writes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import s3fs

from gptflow.data import commits
from gptflow.data.commits import CONTENTS_FILE
from gptflow.tasks.runtime import workspace as workspace_module
from gptflow.tasks.runtime.workspace import Workspace, WorkspaceError


@pytest.fixture()
def two_machines(s3_bucket, tmp_path, monkeypatch):
    """Two workspaces on one S3 prefix, each with its own local cache, as two machines have."""
    url = f"{s3_bucket}/team"
    monkeypatch.setenv("GPTFLOW_CACHE", str(tmp_path / "cache-a"))
    first = Workspace.resolve(url)
    monkeypatch.setenv("GPTFLOW_CACHE", str(tmp_path / "cache-b"))
    second = Workspace.resolve(url)
    assert first.root != second.root
    return first, second


def _objects(url: str) -> dict[str, bytes]:
    filesystem = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    prefix = url.removeprefix("s3://")
    return {name[len(prefix) + 1:]: filesystem.cat_file(name) for name in filesystem.find(prefix)}


def test_a_directory_is_committed_by_its_contents_object_and_fetched_whole_elsewhere(two_machines):
    first, second = two_machines
    with first.artifacts.commit(first.store / "tokens" / "unit") as tmp:
        (tmp / "train.arrow").write_bytes(b"tokens" * 1000)
        (tmp / "nested").mkdir()
        (tmp / "nested" / "val.arrow").write_bytes(b"val")
    first.artifacts.wait_for_uploads()
    objects = _objects(first.url)
    assert set(objects) == {"store/tokens/unit/train.arrow", "store/tokens/unit/nested/val.arrow",
                            f"store/tokens/unit/{CONTENTS_FILE}"}

    copy = second.store / "tokens" / "unit"
    assert not copy.exists() and second.artifacts.is_complete(copy)
    assert (copy / "train.arrow").read_bytes() == b"tokens" * 1000
    assert (copy / "nested" / "val.arrow").read_bytes() == b"val"
    assert commits.is_complete(copy)  # the fetched copy passes the local check as it is


def test_a_directory_whose_commit_is_missing_or_whose_object_was_altered_is_not_trusted(two_machines):
    first, second = two_machines
    with first.artifacts.commit(first.store / "raw" / "unit") as tmp:
        (tmp / "docs.arrow").write_bytes(b"a" * 100)
    first.artifacts.wait_for_uploads()
    filesystem = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    data_object = f"{first.url.removeprefix('s3://')}/store/raw/unit/docs.arrow"

    filesystem.pipe_file(data_object, b"b" * 100)  # same size, other bytes: caught when fetched
    assert not second.artifacts.is_complete(second.store / "raw" / "unit")
    assert not list((second.store / "raw").glob(".tmp-*")), "a failed fetch leaves nothing behind"
    assert first.artifacts.is_complete(first.store / "raw" / "unit"), "the machine that wrote it holds a good copy"

    with first.artifacts.commit(first.store / "raw" / "unit") as tmp:  # recomputed: published again
        (tmp / "docs.arrow").write_bytes(b"a" * 100)
    first.artifacts.wait_for_uploads()
    assert second.artifacts.is_complete(second.store / "raw" / "unit")

    commit = f"{first.url.removeprefix('s3://')}/store/raw/unit/{CONTENTS_FILE}"
    filesystem.rm_file(commit)
    shutil.rmtree(second.store / "raw" / "unit")  # a machine without a copy of its own
    assert not second.artifacts.is_complete(second.store / "raw" / "unit"), \
        "without its commit object a directory does not exist"
    # ... except on the machine that committed it, whose upload was cut short: its copy is published again.
    assert first.artifacts.is_complete(first.store / "raw" / "unit") and filesystem.exists(commit)


def test_shared_files_follow_the_object_store(two_machines):
    first, second = two_machines
    manifest = first.store / "manifests" / "corpus-x.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text('{"units": []}')
    first.artifacts.share(manifest)
    assert second.artifacts.pull(second.store / "manifests" / "corpus-x.json")
    assert (second.store / "manifests" / "corpus-x.json").read_text() == '{"units": []}'

    s3fs.S3FileSystem(skip_instance_cache=True).rm_file(f"{first.url.removeprefix('s3://')}/store/manifests/corpus-x.json")
    assert not second.artifacts.pull(second.store / "manifests" / "corpus-x.json")
    assert not (second.store / "manifests" / "corpus-x.json").exists(), "a file the store lost is not kept here"


def test_a_stage_lock_holds_between_machines_and_is_released(two_machines):
    first, second = two_machines
    order: list[str] = []
    waited = threading.Event()
    first_holds = threading.Event()

    def hold_first() -> None:
        with first.lock("stage", between_machines=True):
            first_holds.set()
            order.append("first in")
            time.sleep(1.5)
            order.append("first out")

    holder = threading.Thread(target=hold_first)
    holder.start()
    first_holds.wait(10)
    with second.lock("stage", on_wait=waited.set, between_machines=True):
        order.append("second in")
    holder.join()
    assert order == ["first in", "first out", "second in"]
    assert waited.is_set()
    assert not [name for name in _objects(first.url) if name.startswith("locks/stage")], "released locks are deleted"
    with first.lock("mlflow-store"):  # what only this machine has (its MLflow store) is locked on it alone
        assert not [name for name in _objects(first.url) if name.startswith("locks/")]


def test_the_lock_of_a_killed_holder_is_taken_over_once_it_expired(two_machines, monkeypatch):
    first, second = two_machines
    monkeypatch.setattr(workspace_module, "LEASE_SECONDS", 3.0)
    filesystem = s3fs.S3FileSystem(skip_instance_cache=True)
    lock_object = f"{first.url.removeprefix('s3://')}/locks/stage.lock"
    # What a holder killed without releasing leaves: a lease nobody renews.
    expires = time.time() + 2
    filesystem.pipe_file(lock_object, json.dumps({"holder": "gone:1:x", "expires": expires}).encode())
    with second.lock("stage", between_machines=True):
        taken_at = time.time()
        held = json.loads(filesystem.cat_file(lock_object))
    assert expires <= taken_at < expires + 15, "taken over once expired, not before"
    assert held["holder"].startswith(socket.gethostname())


def test_a_lease_is_renewed_while_its_stage_runs(two_machines, monkeypatch):
    first, second = two_machines
    monkeypatch.setattr(workspace_module, "LEASE_SECONDS", 1.5)
    entered = threading.Event()
    order: list[str] = []

    def hold_long() -> None:
        with first.lock("stage", between_machines=True):
            entered.set()
            time.sleep(4)  # well past one lease: only renewals keep it
            order.append("first out")

    holder = threading.Thread(target=hold_long)
    holder.start()
    entered.wait(10)
    with second.lock("stage", between_machines=True):
        order.append("second in")
    holder.join()
    assert order == ["first out", "second in"]


def test_a_missing_bucket_or_an_unreachable_endpoint_is_a_clear_error(s3_server, tmp_path, monkeypatch):
    for name, value in s3_server.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("GPTFLOW_CACHE", str(tmp_path / "cache"))
    with pytest.raises(WorkspaceError, match="s3://no-such-bucket-here/x: its bucket does not exist"):
        Workspace.resolve("s3://no-such-bucket-here/x")

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(WorkspaceError, match=r"s3://any-bucket/x cannot be reached .*AWS_ENDPOINT_URL"):
        Workspace.resolve("s3://any-bucket/x")


@pytest.fixture()
def s3_server_that_checks_credentials(tmp_path):
    """A second moto S3 server that authenticates every request (``INITIAL_NO_AUTH_ACTION_COUNT=0``),
    as S3 does: keys it never issued are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "moto did not start"
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_credentials_the_store_refuses_are_a_clear_error(s3_server, s3_server_that_checks_credentials, tmp_path,
                                                         monkeypatch):
    for name, value in s3_server.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server_that_checks_credentials)
    monkeypatch.setenv("GPTFLOW_CACHE", str(tmp_path / "cache"))
    with pytest.raises(WorkspaceError, match=r"s3://locked-bucket/x refused a write \(access denied\): give these "
                                             r"credentials write access"):
        Workspace.resolve("s3://locked-bucket/x")


def test_a_workspace_url_of_another_kind_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTFLOW_CACHE", str(tmp_path / "cache"))
    with pytest.raises(WorkspaceError, match="a local folder or an s3:// URL"):
        Workspace.resolve("ftp://example/x")


def test_the_cache_keeps_the_most_recently_used_copies_within_its_bound(two_machines, monkeypatch):
    first, _ = two_machines
    units = [first.store / "tokens" / f"unit-{index}" for index in range(3)]
    for unit in units:
        with first.artifacts.commit(unit) as tmp:
            (tmp / "train.arrow").write_bytes(bytes(1000))
    first.artifacts.wait_for_uploads()
    for unit in (units[2], units[1], units[0]):  # least recently used first
        assert first.artifacts.is_complete(unit)
    s3fs.S3FileSystem(skip_instance_cache=True).rm_file(  # unit-2 lost its commit: its copy is the only one
        f"{first.url.removeprefix('s3://')}/store/tokens/unit-2/{CONTENTS_FILE}")

    monkeypatch.setenv("GPTFLOW_CACHE", str(first.root.parent.parent))
    monkeypatch.setenv("GPTFLOW_CACHE_GB", str(1500 / 2**30))
    assert Workspace.resolve(first.url).root == first.root  # a run starts: the cache is trimmed
    assert units[2].exists(), "an unpublished copy is never evicted"
    assert not units[1].exists() and not units[0].exists(), "the least recently used, until 1500 bytes are left"
    assert first.artifacts.is_complete(units[1]) and (units[1] / "train.arrow").read_bytes() == bytes(1000), "fetched again on use"


def test_a_cache_bound_that_is_not_a_size_is_refused(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GPTFLOW_CACHE_GB", "lots")
    with pytest.raises(WorkspaceError, match="GPTFLOW_CACHE_GB=lots is not a size"):
        Workspace.resolve(f"{s3_bucket}/team")
