"""Progress of long stages on the console (rate and ETA) and in the Prefect UI."""

from __future__ import annotations

import logging
import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

REPORT_EVERY_S = 2.0


def human_count(value: float, unit: str = "") -> str:
    """``13_400_000, "B"`` → ``"13.4 MB"``; ``52_000`` → ``"52.0K"``."""
    prefixes = (("G", 1e9), ("M", 1e6), ("K", 1e3)) if unit else (("B", 1e9), ("M", 1e6), ("K", 1e3))
    for prefix, scale in prefixes:
        if abs(value) >= scale:
            return f"{value / scale:.1f}{' ' if unit else ''}{prefix}{unit}"
    return f"{value:.0f}{' ' + unit if unit else ''}"


def human_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task (shown on the console and in the UI)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("gptflow")


class StageProgress:
    """A ``(done, total)`` callback for the data stages: throttled log lines with rate and ETA,
    mirrored into a Prefect progress artifact so the UI shows the bar too."""

    def __init__(self, stage: str, unit: str) -> None:
        self.stage = stage
        self.unit = unit
        self.logger = run_logger()
        self.started = time.monotonic()
        self.last_report = self.started  # the first line waits until a rate means something
        self.artifact_id = create_progress_artifact(progress=0.0, description=f"{stage}: starting")

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        finished = total > 0 and done >= total
        if not finished and now - self.last_report < REPORT_EVERY_S:
            return
        self.last_report = now
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        fraction = done / total if total else 1.0
        eta = (total - done) / rate if rate > 0 else 0.0
        line = (
            f"{self.stage}: {human_count(done, self.unit)} / {human_count(total, self.unit)} "
            f"({fraction:.0%}) · {human_count(rate, self.unit)}/s · "
            + (f"done in {human_duration(elapsed)}" if finished else f"ETA {human_duration(eta)}")
        )
        self.logger.info(line)
        update_progress_artifact(self.artifact_id, progress=100.0 * fraction, description=line)
