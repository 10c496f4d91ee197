"""A run's MLflow writes, kept in the workspace while its tracking server cannot be reached.

``<workspace>/mlflow-outbox/<run id>.jsonl`` holds one JSON operation per line, in the order the
run made them (files they send named relative to the store, ``data.store.store_references``);
``<run id>.json`` beside it names the tracking server they are for and counts the
lines already sent, so a replay that stops halfway (the server went away again, the process
died) goes on after the last one it sent. Both files are removed once every line is sent.
Whoever reads or writes an outbox holds its ``lock``: the processes of one run (the flow, a
torchrun rank) and ``gptflow sync`` then keep one order.

``OutboxedWriter`` is how a run writes: straight to the server while it answers and nothing waits,
into the outbox otherwise, whose operations it sends, in order, once the server is back.

Every write of a ``tasks.tracking.run.PipelineRun`` (params, tags, metrics, artifacts, the logged
and registered model, the end state) goes through it. A server that cannot be reached
(``tasks.tracking.server.server_unreachable``) sends the write, and every later one while the
outbox holds any, to the outbox; every ``OFFLINE_RETRY_S`` a write first replays it. Artifacts are
kept as paths into the workspace, a model as the arguments of ``PipelineRun.log_pyfunc_model``:
it is saved (with the gptflow code of the process that replays it), logged and registered when
replayed. Until then its ``name/version`` says ``pending`` (``tasks.tracking.registry.is_pending``);
the replay tags the run with the version it registered, and a cached record that says pending is
looked up in the registry. ``tasks.tracking.run.pipeline_run`` sends the workspace's waiting
outboxes before it creates its run and once more at its end; if the server is still away it logs
one warning naming the file and ``gptflow sync`` (which sends every outbox, exit status 1 while
some are kept): the flow itself succeeds, its model in the workspace. An operation the server
refuses when replayed (an artifact deleted since) is an ``OutboxError`` naming its line. A server
that cannot be reached when a run starts is a ``TrackingServerUnreachable``
(``tasks.tracking.experiments``), raised before anything is computed. A run's end that its store
has no space for (a full disk) is kept the same way (``OutboxedWriter.write_last``).
"""

from __future__ import annotations

import collections
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from gptflow.data.disk_space import out_of_space_errno, reporting_out_of_space
from gptflow.data.errors import UserError
from gptflow.data.store import store_paths, store_references
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.tracking.operations import OperationSender
from gptflow.tasks.tracking.progress import run_logger
from gptflow.tasks.tracking.server import server_unreachable

OUTBOX_DIR = "mlflow-outbox"
OFFLINE_RETRY_S = 30.0
"""While a run's writes wait in its outbox, how often it tries to send them."""


@dataclass(frozen=True)
class Outbox:
    workspace: Workspace
    run_id: str

    @classmethod
    def all(cls, workspace: Workspace) -> list[Outbox]:
        """Every outbox of ``workspace`` that holds operations."""
        return [cls(workspace, path.stem) for path in sorted((workspace.root / OUTBOX_DIR).glob("*.jsonl"))]

    @property
    def path(self) -> Path:
        return self.workspace.root / OUTBOX_DIR / f"{self.run_id}.jsonl"

    @property
    def _state_path(self) -> Path:
        return self.path.with_suffix(".json")

    @property
    def _partial_state_path(self) -> Path:
        return self.path.with_suffix(".json.tmp")

    def lock(self) -> AbstractContextManager[None]:
        return self.workspace.lock(f"mlflow-outbox-{self.run_id}")

    def is_empty(self) -> bool:
        return not self.path.exists()

    @property
    def tracking_uri(self) -> str:
        """The tracking server the operations are for."""
        return self._state()["tracking_uri"]

    def append(self, operation: dict[str, Any], tracking_uri: str) -> None:
        """Add ``operation`` as the last line. A write that fails (a full disk) leaves the outbox as
        it was: no half line, which no replay could read, and no outbox that holds nothing."""
        line = memoryview((json.dumps(store_references(operation, self.workspace.store)) + "\n").encode())
        created = self.is_empty()
        try:
            if created:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._write_state({"tracking_uri": tracking_uri, "sent": 0})
            with open(self.path, "ab", buffering=0) as file:
                start = file.tell()
                try:
                    while line:
                        line = line[file.write(line):]
                except OSError:
                    file.truncate(start)
                    raise
        except OSError:
            if created:
                for path in (self.path, self._state_path, self._partial_state_path):
                    path.unlink(missing_ok=True)
            raise

    def waiting(self) -> collections.Counter[str]:
        """How many operations of each kind wait to be sent."""
        return collections.Counter(operation["kind"] for operation in self._unsent())

    def waiting_tags(self) -> dict[str, str]:
        """The tags that wait to be sent, the last value of each."""
        return {key: value for operation in self._unsent() if operation["kind"] == "log_batch"
                for key, value in operation.get("tags", [])}

    def next_line(self) -> int:
        """The line number (from 1) of the first operation not sent yet."""
        return self._state()["sent"] + 1

    def replay(self, send: Callable[[dict[str, Any]], Any]) -> list[Any]:
        """``send`` each waiting operation in order, each recorded as sent once it returns; an
        exception from ``send`` stops the replay there. Returns what ``send`` returned."""
        if self.is_empty():
            return []
        results = []
        state = self._state()
        try:
            for operation in self._unsent():
                results.append(send(operation))
                state["sent"] += 1
                self._write_state(state)
        finally:
            if not self._unsent_lines():
                self.path.unlink()
                self._state_path.unlink()
        return results

    def _unsent(self) -> Iterator[dict[str, Any]]:
        return (store_paths(json.loads(line), self.workspace.store) for line in self._unsent_lines())

    def _unsent_lines(self) -> list[str]:
        if self.is_empty():
            return []
        return self.path.read_text().splitlines()[self._state()["sent"]:]

    def _state(self) -> dict[str, Any]:
        return json.loads(self._state_path.read_text())

    def _write_state(self, state: dict[str, Any]) -> None:
        # Replaced whole, so a process killed while writing it leaves the previous count.
        self._partial_state_path.write_text(json.dumps(state))
        os.replace(self._partial_state_path, self._state_path)


@dataclass
class OutboxReport:
    """What sending one run's outbox did."""

    run_id: str
    tracking_uri: str
    sent: int
    kept: int
    registered: list[str]
    """``name/version`` of each model version the operations sent registered."""
    problem: str
    """Why operations were kept, if any were."""

    def __str__(self) -> str:
        line = f"run {self.run_id}: sent {self.sent} operations to {self.tracking_uri}"
        if self.registered:
            line += f", registered {', '.join(self.registered)}"
        if self.kept:
            line += f"; {self.kept} still kept: {self.problem}"
        return line


class OutboxError(UserError):
    """The tracking server refuses an operation an outbox kept; the message names it."""


class OutboxedWriter:
    """Writes one run's operations through ``sender``, or keeps them in ``outbox`` while the tracking
    server cannot be reached or earlier operations wait there: those are sent first, tried every
    ``OFFLINE_RETRY_S``, so training never waits on the server."""

    def __init__(self, outbox: Outbox, sender: OperationSender) -> None:
        self.outbox = outbox
        self.sender = sender
        self.tracking_uri = sender.client.tracking_uri
        self.next_replay = 0.0
        """The ``time.monotonic()`` from which a write tries to send what the outbox holds."""

    def write(self, operation: dict[str, Any]) -> Any:
        """Send ``operation`` (returning what that returns), or keep it in the outbox (returning None)."""
        with self.outbox.lock():
            if not self.outbox.is_empty() and time.monotonic() >= self.next_replay:
                self._replay()
            if self.outbox.is_empty():
                try:
                    return self.sender.send(operation)
                except Exception as error:
                    if not server_unreachable(error):
                        raise
                    run_logger().warning(
                        f"MLflow: {self.tracking_uri} cannot be reached; the run goes on, and keeps its MLflow "
                        f"writes in {self.outbox.path} until the server is back"
                    )
                    self.next_replay = time.monotonic() + OFFLINE_RETRY_S
            self.outbox.append(operation, self.tracking_uri)
            return None

    def write_last(self, operation: dict[str, Any]) -> None:
        """Write the run's last operation, trying to send what waits whatever the timer says; if
        the tracking server still cannot be reached, or its store lies on a disk that is full, say
        what the outbox keeps and how to send it. An outbox that has no space either raises
        ``OutOfSpaceError`` naming it."""
        self.next_replay = 0.0
        problem, when = "still cannot be reached", "Once the server is back"
        try:
            self.write(operation)
        except Exception as error:
            if out_of_space_errno(error) is None:
                raise
            # A run's end must not be lost to a full disk: the next run, or `gptflow sync`, sends it.
            problem, when = "has no space left to store the run's end", "Once there is space"
            with self.outbox.lock(), reporting_out_of_space(self.outbox.path):
                self.outbox.append(operation, self.tracking_uri)
        with self.outbox.lock():
            waiting = self.outbox.waiting()
        if waiting:
            model = " (the model's logging and registration among them)" if waiting["log_model"] else ""
            run_logger().warning(
                f"MLflow: {self.tracking_uri} {problem}: {waiting.total()} operations of run "
                f"{self.outbox.run_id}{model} are kept in {self.outbox.path}. {when}, send them "
                f"with `gptflow sync --workspace {self.outbox.workspace.root}` (the next gptflow run on this "
                "workspace sends them too)."
            )

    def send_waiting(self) -> OutboxReport:
        """Send what the outbox holds now, whatever the retry timer says (the caller holds its lock)."""
        waiting = self.outbox.waiting().total()
        try:
            problem = "" if self._replay() else f"{self.tracking_uri} cannot be reached, so they stay in {self.outbox.path}"
        except OutboxError as error:
            problem = str(error)
        kept = self.outbox.waiting().total()
        return OutboxReport(self.outbox.run_id, self.tracking_uri, waiting - kept, kept, self.sender.registered, problem)

    def _replay(self) -> bool:
        """Send what the outbox holds, in order (the caller holds its lock); whether all of it went.
        An operation the server refuses raises ``OutboxError``."""
        waiting = self.outbox.waiting().total()
        try:
            self.outbox.replay(self.sender.send)
        except Exception as error:
            if not server_unreachable(error):
                raise OutboxError(
                    f"could not send operation {self.outbox.next_line()} of {self.outbox.path} to "
                    f"{self.tracking_uri}: {first_line(error)}. Remove the cause and run `gptflow sync` "
                    "again, or delete that line to drop the operation."
                ) from error
            self.next_replay = time.monotonic() + OFFLINE_RETRY_S
            return False
        run_logger().info(f"MLflow: sent the {waiting} operations of run {self.outbox.run_id} that waited in "
                          f"{self.outbox.path} to {self.tracking_uri}")
        return True


def send_outboxes(workspace: Workspace) -> list[OutboxReport]:
    """Send the outbox of every run of ``workspace`` that kept writes, each to its own tracking
    server; a report per outbox."""
    reports = []
    for outbox in Outbox.all(workspace):
        with outbox.lock():
            if not outbox.is_empty():  # else another process sent it meanwhile
                sender = OperationSender(MlflowClient(outbox.tracking_uri), outbox.run_id)
                reports.append(OutboxedWriter(outbox, sender).send_waiting())
    return reports


def first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
