"""Where a pipeline keeps its state: artifact store, Prefect result records, MLflow store."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

WORKSPACE_ENV = "GPTFLOW_HOME"
DEFAULT_WORKSPACE = ".gptflow"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def resolve(cls, path: str | Path | None = None) -> Workspace:
        """``path``, else ``$GPTFLOW_HOME``, else ``./.gptflow``; created if missing."""
        chosen = path or os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE
        root = Path(chosen).expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

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
