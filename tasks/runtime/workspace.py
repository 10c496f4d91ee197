"""Where a pipeline keeps its state: artifact store, Prefect result records, MLflow store.

A workspace is ``--workspace DIR``, else ``$GPTFLOW_HOME``, else ``./.gptflow``. An ``s3://``
URL names a workspace kept on S3: ``resolve`` checks that it takes a write first (a missing
bucket, denied credentials or an endpoint that does not answer is one line), and each machine
works in a local copy under ``$GPTFLOW_CACHE`` (``data.mirror``), of which at most
``GPTFLOW_CACHE_GB`` stays between runs (least recently used first, never a copy the store lacks;
a run may exceed it while it runs, so nothing it fetched goes while it may read it).

Locks (``Workspace.lock``) are ``flock`` files in ``locks/``, released by the kernel when their
process dies: one per stage key (concurrent runs of one stage take turns), one per lineage, one
per MLflow outbox, and one while a run sets up the MLflow store. ``between_machines=True`` (stage
keys, lineages) adds an ``ObjectStoreLease`` on an object-store workspace: created with
``If-None-Match: *``, renewed with ``If-Match`` on its ETag, taken over once expired for
``LEASE_SECONDS``; clocks are assumed to agree within seconds. Locks of what only one machine has
(its MLflow store, its outboxes) stay plain ``flock`` locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptflow.data.environment import number_from_environment
from gptflow.data.errors import UserError
from gptflow.data.hashing import hash_json
from gptflow.data.mirror import ObjectStoreMirror
from gptflow.data.store import ArtifactStore
from gptflow.data.store_outage import is_unreachable

WORKSPACE_ENV = "GPTFLOW_HOME"
WORKSPACE_SERVER_ENV = "GPTFLOW_WORKSPACE_MLFLOW"
"""The URL of the MLflow server ``gptflow up`` runs on the workspace's own ``mlflow.db``."""
DEFAULT_WORKSPACE = ".gptflow"
CACHE_ENV = "GPTFLOW_CACHE"
DEFAULT_CACHE = "~/.cache/gptflow"
CACHE_LIMIT_ENV = "GPTFLOW_CACHE_GB"
DEFAULT_CACHE_LIMIT_GB = 100.0
"""What an object-store workspace's local copy may keep between runs; a run may use more while it runs."""
OBJECT_STORE_SCHEMES = ("s3://",)
"""Workspaces on an object store: those whose conditional writes the cross-machine lock relies on."""
LEASE_SECONDS = 60.0
"""How long a stage lock on an object store outlives its holder's last renewal (a killed run's
lock is taken over after this); holders renew it every third of it."""


class WorkspaceError(UserError):
    """The workspace folder cannot be used; the message says what to pass instead."""


@dataclass(frozen=True)
class Workspace:
    root: Path
    """The workspace's folder; for a workspace on an object store, this machine's copy of it."""
    url: str | None = None
    """The object store URL (``s3://bucket/prefix``) of a workspace kept there, else None."""

    @classmethod
    def resolve(cls, path: str | Path | None = None) -> Workspace:
        """``path``, else ``$GPTFLOW_HOME``, else ``./.gptflow``; created if missing. A URL names a
        workspace on an object store, mirrored in a folder of ``$GPTFLOW_CACHE``; it is checked
        to answer before anything runs."""
        url = _object_store_url(path or os.environ.get(WORKSPACE_ENV))
        if url is not None:
            mirror = ObjectStoreMirror.attach(cls.locate(url), url)
            workspace = cls(mirror.local_root, url).checked()
            workspace.artifacts.mirror.publish_what_earlier_runs_kept()
            # At the start of a run, not during one: nothing a run has fetched goes while it may still read it.
            mirror.evict_least_recently_used(cache_limit_bytes())
            return workspace
        root = cls.locate(path)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise WorkspaceError(f"The workspace {root} is a file, or lies inside one: pass a folder with --workspace "
                                 f"(or {WORKSPACE_ENV}).") from None
        except PermissionError:
            raise WorkspaceError(f"The workspace {root} cannot be created here (permission denied): pass a folder "
                                 f"you can write with --workspace (or {WORKSPACE_ENV}).") from None
        return cls(root)

    @staticmethod
    def locate(path: str | Path | None = None) -> Path:
        """The folder ``resolve`` would use, without creating it."""
        path = path or os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE
        url = _object_store_url(path)
        if url is not None:
            return cache_root() / "workspaces" / hash_json(url)[:16]
        return Path(path).expanduser().resolve()

    def checked(self) -> Workspace:
        """This workspace, once its object store answered a listing and took a write."""
        mirror = ObjectStoreMirror(self.root, self.url)
        probe = mirror.remote(self.root / "locks" / f"probe-{uuid.uuid4().hex}")
        try:
            mirror.fs.pipe_file(probe, b"")
            mirror.fs.rm_file(probe)
        except FileNotFoundError:
            raise WorkspaceError(f"The workspace {self.url}: its bucket does not exist. Create it, or pass another "
                                 "--workspace.") from None
        except PermissionError:
            raise WorkspaceError(f"The workspace {self.url} refused a write (access denied): give these credentials "
                                 "write access to it (AWS_ACCESS_KEY_ID / AWS_PROFILE), or pass another --workspace.") from None
        except Exception as error:  # the client's own errors differ by store and library
            raise WorkspaceError(f"The workspace {self.url} cannot be reached ({type(error).__name__}: {error}): check "
                                 "its endpoint (AWS_ENDPOINT_URL) and network, or pass another --workspace.") from None
        return self

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def artifacts(self) -> ArtifactStore:
        """What every check, commit and read of the store's directories goes through: on this
        machine, and for a workspace on an object store, there too."""
        return ArtifactStore.for_workspace(self.root, self.url)

    @property
    def prefect_results(self) -> Path:
        """Prefect's cache records live beside the artifacts they point to."""
        return self.root / "prefect"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def tracking_uri(self) -> str:
        """``$MLFLOW_TRACKING_URI`` when set (a team server), else SQLite in the workspace."""
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def uses_local_tracking(self) -> bool:
        return "MLFLOW_TRACKING_URI" not in os.environ

    @property
    def tracks_in_own_store(self) -> bool:
        """The tracking store is the workspace's ``mlflow.db``: directly, or through the server
        ``gptflow up`` runs on it (not a team server, whose experiments are not the workspace's)."""
        return self.uses_local_tracking or os.environ.get(WORKSPACE_SERVER_ENV) == os.environ["MLFLOW_TRACKING_URI"]

    @contextlib.contextmanager
    def lock(self, name: str, on_wait: Callable[[], None] | None = None, between_machines: bool = False
             ) -> Iterator[None]:
        """An exclusive lock between processes using this workspace; ``on_wait`` is called if
        another process holds it. ``flock`` locks die with their process, so a run killed while
        holding one never blocks the next (unlike lock files). ``between_machines``: also between
        machines sharing a workspace on an object store (what they share: stages, lineages), not
        only processes of this one (its MLflow store, its outboxes)."""
        lock_dir = self.root / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f"{name}.lock", "a") as lock_file:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait:
                    on_wait()
                    on_wait = None
                fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                if self.url is None or not between_machines:
                    yield
                else:
                    with ObjectStoreLease(ObjectStoreMirror(self.root, self.url), lock_dir / f"{name}.lock", on_wait):
                        yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)


class ObjectStoreLease:
    """An exclusive lock between machines on an object store's conditional writes: the lock is an
    object created only if absent (``If-None-Match: *``) that names its holder and when it expires.
    The holder renews it every third of ``LEASE_SECONDS`` (a write only if it is unchanged since,
    ``If-Match``); a waiter takes over one that expired (its holder was killed) the same way, so
    two waiters never both do. The flock around it makes processes of one machine take turns first.
    """

    def __init__(self, mirror: ObjectStoreMirror, local_lock: Path, on_wait: Callable[[], None] | None) -> None:
        self.fs = mirror.fs
        self.path = mirror.remote(local_lock)
        self.endpoint = mirror.outage.endpoint
        self.local_root = mirror.local_root
        self.on_wait = on_wait
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.etag: str | None = None
        self.stop_renewing = threading.Event()
        self.renewer = threading.Thread(target=self._renew, name="gptflow-lease", daemon=True)

    def __enter__(self) -> ObjectStoreLease:
        while not self._acquired():
            if self.on_wait:
                self.on_wait()
                self.on_wait = None
            time.sleep(min(2.0, LEASE_SECONDS / 10))
        self.renewer.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop_renewing.set()
        self.renewer.join()
        try:
            if self.fs.info(self.path)["ETag"] == self.etag:
                self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass
        except Exception as error:
            if not is_unreachable(error):
                raise
            # The store went away: the lease is left to expire, after LEASE_SECONDS.

    def _acquired(self) -> bool:
        try:
            return self._try_acquire()
        except Exception as error:
            if not is_unreachable(error):
                raise
            raise WorkspaceError(f"The object store at {self.endpoint} does not answer ({type(error).__name__}), so the "
                                 f"lock {self.path} cannot be taken; what this run computed is kept in "
                                 f"{self.local_root}. Rerun the same command once it answers.") from None

    def _body(self) -> bytes:
        return json.dumps({"holder": self.holder, "expires": time.time() + LEASE_SECONDS}).encode()

    def _try_acquire(self) -> bool:
        try:
            self.etag = self.fs.pipe_file(self.path, self._body(), mode="create")["ETag"]
            return True
        except FileExistsError:
            pass
        try:
            info = self.fs.info(self.path)
            held = json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return False  # released meanwhile: the next try creates it
        if held["expires"] > time.time():
            return False
        return self._replace(info["ETag"])

    def _replace(self, etag: str) -> bool:
        """Write the lease over the version ``etag``, if it is still that version."""
        try:
            self.etag = self.fs.pipe_file(self.path, self._body(), IfMatch=etag)["ETag"]
            return True
        except OSError:  # changed since (a precondition failed), or gone
            return False
        except Exception as error:
            if is_unreachable(error):
                return False  # the store is away: renewed on its return, if the lease has not expired
            raise

    def _renew(self) -> None:
        while not self.stop_renewing.wait(LEASE_SECONDS / 3):
            self._replace(self.etag)


def cache_root() -> Path:
    """``$GPTFLOW_CACHE``, else ``~/.cache/gptflow``: this machine's copies of object-store workspaces."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser().resolve()


def cache_limit_bytes() -> int:
    """``$GPTFLOW_CACHE_GB`` (default 100) in bytes: what a workspace's copy in the cache keeps between runs."""
    limit_gb = number_from_environment(
        CACHE_LIMIT_ENV, DEFAULT_CACHE_LIMIT_GB, zero_allowed=True, error=WorkspaceError,
        wanted="a size: give the gigabytes the local cache of an object-store workspace may keep, e.g. 50")
    return int(limit_gb * 2**30)


def _object_store_url(path: str | Path | None) -> str | None:
    """``path`` when it is an object store URL (normalised without a trailing slash), else None; a
    URL of a scheme gptflow cannot keep a workspace on is refused."""
    if not isinstance(path, str) or "://" not in path:
        return None
    if not path.startswith(OBJECT_STORE_SCHEMES):
        raise WorkspaceError(f"The workspace {path}: a workspace is a local folder or an s3:// URL (its stage locks "
                             "need S3's conditional writes); pass one of those with --workspace.")
    try:
        import s3fs  # noqa: F401  an optional extra
    except ImportError:
        raise WorkspaceError(f"The workspace {path} is on S3, which needs s3fs: pip install 'gptflow[s3]'.") from None
    return path.rstrip("/")
