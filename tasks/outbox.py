"""A run's MLflow writes, kept in the workspace while its tracking server cannot be reached.

``<workspace>/mlflow-outbox/<run id>.jsonl`` holds one JSON operation per line, in the order the
run made them (files they send named relative to the store, ``data.store.store_references``);
``<run id>.json`` beside it names the tracking server they are for and counts the
lines already sent, so a replay that stops halfway (the server went away again, the process
died) goes on after the last one it sent. Both files are removed once every line is sent.
Whoever reads or writes an outbox holds its ``lock``: the processes of one run (the flow, a
torchrun rank) and ``gptflow sync`` then keep one order.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptflow.data.store import store_paths, store_references
from gptflow.tasks.workspace import Workspace

OUTBOX_DIR = "mlflow-outbox"


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

    def lock(self) -> AbstractContextManager[None]:
        return self.workspace.lock(f"mlflow-outbox-{self.run_id}")

    def is_empty(self) -> bool:
        return not self.path.exists()

    @property
    def tracking_uri(self) -> str:
        """The tracking server the operations are for."""
        return self._state()["tracking_uri"]

    def append(self, operation: dict[str, Any], tracking_uri: str) -> None:
        if self.is_empty():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write_state({"tracking_uri": tracking_uri, "sent": 0})
        with open(self.path, "a") as file:
            file.write(json.dumps(store_references(operation, self.workspace.store)) + "\n")

    def waiting(self) -> collections.Counter[str]:
        """How many operations of each kind wait to be sent."""
        return collections.Counter(operation["kind"] for operation in self._unsent())

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
        partial = self._state_path.with_suffix(".json.tmp")
        partial.write_text(json.dumps(state))
        os.replace(partial, self._state_path)
