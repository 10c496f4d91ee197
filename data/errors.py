"""How bad input is reported: ``CorpusError`` stops the run, ``SkipReport`` counts and goes on.

Every error a user fixes from its message alone derives from ``UserError``, so the command line
and the flows tell it from a bug by its class, without importing the (heavy) module that raised it.

A ``CorpusError`` reaches the user as a one-line message instead of a traceback (the CLI and the
flows catch it), so its message names the file at fault and says what to do about it. Input that
is bad in a way the rest of the corpus can live without (a binary file, a malformed JSON line) is
skipped instead, and counted in a ``SkipReport`` with a few example locations, so one bad line in
a million does not stop a run but is never silently lost either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_EXAMPLES_PER_REASON = 5


class UserError(ValueError):
    """Bad input, or a damaged artifact to recompute: reported as its one-line message, never as a
    traceback. The message names what is at fault and what to do."""


class CorpusError(UserError):
    """A corpus the pipeline cannot use as given: a missing path, an unsupported file, a text
    field no record has, or no documents at all. The message names the file and the fix."""


@dataclass
class SkipReport:
    """Skipped input, counted by reason, with up to ``MAX_EXAMPLES_PER_REASON`` locations each."""

    counts: dict[str, int] = field(default_factory=dict)
    """Reason (e.g. ``"invalid JSON"``) → number of files, lines or records skipped for it."""
    examples: dict[str, list[str]] = field(default_factory=dict)
    """Reason → the first few locations (``path``, ``path:line``, ``path:record 3``)."""

    def add(self, reason: str, location: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES_PER_REASON:
            examples.append(location)

    def merge(self, other: SkipReport) -> None:
        for reason, count in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + count
            examples = self.examples.setdefault(reason, [])
            examples.extend(other.examples.get(reason, [])[: MAX_EXAMPLES_PER_REASON - len(examples)])

    def relocated(self, old_path: str, new_path: str) -> SkipReport:
        """The same report with locations in ``old_path`` renamed: a cached unit found by content
        hash may have been recorded under the path its file had then."""
        if old_path == new_path:
            return self
        return SkipReport(
            counts=dict(self.counts),
            examples={
                reason: [new_path + location[len(old_path):] if location.startswith(old_path) else location
                         for location in locations]
                for reason, locations in self.examples.items()
            },
        )

    def renamed(self, rename: Callable[[str], str]) -> SkipReport:
        """The same report with each location passed through ``rename``."""
        return SkipReport(counts=dict(self.counts),
                          examples={reason: [rename(location) for location in locations]
                                    for reason, locations in self.examples.items()})

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line for people, e.g. ``skipped 3 inputs: invalid JSON ×2 (a.jsonl:4, a.jsonl:9); …``."""
        if not self.counts:
            return "nothing skipped"
        parts = []
        for reason, count in sorted(self.counts.items(), key=lambda item: (-item[1], item[0])):
            shown = self.examples.get(reason, [])
            more = ", ..." if count > len(shown) else ""
            parts.append(f"{reason} ×{count} ({', '.join(shown)}{more})")
        return f"skipped {self.total} inputs: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "examples": {reason: list(e) for reason, e in self.examples.items()}}

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> SkipReport:
        return cls(counts=dict(value["counts"]), examples={r: list(e) for r, e in value["examples"].items()})
