"""Fixtures shared by every test package."""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

import pytest

# Telemetry from the test server fails offline and competes for its SQLite database.
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

# A few real standard-library packages: real text, present on every machine, ~300 KB.
TINY_CORPUS_PACKAGES = ("json", "logging", "email", "collections", "importlib")


@pytest.fixture(scope="session")
def tiny_corpus_dir(tmp_path_factory) -> Path:
    """A folder of real Python source files, small enough for the ``tiny`` preset."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = tmp_path_factory.mktemp("tiny-corpus")
    for package in TINY_CORPUS_PACKAGES:
        for source in sorted((stdlib / package).glob("*.py")):
            shutil.copy2(source, corpus / f"{package}_{source.name}")
    return corpus


@pytest.fixture(scope="session")
def prefect_api_url() -> str:
    """One real Prefect server (the test harness) for the whole session; its URL for subprocesses."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()
