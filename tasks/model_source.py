"""The one place a model given by a user (an MLflow model URI, a run id or a directory) is resolved
into what gptflow needs to know about it: a ``ResolvedModel``.

A ``ResolvedModel`` holds the ``model_dir``, its ``config`` (a ``ModelConfig``), its ``tokenizer``
(checked once: it parses, carries gptflow's special tokens and fits the embedding), a
``chat_template`` (``chat_template.json`` beside the tokenizer), a ``classifier_dir`` (a head
beside the trunk) and the ``weights_hash`` (over trunk and head) that keys whatever is computed
from the model. Its ``kind`` is ``language_model``, ``chat_model``, ``classifier`` or ``tagger``;
``require_text_model`` and ``require_head`` word each refusal once; ``load`` and
``load_tokenizer`` give the torch model and the ``tokenizers.Tokenizer``.

An MLflow model is downloaded once into the workspace's ``downloads/`` (an alias every time),
and ``runs:/<id>/<model name>``, ``runs:/<id>/model`` (whatever the model's name, as every model
was named ``model`` before) and run ids resolve through the run's logged model (MLflow 3), falling
back to a run's ``model/`` artifacts for runs logged before. A sharded checkpoint directory
(``.metadata``, no ``model.safetensors``) is read whole once (``model.checkpoint.save_whole_model``)
into ``store/whole-checkpoints/<checkpoint contents hash>/``, which is then its ``model_dir``; its
tokenizer and head are still looked for beside the checkpoint. A folder without gptflow's
``contents.json`` (``model.safetensors`` + ``config.json`` copied by hand), or whose files changed
since gptflow wrote it, is checked by what it holds (``model.model_folder.check_model_folder``)
and copied once into ``store/model-folders/<content hash>/``, its ``model_dir`` from then on.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from tokenizers import Tokenizer

from gptflow.data.chat import CHAT_TEMPLATE_FILE, ChatTemplate
from gptflow.data.commits import atomic_directory, is_complete, read_contents_hash
from gptflow.data.errors import UserError
from gptflow.data.hashing import hash_bytes, hash_file, hash_json
from gptflow.data.tokenizer import TOKENIZER_FILE, TokenizerArtifact, describe_tokenizer, load_tokenizer
from gptflow.model.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    is_sharded_checkpoint,
    load_model,
    read_model_config,
    save_whole_model,
)
from gptflow.model.classifier import CLASSIFIER_DIR, CLASSIFIER_FILE, HEAD_FILE, read_head_settings
from gptflow.model.config import ModelConfig
from gptflow.model.gpt import GPT
from gptflow.model.model_folder import check_model_folder
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.tracking.registry import EARLIER_MODEL_NAME, logged_model_named

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
PINNED_VERSION = re.compile(r"^models:/[^/@]+/\d+$")
# Inside a logged gptflow MLflow model (see tasks/tracking/registry.py).
MLFLOW_MODEL_WEIGHTS = "artifacts/final"
MLFLOW_MODEL_TOKENIZER = "artifacts/tokenizer.json"
MLFLOW_MODEL_CLASSIFIER = f"artifacts/{CLASSIFIER_DIR}"
WHOLE_CHECKPOINTS_DIR = "whole-checkpoints"
"""Under the store: the model of each sharded checkpoint used as a model source, in one file."""
MODEL_FOLDERS_DIR = "model-folders"
"""Under the store: each model folder put together by hand, checked and committed as gptflow's own."""


class ModelSourceError(UserError):
    """The model given cannot be found, is not a gptflow model, or cannot do what was asked of it;
    the message says what to pass."""


ModelKind = Literal["language_model", "chat_model", "classifier", "tagger"]
HEAD_KINDS = {"classification": "classifier", "tagging": "tagger"}
"""The kind of model each head's objective makes."""


@dataclass(frozen=True)
class ResolvedModel:
    """Everything gptflow needs to know about a model, worked out and checked once by
    ``resolve_model``: where its files are, what it is, and the hashes that key what is computed
    from it. Its tokenizer fits its embedding, and its chat template and classifier head load."""

    source: str
    """What the user passed."""
    model_dir: Path
    """``model.safetensors`` + ``config.json``, loadable with ``model.checkpoint.load_model``."""
    config: ModelConfig
    tokenizer: TokenizerArtifact
    """The tokenizer the model was trained with, as the tokenize stage takes it."""
    weights_hash: str
    """Content hash of the weights (and head): the input key of every stage computed from this model."""
    chat_template: ChatTemplate | None = None
    """The conversation format of a model fine-tuned with ``--objective sft``."""
    classifier_dir: Path | None = None
    """A fine-tuned classifier's or tagger's head (``model.classifier.load_classifier`` reads it
    with ``model_dir``); None for a language model."""
    head_objective: str | None = None
    """``classification`` or ``tagging``: what the head was fine-tuned for; None without a head."""

    @property
    def kind(self) -> ModelKind:
        if self.head_objective is not None:
            return HEAD_KINDS[self.head_objective]
        return "chat_model" if self.chat_template is not None else "language_model"

    @property
    def tokenizer_file(self) -> Path:
        return Path(self.tokenizer.path)

    @property
    def tokenizer_hash(self) -> str:
        return self.tokenizer.hash

    def require_text_model(self, command: str) -> None:
        """Refuse a classifier or tagger for ``command``, which needs a model that writes text."""
        if self.head_objective is not None:
            option = f"--{self.head_objective}"
            raise ModelSourceError(
                f"{self.source} is a {self.kind}: it labels texts rather than writing them, so {command} does not "
                f"apply. Score it with `gptflow evaluate --model {self.source} {option} FILE`, or label "
                "texts with mlflow.pyfunc.load_model(...).predict([...])."
            )

    def require_head(self, objective: str) -> None:
        """Refuse any model but one fine-tuned for ``objective`` (``classification`` or ``tagging``)
        for ``--<objective>``, which scores such models."""
        if self.head_objective != objective:
            what = f"a {self.kind}" if self.head_objective else "a language model"
            raise ModelSourceError(
                f"{self.source} is {what}, not a {HEAD_KINDS[objective]}: --{objective} scores models fine-tuned with "
                f"`gptflow finetune --objective {objective}` (registered as gptflow-finetune-{objective})."
            )

    def load(self, device: torch.device | str = "cpu") -> GPT:
        """The language model (a classifier's trunk), in eval mode on ``device``."""
        return load_model(self.model_dir, device)

    def load_tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_file)


def resolve_model(source: str, workspace: Workspace, tokenizer: str | None = None) -> ResolvedModel:
    """``models:/name/version`` or ``runs:/id/path`` (MLflow model URIs), a 32-hex MLflow run id
    (its logged model, or the model of the run it reused), or a directory holding
    ``model.safetensors`` and ``config.json`` (a checkpoint or ``final/``) or a sharded checkpoint
    (``train.parallelism=fsdp``), whose tokenizer is
    ``tokenizer`` or a ``tokenizer.json`` beside or above it. A classifier is recognised by its
    head: ``classifier/`` in the MLflow model, or beside the directory; a chat model by the
    ``chat_template.json`` beside its tokenizer."""
    if source.startswith(("models:/", "runs:/")):
        return _from_mlflow_model(source, _download(source, workspace))
    if RUN_ID.match(source):
        return _from_mlflow_model(source, _download(_model_uri_of_run(source, workspace), workspace))
    directory = Path(source).expanduser()
    if directory.is_dir():
        return _from_directory(source, directory, tokenizer, workspace)
    raise ModelSourceError(
        f"Model {source!r} is neither an MLflow model URI (models:/name/version, runs:/<run id>/model), an "
        "MLflow run id, nor a directory with model.safetensors and config.json."
    )


def _from_mlflow_model(source: str, downloaded: Path) -> ResolvedModel:
    model_dir, tokenizer_file = downloaded / MLFLOW_MODEL_WEIGHTS, downloaded / MLFLOW_MODEL_TOKENIZER
    if not (model_dir / WEIGHTS_FILE).exists() or not tokenizer_file.exists():
        raise ModelSourceError(f"{source} is an MLflow model but not one gptflow logged (no {MLFLOW_MODEL_WEIGHTS}).")
    return _resolved(source, model_dir, tokenizer_file, downloaded / MLFLOW_MODEL_CLASSIFIER)


def _from_directory(source: str, directory: Path, tokenizer: str | None, workspace: Workspace) -> ResolvedModel:
    model_dir = directory
    if is_sharded_checkpoint(directory) and (directory / CONFIG_FILE).exists():
        # Everything downstream reads one model.safetensors: the shards are gathered into one,
        # once per checkpoint content, in the workspace's store.
        model_dir = workspace.store / WHOLE_CHECKPOINTS_DIR / read_contents_hash(directory)
        if not workspace.artifacts.is_complete(model_dir):
            save_whole_model(directory, model_dir, workspace.artifacts)
    elif not (directory / WEIGHTS_FILE).exists() or not (directory / CONFIG_FILE).exists():
        raise ModelSourceError(f"{directory} holds no {WEIGHTS_FILE} and {CONFIG_FILE}: point at a checkpoint "
                               "directory or a run's final/ directory.")
    elif not is_complete(directory):  # put together by hand, or changed since gptflow wrote it
        model_dir = _committed_model_folder(source, directory, workspace)
    if tokenizer is not None:
        tokenizer_file = Path(tokenizer).expanduser()
    else:
        nearby = [folder / TOKENIZER_FILE for folder in (directory, directory.parent, directory.parent.parent)]
        tokenizer_file = next((path for path in nearby if workspace.artifacts.pull(path)), nearby[0])
    if not tokenizer_file.is_file():
        raise ModelSourceError(f"No {TOKENIZER_FILE} found beside {directory} or above it: pass the tokenizer "
                               "the model was trained with (--tokenizer PATH).")
    return _resolved(source, model_dir, tokenizer_file, directory.parent / CLASSIFIER_DIR)


def _committed_model_folder(source: str, directory: Path, workspace: Workspace) -> Path:
    """A model folder without gptflow's ``contents.json`` (or whose files changed since), checked
    by what it holds and copied into the store once per content, committed as gptflow commits its
    own: everything that loads a model then reads it as it reads a run's ``final/``."""
    check_model_folder(directory, _model_config(source, directory))
    content = hash_json([hash_file(directory / WEIGHTS_FILE), hash_file(directory / CONFIG_FILE)])
    model_dir = workspace.store / MODEL_FOLDERS_DIR / content
    if not workspace.artifacts.is_complete(model_dir):
        with workspace.artifacts.commit(model_dir) as tmp:
            for name in (WEIGHTS_FILE, CONFIG_FILE):
                shutil.copyfile(directory / name, tmp / name)
    return model_dir


def _model_config(source: str, model_dir: Path) -> ModelConfig:
    try:
        return read_model_config(model_dir)
    except (OSError, ValueError, TypeError) as error:
        raise ModelSourceError(f"{model_dir / CONFIG_FILE} of {source} is not a gptflow model config: {error}") from None


def _resolved(source: str, model_dir: Path, tokenizer_file: Path, classifier_dir: Path) -> ResolvedModel:
    config = _model_config(source, model_dir)
    try:
        tokenizer = describe_tokenizer(tokenizer_file)
    except Exception as error:  # tokenizers raises a bare Exception for a file it cannot parse
        raise ModelSourceError(f"Cannot use the tokenizer {tokenizer_file} of {source}: {error}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelSourceError(
            f"The tokenizer {tokenizer_file} has {tokenizer.vocab_size} tokens, more than the {config.vocab_size} "
            f"embedding rows of the model {source}: pass the tokenizer the model was trained with (--tokenizer)."
        )
    template_file = tokenizer_file.with_name(CHAT_TEMPLATE_FILE)
    try:
        chat_template = ChatTemplate.load(template_file) if template_file.is_file() else None
    except (ValueError, TypeError) as error:
        raise ModelSourceError(f"{template_file} of {source} is not a gptflow chat template: {error}") from None
    weights_hash = _contents_hash(model_dir, WEIGHTS_FILE)
    if not (classifier_dir / CLASSIFIER_FILE).is_file():
        return ResolvedModel(source, model_dir, config, tokenizer, weights_hash, chat_template)
    # The same hash as the fine-tuning stage gives the classifier it trained.
    weights_hash = hash_json([weights_hash, _contents_hash(classifier_dir, HEAD_FILE, CLASSIFIER_FILE)])
    head_objective = read_head_settings(classifier_dir)["objective"]
    return ResolvedModel(source, model_dir, config, tokenizer, weights_hash, chat_template, classifier_dir,
                         head_objective)


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
    return f"runs:/{trained_in}/{EARLIER_MODEL_NAME}"


def _artifact_location(uri: str, workspace: Workspace) -> str:
    """Where the files of a ``models:/`` or ``runs:/`` URI lie, looked up in the workspace's tracking
    store and registry (MLflow's own resolution would use the process-wide URIs)."""
    client = MlflowClient(workspace.tracking_uri, registry_uri=workspace.tracking_uri)
    if uri.startswith("runs:/"):
        run_id, _, path = uri.removeprefix("runs:/").partition("/")
        # The run's logged model (MLflow 3) of that name, or whatever its name under the name every
        # model had before; a run logged before gptflow used logged models holds it as artifacts.
        model = logged_model_named(client, run_id, path)
        return model.artifact_location if model is not None else uri
    name, _, version = uri.removeprefix("models:/").partition("/")
    if version:
        return client.get_model_version(name, version).source
    name, _, alias = name.partition("@")
    return client.get_model_version_by_alias(name, alias).source


def _download(uri: str, workspace: Workspace) -> Path:
    """The model's files in the workspace; a URI that names fixed content (a run's artifact, a
    model version number) is fetched once, an alias (``models:/name@champion``) every time. Kept on
    this machine only, outside the store: the tracking server holds them for every machine."""
    target = workspace.root / "downloads" / hash_bytes(uri.encode())
    pinned = uri.startswith("runs:/") or PINNED_VERSION.match(uri)
    if pinned and is_complete(target):
        return _model_root(target)
    shutil.rmtree(target, ignore_errors=True)
    try:
        source = _artifact_location(uri, workspace)
        with atomic_directory(target) as tmp:
            mlflow.artifacts.download_artifacts(source, dst_path=str(tmp), tracking_uri=workspace.tracking_uri)
    except MlflowException as error:
        raise ModelSourceError(f"Cannot fetch {uri} from {workspace.tracking_uri}: {error.message}") from None
    return _model_root(target)


def _model_root(downloaded: Path) -> Path:
    """The folder holding ``MLmodel`` (MLflow downloads an artifact folder into one of its name)."""
    return next((path.parent for path in downloaded.rglob("MLmodel")), downloaded)
