"""A run's MLflow writes as JSON operations (what an outbox keeps), and how each is sent."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelInput, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from gptflow.data.commits import CONTENTS_FILE
from gptflow.data.disk_space import reporting_out_of_space
from gptflow.tasks.tracking.experiments import local_path
from gptflow.tasks.tracking.registry import (
    REGISTERED_MODEL_TAG,
    is_pending,
    log_and_register,
    logged_model_id,
    registered_version,
)


class OperationSender:
    """Sends one run's operations to its tracking server; remembers the model versions it registered."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.registered: list[str] = []
        """``name/version`` of each model version this sender registered."""

    def send(self, operation: dict[str, Any]) -> Any:
        match operation["kind"]:
            case "log_batch":
                model_of_run = operation.get("model_of_run")
                model_id = logged_model_id(self.client, model_of_run) if model_of_run else None
                # What a model's metrics were measured on: its page lists it as a dataset it used.
                dataset_name, dataset_digest = (operation.get("dataset") if model_id else None) or (None, None)
                self.client.log_batch(
                    self.run_id,
                    metrics=[Metric(key, value, timestamp, step, model_id=model_id, dataset_name=dataset_name,
                                    dataset_digest=dataset_digest)
                             for key, value, timestamp, step in operation.get("metrics", [])],
                    params=[Param(key, value) for key, value in operation.get("params", [])],
                    tags=[RunTag(key, self._tag_value(key, value)) for key, value in operation.get("tags", [])],
                )
            case "log_artifact":
                path, artifact_path = Path(operation["path"]), operation["artifact_path"]
                with reporting_out_of_space(f"{self.artifact_root}/{artifact_path}" if artifact_path else self.artifact_root):
                    if path.is_dir():
                        self._log_directory(path, artifact_path)
                    else:
                        self.client.log_artifact(self.run_id, str(path), artifact_path)
            case "log_text":
                with reporting_out_of_space(f"{self.artifact_root}/{operation['artifact_file']}"):
                    self.client.log_text(self.run_id, operation["text"], operation["artifact_file"])
            case "log_input":
                self._log_input(operation)
            case "log_model_input":
                model_id = logged_model_id(self.client, operation["model_of_run"])
                if model_id is not None:  # a run logged before runs had logged models holds its model as artifacts
                    self.client.log_inputs(self.run_id, models=[LoggedModelInput(model_id)])
            case "delete_tag":
                self.client.delete_tag(self.run_id, operation["key"])
            case "set_terminated":
                self.client.set_terminated(self.run_id, operation["status"], operation["end_time"])
            case "log_model":
                registered = log_and_register(self.client, self.run_id, operation)
                self.registered.append(registered)
                return registered
            case kind:
                raise ValueError(f"unknown MLflow operation {kind!r}")
        return None

    @functools.cached_property
    def artifact_root(self) -> str:
        """Where the run's artifacts go: a folder for a local store (the workspace's ``mlartifacts/``),
        named in the error when it runs out of space; else a URI."""
        return local_path(self.client.get_run(self.run_id).info.artifact_uri)

    def _log_directory(self, directory: Path, artifact_path: str | None) -> None:
        """The files of ``directory`` but a store directory's integrity record (``contents.json``,
        bookkeeping of the store that a user browsing the run's artifacts has no use for)."""
        for path in sorted(directory.rglob("*")):
            if path.is_file() and path != directory / CONTENTS_FILE:
                folder = path.parent.relative_to(directory).as_posix()
                parts = [part for part in (artifact_path, folder) if part and part != "."]
                self.client.log_artifact(self.run_id, str(path), "/".join(parts) or None)

    def _log_input(self, operation: dict[str, Any]) -> None:
        sources = operation["sources"]
        kinds = {_dataset_source_type(source) for source in sources}
        dataset = Dataset(
            name=operation["name"], digest=operation["digest"],
            source_type=kinds.pop() if len(kinds) == 1 else "mixed",
            source=json.dumps({"uri": sources[0]} if len(sources) == 1 else {"uris": sources}),
            profile=json.dumps(operation["profile"]),
        )
        inputs = [DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, operation["context"])])]
        try:
            self.client.log_inputs(self.run_id, inputs)
        except MlflowException as error:
            # Runs logging the same new dataset at once (a sweep's points) race to insert it
            # into a SQL store; the loser's transaction is rolled back, and finds it now.
            if "UNIQUE constraint failed" not in str(error):
                raise
            self.client.log_inputs(self.run_id, inputs)

    def _tag_value(self, key: str, value: str) -> str:
        # A model registered while the outbox kept this run's writes has its version by now.
        if key == REGISTERED_MODEL_TAG and is_pending(value):
            return registered_version(self.client, value.rpartition("/")[0], self.run_id) or value
        return value


def _dataset_source_type(source: str) -> str:
    """How the MLflow UI names where a corpus source lies, as MLflow's own dataset sources do."""
    if source.startswith("hf:"):
        return "hugging_face"
    scheme, separator, _ = source.partition("://")
    return {"s3": "s3", "gs": "gcs"}.get(scheme, scheme) if separator else "local"
