"""What every flow's summary shares: the run it describes, how long it took, where to see it, and
the forms a summary takes (the Prefect artifact's table, the lines printed at the end)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prefect.runtime import deployment

from gptflow.tasks.tracking.experiments import experiment_name
from gptflow.tasks.tracking.progress import human_duration, run_logger
from gptflow.tasks.tracking.registry import is_pending
from gptflow.tasks.tracking.run import PipelineRun
from gptflow.tasks.tracking.runs_view import ML_VIEW

INDENT = " " * 12
"""Where a printed summary's values start, after their 12-character labels."""


@dataclass
class FlowSummary:
    run_name: str
    elapsed_s: float
    """Seconds from the flow's start to its summary: the flow run, without what a command does
    before it (importing torch and Prefect, starting Prefect's temporary server) or after."""
    mlflow_run_id: str
    mlflow_view: str
    """``PipelineRun.how_to_view``: the run's address, or the command that serves it."""
    experiment: str
    runs_table: str
    """``PipelineRun.runs_table``: the address of the runs table of ``experiment``, where the run
    compares with the others of its kind."""
    command_s: float | None = field(default=None, kw_only=True)
    """Seconds from the start of the ``gptflow`` command that ran the flow to its summary (which
    Prefect's temporary server, if it started one, then takes a few seconds to stop); None for a
    flow run that no command runs (a deployment's)."""

    def table(self, flow: str, rows: list[str], mlflow_run_url: str | None) -> str:
        """The flow run's Prefect artifact: a two-column table of the run's name, ``rows``, its
        MLflow run and its experiment's runs table (links when a tracking server serves them)."""
        run = f"[{self.mlflow_run_id}]({mlflow_run_url})" if mlflow_run_url else self.mlflow_run_id
        experiment = f"[{self.experiment}]({self.runs_table})" if mlflow_run_url else self.experiment
        return "\n".join([f"# gptflow {flow}", "", "| | |", "|---|---|", f"| run | {self.run_name} |", *rows,
                          f"| MLflow run | {run} |", f"| compare in | {experiment} |"])

    def closing_lines(self, about_the_run: str = "") -> list[str]:
        """The printed summary's last lines: the wall time, since the command began when one ran
        the flow, where to see the run and where to compare it."""
        took = f"{human_duration(self.elapsed_s)} in the flow run"
        if self.command_s is not None:
            took = f"{human_duration(self.command_s)} since the command started, {took}"
        return [f"{'wall time':<12}{took}",
                f"{'mlflow':<12}run {self.mlflow_run_id}{about_the_run}", INDENT + self.mlflow_view,
                f"{'compare':<12}{self.experiment}: {self.runs_table}"]


def model_line(registered_model: str, how_to_use: str) -> str:
    """The printed summary's line naming the registered version of the run's model (``name/version``)
    and ``how_to_use`` it (``{uri}`` stands for its ``models:/`` URI); or, while the run's outbox
    keeps the model, when it will be registered."""
    if is_pending(registered_model):
        return f"{'model':<12}{registered_model}: registered once the run's MLflow outbox is sent (see the warning)"
    uri = f"models:/{registered_model}"
    return f"{'model':<12}{uri}: {how_to_use.format(uri=uri)}"


def model_cell(registered_model: str, mlflow_run_url: str | None) -> str:
    """The registered version of the run's model in a Prefect artifact's table: its ``models:/``
    URI, a link to its page when a tracking server serves it (as plain text: Prefect's UI shows the
    backticks of code inside a link)."""
    uri = f"models:/{registered_model}"
    if mlflow_run_url is None or is_pending(registered_model):
        return f"`{uri}`"
    name, _, version = registered_model.rpartition("/")
    return f"[{uri}]({mlflow_run_url.partition('#')[0]}#/models/{name}/versions/{version}?{ML_VIEW})"


def of_run(run: PipelineRun, elapsed_s: float) -> dict[str, Any]:
    """The ``FlowSummary`` fields of a flow's MLflow run, for its summary's constructor."""
    return {"run_name": run.name, "elapsed_s": elapsed_s, "mlflow_run_id": run.run_id, "mlflow_view": run.how_to_view(),
            "experiment": experiment_name(run.workflow), "runs_table": run.runs_table}


def sample_lines(sample: str, lines: int = 6) -> str:
    """The first ``lines`` lines of a generated sample, as a printed summary shows it."""
    return "sample      " + f"\n{INDENT}".join(sample.strip().splitlines()[:lines])


def end_log_of_deployment_run(summary: str) -> None:
    """End the flow run's log with its printed ``summary`` when a deployment started it: no
    command prints the summary then, and this log is what ``prefect deployment run --watch``
    shows (from a Prefect server that streams logs, as ``gptflow up``'s does) and the flow run's
    page in the UI. Give the summary without generated samples: the watch prints each log line
    as Rich markup, and a sample's stray closing tag (``[/a-z]``) would stop it."""
    if deployment.id is not None:
        run_logger().info(summary)
