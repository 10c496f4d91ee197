"""The MLflow pages gptflow's addresses open: an experiment's runs table, in the machine-learning
view, showing the figures that say which run is best and sorted by them; a run's page.

MLflow 3's UI (checked in 3.17) keeps its workflow, GenAI or machine learning, in the browser:
GenAI until a user picks *Model training* in the sidebar. Neither a server setting nor the
experiment tag ``mlflow.experimentKind`` changes that, so an experiment's plain address opens
its GenAI overview; the query ``workflowType=machine_learning`` opens a page in the
machine-learning view, and every address gptflow prints carries it (``ML_VIEW``).

The runs table's columns, their order and widths and its sort are a saved view: the experiment
tag ``mlflow.sharedViewState.<key>`` holds it, and the query ``viewStateShareKey=<key>`` opens the
table with it (the UI's *Views* menu lists it too, by its name). The tag's value is the envelope
the UI's own *Save view* writes, ``{"name", "createdAt", "updatedAt", "state"}``, whose ``state``
is the JSON of the UI's search facets (``orderByKey``, ``orderByAsc``) and table state
(``selectedColumns``, ``columnOrder``, ``columnWidths``); a column is named
``<metrics|params|attributes>.`<key>```.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

ML_VIEW = "workflowType=machine_learning"
"""The query that opens an MLflow 3 UI page in its machine-learning view."""
VIEW_KEY = "gptflow"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
"""The experiment tag holding the saved view gptflow's addresses open (``VIEW_KEY`` in them)."""
RUN_NAME_COLUMN = "attributes.`Run Name`"
RUN_NAME_WIDTH = 380
"""Pixels: wide enough for a run name's first differing settings, the flow and the preset
(``tasks.tracking.naming.run_name``); MLflow's default, about 190, shows the first setting alone."""
VALUE_WIDTH = 150
"""Pixels: a param's or metric's column, wide enough for its name (``eval/bits_per_byte``)."""


@dataclass(frozen=True)
class RunsView:
    """A runs table: ``params`` and ``metrics`` as columns, in that order, then MLflow's
    ``attributes`` columns (``Models``: the run's logged and registered models; ``Dataset``: its
    data); sorted by ``lowest_first`` (a metric) when given, else newest first (MLflow's default)."""

    name: str
    metrics: tuple[str, ...]
    params: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ("Models",)
    lowest_first: str | None = None

    def value_columns(self) -> list[str]:
        return [f"params.`{key}`" for key in self.params] + [f"metrics.`{key}`" for key in self.metrics]

    def state(self) -> dict[str, object]:
        """The UI state the view restores (what MLflow's *Save view* stores). Its columns come
        right after the run's name and creation time (MLflow shows those two whatever a view
        selects); a width applies only to a column the order names."""
        sort = {"orderByKey": f"metrics.`{self.lowest_first}`", "orderByAsc": True} if self.lowest_first else {}
        columns = [*self.value_columns(), *(f"attributes.`{name}`" for name in self.attributes)]
        widths = {RUN_NAME_COLUMN: RUN_NAME_WIDTH, **dict.fromkeys(self.value_columns(), VALUE_WIDTH)}
        return {**sort, "selectedColumns": columns, "columnOrder": [RUN_NAME_COLUMN, *columns], "columnWidths": widths}

    def tag_value(self) -> str:
        """The value of ``VIEW_TAG``: the envelope MLflow's *Save view* writes."""
        now_ms = int(time.time() * 1000)
        return json.dumps({"name": self.name, "createdAt": now_ms, "updatedAt": now_ms,
                           "state": json.dumps(self.state())})


def runs_table_address(server: str, experiment_id: str) -> str:
    """The experiment's runs table on the MLflow UI at ``server``, opened with gptflow's view."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}&{ML_VIEW}"


def run_address(server: str, experiment_id: str, run_id: str) -> str:
    """A run's page on the MLflow UI at ``server``, in the machine-learning view."""
    return f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{ML_VIEW}"
