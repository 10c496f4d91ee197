"""What every flow's summary shares: the run it describes, how long it took, where to see it, and
the forms a summary takes (the Prefect artifact's table, the lines printed at the end)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gptflow.tasks.tracking.experiments import experiment_name
from gptflow.tasks.tracking.progress import human_duration
from gptflow.tasks.tracking.run import PipelineRun

INDENT = " " * 12
"""Where a printed summary's values start, after their 12-character labels."""


@dataclass
class FlowSummary:
    run_name: str
    elapsed_s: float
    mlflow_run_id: str
    mlflow_view: str
    """``PipelineRun.how_to_view``: the run's address, or the command that serves it."""
    experiment: str
    runs_table: str
    """``PipelineRun.runs_table``: the address of the runs table of ``experiment``, where the run
    compares with the others of its kind."""

    def table(self, flow: str, rows: list[str], mlflow_run_url: str | None) -> str:
        """The flow run's Prefect artifact: a two-column table of the run's name, ``rows``, its
        MLflow run and its experiment's runs table (links when a tracking server serves them)."""
        run = f"[{self.mlflow_run_id}]({mlflow_run_url})" if mlflow_run_url else self.mlflow_run_id
        experiment = f"[{self.experiment}]({self.runs_table})" if mlflow_run_url else self.experiment
        return "\n".join([f"# gptflow {flow}", "", "| | |", "|---|---|", f"| run | {self.run_name} |", *rows,
                          f"| MLflow run | {run} |", f"| compare in | {experiment} |"])

    def closing_lines(self, about_the_run: str = "") -> list[str]:
        """The printed summary's last lines: the wall time, where to see the run and where to
        compare it."""
        return [f"{'wall time':<12}{human_duration(self.elapsed_s)}",
                f"{'mlflow':<12}run {self.mlflow_run_id}{about_the_run}", INDENT + self.mlflow_view,
                f"{'compare':<12}{self.experiment}: {self.runs_table}"]


def of_run(run: PipelineRun, elapsed_s: float) -> dict[str, Any]:
    """The ``FlowSummary`` fields of a flow's MLflow run, for its summary's constructor."""
    return {"run_name": run.name, "elapsed_s": elapsed_s, "mlflow_run_id": run.run_id, "mlflow_view": run.how_to_view(),
            "experiment": experiment_name(run.workflow), "runs_table": run.runs_table}


def sample_lines(sample: str, lines: int = 6) -> str:
    """The first ``lines`` lines of a generated sample, as a printed summary shows it."""
    return "sample      " + f"\n{INDENT}".join(sample.strip().splitlines()[:lines])
