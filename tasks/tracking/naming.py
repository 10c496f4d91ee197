"""Names of runs: what a user reads first in the MLflow runs table and the Prefect flow runs list."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from gptflow.data.redact import redact_path

RUN_ID = re.compile(r"[0-9a-f]{32}")


def run_name(flow: str, overrides: dict[str, Any] | None, *context: str | None) -> str:
    """``learning_rate=0.01 · pretrain cpu stdlib``: what was set differently first, in the order
    given (a sweep gives its swept settings first), each by its field's name alone, since tables
    and chart legends cut names at the end; then the flow and what it ran on. Each flow names its
    Prefect flow runs with it, and ``tasks.tracking.run.pipeline_run`` gives the MLflow run the
    same name."""
    changed = " ".join(f"{key.rpartition('.')[2]}={value}" for key, value in (overrides or {}).items())
    described = " ".join([flow, *(part for part in context if part)])
    return f"{changed} · {described}" if changed else described


def source_label(source: str | None) -> str | None:
    """A short name for a corpus path, model URI, run id or model directory, for run names; the
    personal data in a file or folder name (an e-mail address) redacted, whatever
    ``data.redact_pii``: a run's name is shown everywhere, and no address is needed to tell runs apart."""
    if source is None:
        return None
    if source.startswith(("models:/", "runs:/")):
        return source.split(":/", 1)[1]
    if RUN_ID.fullmatch(source):
        return source[:8]
    path = Path(source.rstrip("/"))
    return redact_path("/".join(path.parts[-2:]) if path.name in ("final", "model") else (path.name or source))
