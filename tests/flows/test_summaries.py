"""What every printed summary ends with: how long the run took, said precisely, and where to see it."""

from __future__ import annotations

import dataclasses

from gptflow.flows.summaries import FlowSummary


def test_the_wall_time_says_what_it_measures():
    summary = FlowSummary(run_name="pretrain tiny", elapsed_s=38.4, mlflow_run_id="abc", mlflow_view="http://mlflow")
    # A flow run no command ran (a deployment's): the flow run alone.
    assert summary.closing_lines()[0] == "wall time   38s in the flow run"
    # The command ran longer: it imported torch and Prefect, and started Prefect's temporary server.
    ran_by_command = dataclasses.replace(summary, command_s=60.2)
    assert ran_by_command.closing_lines() == ["wall time   1m00s since the command started, 38s in the flow run",
                                              "mlflow      run abc", "            http://mlflow"]
