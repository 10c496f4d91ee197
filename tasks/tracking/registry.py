"""Models in MLflow: each trained model logged as a pyfunc model of its run and registered as a new
version of a registered model, tagged with the content hash of its weights so that a later run
whose training was cached finds the version that holds it."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature

from gptflow.data.code_version import PACKAGE, module_file
from gptflow.data.disk_space import reporting_out_of_space
from gptflow.tasks.tracking.experiments import local_path
from gptflow.tasks.tracking.progress import run_logger
from gptflow.tasks.tracking.server import server_unreachable

if TYPE_CHECKING:
    from gptflow.tasks.tracking.run import PipelineRun

GENERATOR_MODULE = "gptflow.tasks.mlflow_models.text_generator"
"""The MLflow model from code of every pretrained model (run from its file, never imported here)."""
WEIGHTS_TAG = "gptflow.weights_hash"
"""On a registered model version: the content hash of the weights it holds."""
MODEL_NAME = "model"
"""The name of every run's logged model: ``runs:/<run id>/model`` resolves to it."""
PURE_LAYERS = ("data", "model")
"""The packages an MLflow model carries: its code imports only these."""
REGISTERED_MODEL_TAG = "gptflow.registered_model"
"""``name/version`` of the model version that holds the model the run trained (or kept)."""
PENDING_VERSION = "pending"
"""The version of a ``name/version`` whose model waits in an outbox to be logged and registered."""


def is_pending(registered_model: str) -> bool:
    """Whether ``registered_model`` (``name/version``) waits in an outbox to be registered."""
    return registered_model.rpartition("/")[2] == PENDING_VERSION


def log_and_register(client: MlflowClient, run_id: str, operation: dict[str, Any]) -> str:
    """Carry out a ``log_model`` operation (``PipelineRun.log_pyfunc_model``): log the model as
    the run's logged model ``model``, register it, and return ``name/version``."""
    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=run_id, model_type="gptflow")
    try:
        with reporting_out_of_space(local_path(logged.artifact_location)), _quiet(logging.getLogger("mlflow.pyfunc")):
            _save_pyfunc_model(
                client, logged.model_id, operation["code_module"],
                {name: Path(path) for name, path in operation["artifacts"].items()},
                operation["example_input"], operation["example_output"], operation["params"],
            )
    except BaseException:
        with contextlib.suppress(Exception):  # the server may be what failed
            client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    client.finalize_logged_model(logged.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    registered_name = operation["registered_name"]
    with contextlib.suppress(MlflowException):  # it exists after the first version
        client.create_registered_model(registered_name)
    # The artifact location, not models:/<id>: MLflow resolves that through the process-wide
    # tracking URI, which need not be this workspace's.
    # A tracking store creates versions at once; waiting (MLflow's default) only logs a line.
    version = client.create_model_version(registered_name, logged.artifact_location, run_id=run_id,
                                          model_id=logged.model_id, await_creation_for=0,
                                          tags={WEIGHTS_TAG: operation["weights_hash"]})
    return f"{registered_name}/{version.version}"


def registered_version(client: MlflowClient, name: str, run_id: str) -> str | None:
    """``name/version`` of the newest version of ``name`` that the run ``run_id`` registered."""
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return f"{name}/{max(int(version.version) for version in versions)}" if versions else None


def version_holding(run: PipelineRun, name: str, weights_hash: str, recorded: str, trained_run_id: str,
                    log_again: Callable[[], str]) -> tuple[str, str]:
    """``(name/version, run id)`` of the registered version that holds the model of
    ``weights_hash``, which a cached result remembers as ``recorded`` from run
    ``trained_run_id``: tagged with its hash, or registered by that run (before versions were
    tagged, or once an outbox sent a pending registration). When the tracking store has lost it
    (its MLflow store deleted or replaced, or its files in the folder of a workspace this one was
    copied from, and that folder deleted), ``run`` logs and registers it again through
    ``log_again``. While the tracking server cannot be reached, what the result remembers."""
    if not run.outbox.is_empty():
        return recorded, trained_run_id
    try:
        versions = run.client.search_model_versions(f"name = '{name}'")
    except Exception as error:
        if not server_unreachable(error):
            raise
        return recorded, trained_run_id
    holding = [version for version in versions if _files_exist(version.source)
               and (version.tags.get(WEIGHTS_TAG) == weights_hash or version.run_id == trained_run_id)]
    if holding:
        version = max(holding, key=lambda version: int(version.version))
        if version.tags.get(WEIGHTS_TAG) != weights_hash:
            run.client.set_model_version_tag(name, version.version, WEIGHTS_TAG, weights_hash)
        return f"{name}/{version.version}", version.run_id
    run_logger().warning(f"MLflow: the tracking store lacks the model {recorded} (was its store replaced or "
                         "deleted, or the workspace it was copied from?); this run logs and registers it again")
    return log_again(), run.run_id


def logged_model_id(client: MlflowClient, run_id: str) -> str | None:
    """The id of the model the run ``run_id`` logged (a run whose training was cached logged none)."""
    outputs = client.get_run(run_id).outputs.model_outputs
    return outputs[0].model_id if outputs else None


def _save_pyfunc_model(
    client: MlflowClient, model_id: str, code_module: str, artifacts: dict[str, Path], example_input: list[str],
    example_output: list[str], params: dict[str, Any] | None,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # Copies of the pure packages, without bytecode caches, travel inside the model as
        # code/gptflow/{data,model}: MLflow puts code/ on sys.path when the model loads.
        package = Path(tmp) / "code" / PACKAGE
        for layer in PURE_LAYERS:
            shutil.copytree(module_file(f"{PACKAGE}.{layer}").parent, package / layer,
                            ignore=shutil.ignore_patterns("__pycache__"))
        saved = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            path=saved,
            python_model=str(module_file(code_module)),
            artifacts={name: str(path) for name, path in artifacts.items()},
            code_paths=[str(package)],
            signature=infer_signature(example_input, example_output, params=params),
            input_example=(example_input, params) if params else example_input,
            pip_requirements=[f"{name}=={metadata.version(name)}"
                              for name in ("torch", "tokenizers", "safetensors", "pyarrow", "numpy", "mlflow")],
        )
        client.log_model_artifacts(model_id, str(saved))


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """``logger`` passes warnings and errors alone while the block runs: ``mlflow.pyfunc`` says
    "Validating input example against model signature" at every model saved, in a log format of
    its own amid a run's lines (gptflow's input examples are its own, and valid)."""
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _files_exist(source: str) -> bool:
    """False when a model version's files were in a local folder that is gone (the workspace its
    store was copied from, deleted); True for a location elsewhere."""
    return not source.startswith("file:") or Path(local_path(source)).exists()
