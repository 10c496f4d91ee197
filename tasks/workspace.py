"""Where a pipeline keeps its state: artifact store, Prefect result records, MLflow store."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gptflow.data.errors import UserError

WORKSPACE_ENV = "GPTFLOW_HOME"
WORKSPACE_SERVER_ENV = "GPTFLOW_WORKSPACE_MLFLOW"
"""The URL of the MLflow server ``gptflow up`` runs on the workspace's own ``mlflow.db``."""
DEFAULT_WORKSPACE = ".gptflow"


class WorkspaceError(UserError):
    """The workspace folder cannot be used; the message says what to pass instead."""


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def resolve(cls, path: str | Path | None = None) -> Workspace:
        """``path``, else ``$GPTFLOW_HOME``, else ``./.gptflow``; created if missing."""
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
        return Path(path or os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE).expanduser().resolve()

    @property
    def store(self) -> Path:
        return self.root / "store"

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
    def lock(self, name: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """An exclusive lock between processes using this workspace; ``on_wait`` is called if
        another process holds it. ``flock`` locks die with their process, so a run killed while
        holding one never blocks the next (unlike lock files)."""
        lock_dir = self.root / "locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f"{name}.lock", "a") as lock_file:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait:
                    on_wait()
                fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)
