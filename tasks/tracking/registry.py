"""Models in MLflow: each trained model logged as a pyfunc model of its run and registered as a new
version of a registered model, tagged with the content hash of its weights so that a later run
whose training was cached finds the version that holds it.

A logged model is named as its registered model (``gptflow-tiny``, ``gptflow-finetune-classification``),
described in one line by the stage that trained it (the model page's and the version's
description), and carries the settings that made it as params (``model_params``); the metrics its
run's evaluation measured are attached to it with the dataset they were measured on
(``tasks.tracking.run.PipelineRun.log_metrics``)."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
from mlflow import MlflowClient
from mlflow.entities import LoggedModel, LoggedModelOutput
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS, MLFLOW_RUN_NOTE

from gptflow.data.code_version import PACKAGE, module_file
from gptflow.data.disk_space import reporting_out_of_space
from gptflow.data.errors import UserError
from gptflow.model.config import ModelConfig
from gptflow.model.memory import parameter_count
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.settings import PRESETS
from gptflow.tasks.tracking.experiments import local_path
from gptflow.tasks.tracking.progress import human_count, run_logger
from gptflow.tasks.tracking.server import server_unreachable

if TYPE_CHECKING:
    from gptflow.tasks.tracking.run import PipelineRun

GENERATOR_MODULE = "gptflow.tasks.mlflow_models.text_generator"
"""The MLflow model from code of every pretrained model (run from its file, never imported here)."""
WEIGHTS_TAG = "gptflow.weights_hash"
"""On a registered model version: the content hash of the weights it holds."""
EARLIER_MODEL_NAME = "model"
"""What every logged model was named before models were named after what they are:
``runs:/<run id>/model`` still finds a run's model, whatever its name (``tasks.model_source``)."""
MODEL_SETTING_SECTIONS = ("model.", "train.", "finetune.", "dataset.")
"""The sections of its run's params a logged model carries, besides the top-level ones (preset,
corpus, objective, base model): what made it, not how it was evaluated or its data read."""
PURE_LAYERS = ("data", "model")
"""The packages an MLflow model carries: its code imports only these."""
REGISTERED_MODEL_TAG = "gptflow.registered_model"
"""``name/version`` of the model version that holds the model the run trained (or kept)."""
PENDING_VERSION = "pending"
"""The version of a ``name/version`` whose model waits in an outbox to be logged and registered."""


def describe_gpt(config: ModelConfig) -> str:
    """``a GPT of 1.2M parameters (2 layers, 128 wide, 128-token context)``: a model's shape, for its description."""
    return (f"a GPT of {human_count(parameter_count(config))} parameters ({config.n_layer} layers, "
            f"{config.n_embd} wide, {config.block_size}-token context)")


def pretrained_description(config: ModelConfig, steps: int, tokens_seen: int) -> str:
    """The one line that describes a pretrained model in MLflow (its logged model and registered version)."""
    return f"Text generator: {describe_gpt(config)}, pretrained for {steps} steps on {human_count(tokens_seen)} tokens."


def finetuned_description(objective: str, base_model: str, labels: list[str], lora_rank: int, steps: int) -> str:
    """The one line that describes a fine-tuned model in MLflow: what it does, with which labels,
    from which base model, and how it was tuned."""
    how = f"{f'LoRA rank {lora_rank}' if lora_rank else 'full fine-tune'}, {steps} steps"
    shown = ", ".join(labels[:4]) + (f" and {len(labels) - 4} more" if len(labels) > 4 else "")
    if objective == "classification":
        return f"Classifier into {len(labels)} labels ({shown}): {base_model} fine-tuned with a linear head ({how})."
    if objective == "tagging":
        return (f"Span tagger of {len(labels)} labels ({shown}): {base_model} fine-tuned with a head on every token "
                f"({how}).")
    return f"Chat model: {base_model} fine-tuned to answer prompts ({how})."


def pretrained_model_name(preset: str) -> str:
    """The registered (and logged) model name of what ``gptflow pretrain --preset <preset>`` trains."""
    return f"gptflow-{preset}"


class NoPretrainedModel(UserError):
    """No model was given, and the registry holds none that ``gptflow pretrain`` trained."""


def default_base_model(workspace: Workspace) -> tuple[str, str]:
    """The newest version of any model ``gptflow pretrain`` registered (``gptflow-<preset>``) in
    the workspace's registry, as a ``models:/`` URI, and a line saying which model it is and what
    else could be chosen; ``NoPretrainedModel``, naming the models registered there, when there is none."""
    # The first client of a SQLite store creates its tables: not twice at once (as pipeline_run).
    with workspace.lock("mlflow-store"):
        client = MlflowClient(workspace.tracking_uri, registry_uri=workspace.tracking_uri)
    versions = client.search_model_versions()
    pretrained_names = {pretrained_model_name(preset) for preset in PRESETS}
    pretrained = [version for version in versions if version.name in pretrained_names]
    if not pretrained:
        newest_of_others = _newest_of_each(versions)
        listed = f" Models registered there: {', '.join(newest_of_others)}." if newest_of_others else ""
        raise NoPretrainedModel(
            f"No --model given, and no pretrained model (gptflow-<preset>) is registered in {workspace.tracking_uri}. "
            f"Train one first with `gptflow pretrain` (about 5 minutes on 2 CPU cores), or pass --model: an MLflow "
            f"model URI, a run id or a model directory.{listed}"
        )
    newest = max(pretrained, key=lambda version: (version.creation_timestamp, int(version.version)))
    uri = f"models:/{newest.name}/{newest.version}"
    trained_by = client.get_run(newest.run_id).info.run_name if newest.run_id else "an unknown run"
    registered_at = time.strftime("%Y-%m-%d %H:%M", time.localtime(newest.creation_timestamp / 1000))
    others = [name for name in _newest_of_each(pretrained) if name != f"{newest.name}/{newest.version}"]
    choices = f"; also registered: {', '.join(others)}" if others else ""
    return uri, (f"no --model given: fine-tuning {uri}, the newest pretrained model (run \"{trained_by}\", registered "
                 f"{registered_at}){choices}. --model picks another.")


def _newest_of_each(versions: list[ModelVersion]) -> list[str]:
    """``name/version`` of the newest version of each registered model among ``versions``, by name."""
    newest: dict[str, int] = {}
    for version in versions:
        newest[version.name] = max(newest.get(version.name, 0), int(version.version))
    return [f"{name}/{number}" for name, number in sorted(newest.items())]


def is_pending(registered_model: str) -> bool:
    """Whether ``registered_model`` (``name/version``) waits in an outbox to be registered."""
    return registered_model.rpartition("/")[2] == PENDING_VERSION


def log_and_register(client: MlflowClient, run_id: str, operation: dict[str, Any]) -> str:
    """Carry out a ``log_model`` operation (``PipelineRun.log_pyfunc_model``): log the model as a
    logged model of the run, named, described and with params, register it, and return
    ``name/version``."""
    run = client.get_run(run_id)
    registered_name = operation["registered_name"]
    # An outbox written by a gptflow that did not describe its models has no description.
    description = operation.get("description", "")
    logged = client.create_logged_model(
        run.info.experiment_id, name=registered_name, source_run_id=run_id, model_type="gptflow",
        params=model_params(run.data.params, operation["weights_hash"]), tags={MLFLOW_RUN_NOTE: description},
    )
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
    with contextlib.suppress(MlflowException):  # it exists after the first version
        client.create_registered_model(registered_name)
    # The artifact location, not models:/<id>: MLflow resolves that through the process-wide
    # tracking URI, which need not be this workspace's.
    # A tracking store creates versions at once; waiting (MLflow's default) only logs a line.
    version = client.create_model_version(registered_name, logged.artifact_location, run_id=run_id,
                                          model_id=logged.model_id, await_creation_for=0,
                                          tags={WEIGHTS_TAG: operation["weights_hash"]}, description=description)
    # The logged model's page lists the versions this tag names: a tracking server sets it, a
    # tracking store reached directly (the workspace's SQLite) does not.
    if MLFLOW_MODEL_VERSIONS not in client.get_logged_model(logged.model_id).tags:
        versions = [{"name": registered_name, "version": version.version}]
        client.set_logged_model_tags(logged.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(versions)})
    return f"{registered_name}/{version.version}"


def model_params(run_params: dict[str, str], weights_hash: str) -> dict[str, str]:
    """What a logged model carries as params: its run's top-level params and those of
    ``MODEL_SETTING_SECTIONS`` (logged before the model, as every flow logs its settings first),
    and the content hash of its weights, whole."""
    chosen = {name: value for name, value in run_params.items()
              if "." not in name or name.startswith(MODEL_SETTING_SECTIONS)}
    return {**chosen, "weights_hash": weights_hash}


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


def logged_model_named(client: MlflowClient, run_id: str, name: str) -> LoggedModel | None:
    """The model the run ``run_id`` logged as ``name``, or as any name for ``EARLIER_MODEL_NAME``;
    None when it logged none so named."""
    models = [client.get_logged_model(output.model_id) for output in client.get_run(run_id).outputs.model_outputs]
    return next((model for model in models if model.name == name or name == EARLIER_MODEL_NAME), None)


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
