"""The temporary Prefect server of a run that has none (no ``PREFECT_API_URL``, no ``gptflow up``),
started at the command's start.

Left to itself, Prefect starts its temporary server when the flow first calls its API: after the
command has imported torch, MLflow and Prefect, and the command then waits for the server to
import Prefect's server in its own process and open its database, seconds more, one after the
other. gptflow starts that same server, with Prefect's own command for it (uvicorn serving
``prefect.server.api.server:create_app`` in its ephemeral mode, without the UI) before importing
anything heavy, so that its start overlaps the command's imports, and names it in
``PREFECT_API_URL``: the command then never imports Prefect's server itself. Its database is the
one ``stack.keep_prefect_state_in`` set, and it stops as the command exits, as Prefect's does; on
Linux also when the command is killed (SIGTERM, SIGKILL, the out-of-memory killer), which no exit
handler sees: the kernel sends the server SIGTERM when the process that started it dies.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path

from gptflow.flows.stack import WAITING_REPORT_EVERY_S, StackError, answers

HOST = "127.0.0.1"
PR_SET_PDEATHSIG = 1
"""``prctl`` option (linux/prctl.h): the signal the calling process gets when its parent dies."""
EPHEMERAL_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
"""What Prefect's ``SubprocessASGIServer`` sets for its temporary server: no UI, the services of
an ephemeral server only."""
STOP_TIMEOUT_S = 5.0


class TemporaryPrefectServer:
    """A Prefect server for this command's run alone: ``start`` it, ``wait_until_ready`` before the
    flow calls it; it stops as the command exits."""

    def __init__(self, process: subprocess.Popen, api_url: str, log: Path) -> None:
        self.process = process
        self.api_url = api_url
        self.log = log

    @classmethod
    def start(cls, logs: Path) -> TemporaryPrefectServer:
        """Start the server on a free port, its output in ``logs/``, and point this process's
        Prefect (and every process it starts) at it. Call it before importing Prefect, which reads
        its settings once, at import, and after ``stack.keep_prefect_state_in``."""
        port = _free_port()
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / "prefect-temporary-server.log"
        prefect_folder = Path(find_spec("prefect").origin).parent
        with open(log, "wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect_folder.parent), "--factory",
                 "prefect.server.api.server:create_app", "--host", HOST, "--port", str(port),
                 "--log-level", "error", "--lifespan", "on"],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **EPHEMERAL_SERVER_ENV},
                preexec_fn=stop_with_parent if sys.platform == "linux" else None,
            )
        api_url = f"http://{HOST}:{port}/api"
        os.environ["PREFECT_API_URL"] = api_url
        server = cls(process, api_url, log)
        # At exit, as Prefect stops its own: registered before Prefect is imported, this runs after
        # Prefect's workers have sent the run's last logs and events to the server.
        atexit.register(server.stop)
        return server

    def wait_until_ready(self, timeout_s: float, report: Callable[[str], None]) -> None:
        """Return once the server answers; ``report`` every ``WAITING_REPORT_EVERY_S`` that it does
        not yet. Waiting began now: ``timeout_s`` (Prefect's
        ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``) counts from here, as Prefect's wait
        for its own server does."""
        waiting_since = time.monotonic()
        next_report = waiting_since + WAITING_REPORT_EVERY_S
        while not answers(f"{self.api_url}/health"):
            now = time.monotonic()
            if self.process.poll() is not None:
                raise StackError(f"Prefect's temporary server stopped as it started (exit status "
                                 f"{self.process.returncode}; its log: {self.log}). Fix what its log names, or run "
                                 "`gptflow up` and run the command again.")
            if now - waiting_since > timeout_s:
                self.stop()
                raise StackError(f"Prefect's temporary server did not answer within {timeout_s:.0f} s (its log: "
                                 f"{self.log}). On a busy machine set PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
                                 "=120, or start the servers once with `gptflow up`.")
            if now >= next_report:
                report(f"waiting for Prefect's temporary server to answer on {self.api_url.removesuffix('/api')} "
                       f"({now - waiting_since:.0f} s so far; its log: {self.log})")
                next_report += WAITING_REPORT_EVERY_S
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def stop_with_parent() -> None:
    """A ``preexec_fn`` (Linux): the child gets SIGTERM when the process that started it dies, so a
    server outlives no killed command (here the temporary Prefect server, before it runs uvicorn;
    the benchmarks' S3 servers too). It is tied to the thread that started the child: start it
    from the main thread."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]
