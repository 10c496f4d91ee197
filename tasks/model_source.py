"""Where a trained model comes from: an MLflow model URI, an MLflow run id, or a directory.

Fine-tuning, evaluation, export and generation all start from "a pretrained gptflow model" given
in one of those forms; ``resolve_model`` turns each into local files (weights + config and the
tokenizer) and a content hash that keys the stages computed from it.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from gptflow.data.store import atomic_directory, hash_bytes, hash_file, hash_json, is_complete, read_contents_hash
from gptflow.data.tokenizer import TOKENIZER_FILE
from gptflow.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from gptflow.model.classifier import CLASSIFIER_FILE, HEAD_FILE
from gptflow.model.finetune import CLASSIFIER_DIR
from gptflow.tasks.workspace import Workspace

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
PINNED_VERSION = re.compile(r"^models:/[^/@]+/\d+$")
# Inside a logged gptflow MLflow model (see tasks/tracking.py: log_text_generator).
MLFLOW_MODEL_WEIGHTS = "artifacts/final"
MLFLOW_MODEL_TOKENIZER = "artifacts/tokenizer.json"
MLFLOW_MODEL_CLASSIFIER = f"artifacts/{CLASSIFIER_DIR}"


class ModelSourceError(ValueError):
    """The model given cannot be found or is not a gptflow model; the message says what to pass."""


@dataclass(frozen=True)
class ResolvedModel:
    source: str
    """What the user passed."""
    model_dir: Path
    """``model.safetensors`` + ``config.json``, loadable with ``model.checkpoint.load_model``."""
    tokenizer_file: Path
    weights_hash: str
    """Content hash of the weights: the input key of every stage computed from this model."""
    tokenizer_hash: str
    classifier_dir: Path | None = None
    """A fine-tuned classifier's head (``model.classifier.load_classifier`` reads it with
    ``model_dir``); None for a language model."""


def resolve_model(source: str, workspace: Workspace, tokenizer: str | None = None) -> ResolvedModel:
    """``models:/name/version`` or ``runs:/id/path`` (MLflow model URIs), a 32-hex MLflow run id
    (its logged model, or the model of the run it reused), or a directory holding
    ``model.safetensors`` and ``config.json`` (a checkpoint or ``final/``), whose tokenizer is
    ``tokenizer`` or a ``tokenizer.json`` beside or above it. A classifier is recognised by its
    head: ``classifier/`` in the MLflow model, or beside the directory."""
    if source.startswith(("models:/", "runs:/")):
        return _from_mlflow_model(source, _download(source, workspace))
    if RUN_ID.match(source):
        return _from_mlflow_model(source, _download(_model_uri_of_run(source, workspace), workspace))
    directory = Path(source).expanduser()
    if directory.is_dir():
        return _from_directory(source, directory, tokenizer)
    raise ModelSourceError(
        f"Model {source!r} is neither an MLflow model URI (models:/name/version, runs:/<run id>/model), an "
        "MLflow run id, nor a directory with model.safetensors and config.json."
    )


def _from_mlflow_model(source: str, downloaded: Path) -> ResolvedModel:
    model_dir, tokenizer_file = downloaded / MLFLOW_MODEL_WEIGHTS, downloaded / MLFLOW_MODEL_TOKENIZER
    if not (model_dir / WEIGHTS_FILE).exists() or not tokenizer_file.exists():
        raise ModelSourceError(f"{source} is an MLflow model but not one gptflow logged (no {MLFLOW_MODEL_WEIGHTS}).")
    return _resolved(source, model_dir, tokenizer_file, downloaded / MLFLOW_MODEL_CLASSIFIER)


def _from_directory(source: str, directory: Path, tokenizer: str | None) -> ResolvedModel:
    if not (directory / WEIGHTS_FILE).exists() or not (directory / CONFIG_FILE).exists():
        raise ModelSourceError(f"{directory} holds no {WEIGHTS_FILE} and {CONFIG_FILE}: point at a checkpoint "
                               "directory or a run's final/ directory.")
    if tokenizer is not None:
        tokenizer_file = Path(tokenizer).expanduser()
    else:
        nearby = [folder / TOKENIZER_FILE for folder in (directory, directory.parent, directory.parent.parent)]
        tokenizer_file = next((path for path in nearby if path.exists()), nearby[0])
    if not tokenizer_file.is_file():
        raise ModelSourceError(f"No {TOKENIZER_FILE} found beside {directory} or above it: pass the tokenizer "
                               "the model was trained with (--tokenizer PATH).")
    return _resolved(source, directory, tokenizer_file, directory.parent / CLASSIFIER_DIR)


def _resolved(source: str, model_dir: Path, tokenizer_file: Path, classifier_dir: Path) -> ResolvedModel:
    weights_hash = _contents_hash(model_dir, WEIGHTS_FILE)
    if not (classifier_dir / CLASSIFIER_FILE).is_file():
        return ResolvedModel(source, model_dir, tokenizer_file, weights_hash, hash_file(tokenizer_file))
    # The same hash as the fine-tuning stage gives the classifier it trained.
    weights_hash = hash_json([weights_hash, _contents_hash(classifier_dir, HEAD_FILE, CLASSIFIER_FILE)])
    return ResolvedModel(source, model_dir, tokenizer_file, weights_hash, hash_file(tokenizer_file), classifier_dir)


def _contents_hash(directory: Path, *files: str) -> str:
    """The hash the stage that wrote ``directory`` recorded, or, for a directory put together by
    hand, the hash of its ``files``."""
    if is_complete(directory):
        return read_contents_hash(directory)
    return hash_json([hash_file(directory / name) for name in files])


def _model_uri_of_run(run_id: str, workspace: Workspace) -> str:
    client = MlflowClient(workspace.tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ModelSourceError(f"No MLflow run {run_id} in {workspace.tracking_uri}.") from None
    # A run whose training was cached logged no model; the run that trained it did.
    trained_in = run.data.tags.get("gptflow.trained_in_run", run_id)
    return f"runs:/{trained_in}/model"


def _registered_source(uri: str, workspace: Workspace) -> str:
    """The artifact location of ``models:/name/version`` or ``models:/name@alias``, looked up in the
    workspace's registry (MLflow's own resolution would use the process-wide registry URI)."""
    client = MlflowClient(workspace.tracking_uri, registry_uri=workspace.tracking_uri)
    name, _, version = uri.removeprefix("models:/").partition("/")
    if version:
        return client.get_model_version(name, version).source
    name, _, alias = name.partition("@")
    return client.get_model_version_by_alias(name, alias).source


def _download(uri: str, workspace: Workspace) -> Path:
    """The model's files in the workspace; a URI that names fixed content (a run's artifact, a
    model version number) is fetched once, an alias (``models:/name@champion``) every time."""
    target = workspace.root / "downloads" / hash_bytes(uri.encode())
    pinned = uri.startswith("runs:/") or PINNED_VERSION.match(uri)
    if pinned and is_complete(target):
        return _model_root(target)
    shutil.rmtree(target, ignore_errors=True)
    try:
        source = _registered_source(uri, workspace) if uri.startswith("models:/") else uri
        with atomic_directory(target) as tmp:
            mlflow.artifacts.download_artifacts(source, dst_path=str(tmp), tracking_uri=workspace.tracking_uri)
    except MlflowException as error:
        raise ModelSourceError(f"Cannot fetch {uri} from {workspace.tracking_uri}: {error.message}") from None
    return _model_root(target)


def _model_root(downloaded: Path) -> Path:
    """The folder holding ``MLmodel`` (MLflow downloads an artifact folder into one of its name)."""
    return next((path.parent for path in downloaded.rglob("MLmodel")), downloaded)
