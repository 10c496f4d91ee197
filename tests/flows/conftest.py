"""What the flow tests share beyond the session's servers (tests/conftest.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch


@contextlib.contextmanager
def _flows_run_here() -> Iterator[None]:
    threads = torch.get_num_threads()
    # One thread: on a busy 2-core machine a second one slows tiny models by orders of magnitude.
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as env:
            env.delenv("MLFLOW_TRACKING_URI", raising=False)
            env.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def flows_run_here(prefect_api_url) -> Callable[[], contextlib.AbstractContextManager[None]]:
    """A context in which a test runs flows in its own process, on the session's Prefect server:
    one torch thread, and each workspace's own MLflow store."""
    return _flows_run_here
