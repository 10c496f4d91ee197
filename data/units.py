"""How a data stage runs its per-file units: through a ``MapUnits`` its caller chooses.

A stage (ingest, tokenize) is composed of unit functions, each a pure function of its arguments
that commits its own store directory, and of the stage's assembly of their results. Where the
units run (here, on a cluster) is the caller's choice; the default runs them
here, in order.

The data stages' interface to the layers above is plain: a ``Progress`` callback called with
``(done, total)`` in the unit the stage's docstring names (bytes for ingest and tokenize), a
``MapUnits``, the workspace's ``data.store.ArtifactStore``, and results that are small
JSON-serialisable dataclasses (``to_dict`` / ``from_dict``) of paths, hashes and counts, which
the stage's Prefect record holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

Progress = Callable[[int, int], None]
"""``progress(done, total)``: how a data stage reports how far it is, in its own unit (bytes)."""
MapUnits = Callable[[Callable[..., Any], list[dict[str, Any]]], Iterator[Any]]
"""``map_units(function, calls)`` yields ``function(**call)`` for each call, in the calls' order."""

PROGRESS_ARGUMENT = "advance"
"""A call's progress callback, if it has one: a map that runs the call in this process passes it
on; one that runs it elsewhere leaves it out (it cannot cross processes), and the stage reports the
call's progress when its result comes."""


def in_this_process(function: Callable[..., Any], calls: list[dict[str, Any]]) -> Iterator[Any]:
    return (function(**call) for call in calls)
