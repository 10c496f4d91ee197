"""One fine-tuning run of the finetune stage, in this process or across ``torchrun`` ranks.

A ``FinetuneJob`` holds everything a fine-tuning needs as plain JSON, so the finetune task runs it
in-process or hands it to ``torchrun`` (``train.nproc`` > 1), whose every rank runs
``python -m gptflow.tasks.stages.finetune_job JOB.json RESULT.json``. Its own module, apart from
``tasks.stages.training_job``, so that the pretrain stage's code (part of its cache key) holds no
fine-tuning code.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptflow.data.finetune_data import read_split
from gptflow.model.config import TrainConfig
from gptflow.model.distributed import Ranks
from gptflow.model.finetune import FinetuneObjective, FinetuneResult, run_finetuning
from gptflow.model.finetune_config import FinetuneConfig
from gptflow.tasks.runtime.torchrun import launch_ranks, run_rank
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.stages.training_job import REPORT_DIR
from gptflow.tasks.tracking.run import PipelineRun
from gptflow.tasks.tracking.training_reporter import TrainingReporter, system_metrics


@dataclass
class FinetuneJob:
    """A fine-tuning (``model.finetune``) as plain JSON: the finetune task runs it, in-process or on
    ``train.nproc`` torchrun ranks."""

    objective: str
    base_dir: str
    labels: list[str]
    finetune_config: dict[str, Any]
    train_config: dict[str, Any]
    prepared_dir: str
    """``data.finetune_data.prepare_examples``' output: the train and val splits."""
    pad_id: int
    max_length: int
    run_dir: str
    workspace: str
    tracking_uri: str
    mlflow_run_id: str
    restart: bool
    """Train from step 0, deleting the run's checkpoints, instead of resuming from the latest one."""

    def run(self, prefect_progress: bool) -> FinetuneResult | None:
        """Fine-tune (this process's rank of it); rank 0 reports to MLflow, writes the loss curve
        beside the model and returns the result, the others None."""
        train_config = TrainConfig(**self.train_config)
        prepared = Path(self.prepared_dir)
        objective = FinetuneObjective(
            Path(self.base_dir), self.objective, self.labels, FinetuneConfig(**self.finetune_config),
            read_split(prepared, "train"), read_split(prepared, "val"), self.pad_id, self.max_length,
        )
        is_main = Ranks.from_environment().is_main
        artifacts = Workspace(Path(self.workspace)).artifacts
        run = PipelineRun.attach(self.workspace, self.tracking_uri, self.mlflow_run_id) if is_main else None
        reporter = TrainingReporter(run, train_config.max_steps, prefect_progress, stage="finetune") if is_main else None
        with system_metrics(run.run_id, self.tracking_uri, None) if run else contextlib.nullcontext():
            result = run_finetuning(objective, train_config, Path(self.run_dir), reporter, resume=not self.restart,
                                    artifacts=artifacts)
        if reporter is None:
            return None
        if result.resumed_from_step is not None:
            run.set_tags({"gptflow.resumed_from_step": result.resumed_from_step})
        reporter.metrics.flush()
        # A retraining's curve replaces the earlier one.
        with artifacts.replace(Path(self.run_dir) / REPORT_DIR) as directory:
            unit = {"sft": "response token", "classification": "example", "tagging": "tagged token"}[self.objective]
            reporter.write_report(directory, f"cross-entropy (nats/{unit})")
        return result

    def run_with_torchrun(self, nproc: int) -> FinetuneResult:
        """Launch ``nproc`` ranks on this machine and wait; their output goes to the run log."""
        result = launch_ranks("finetune", self, nproc, worker_module=__name__)
        classifier_dir = result["classifier_dir"]
        return FinetuneResult(**{**result, "model_dir": Path(result["model_dir"]),
                                 "classifier_dir": Path(classifier_dir) if classifier_dir else None})


if __name__ == "__main__":
    run_rank(FinetuneJob, Path(sys.argv[1]), Path(sys.argv[2]))
