"""``gptflow import``: a transformers checkpoint (a folder, or a Hugging Face Hub id) as a gptflow
model in the workspace's store, with the checkpoint's own tokenizer, registered in MLflow as
``gptflow-import-<name>``.

The tokenizer keeps every id of the checkpoint's; gptflow's ``<|endoftext|>`` (the document
separator gptflow's data stages and chat template use) and ``<|pad|>`` are added after them when
missing, and the embedding grows by as many rows (``<|endoftext|>``'s a copy of the checkpoint's
end token's, ``<|pad|>``'s zero), so the model computes the checkpoint's logits for its own ids.
The imported model lies under ``store/imports/<key>/`` (``final/`` and ``tokenizer.json``, the
layout of a pretrained run, so the folder is a model source too), keyed by the checkpoint's files, the block size and this code: the
same import twice reuses the first.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from gptflow.data.code_version import code_version
from gptflow.data.commits import copy_file_atomic
from gptflow.data.hashing import hash_file, hash_json
from gptflow.data.store import ArtifactStore
from gptflow.data.tokenizer import EOT_TOKEN, TOKENIZER_FILE, add_special_tokens
from gptflow.model.checkpoint import FINAL_DIR, read_model_config, save_final
from gptflow.model.config import pad_vocab_size
from gptflow.model.gpt import GPT
from gptflow.model.memory import parameter_count
from gptflow.model.transformers_import import (
    CheckpointImportError,
    grow_vocabulary,
    read_checkpoint_config,
    read_transformers_checkpoint,
)
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.tracking.progress import human_count
from gptflow.tasks.tracking.registry import describe_gpt
from gptflow.tasks.tracking.run import pipeline_run

IMPORTS_DIR = "imports"
TOKENIZER_DIR = "tokenizer"
ADDED_TOKENS_FILE = "added_tokens.json"
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "generation_config.json"]
"""What a Hub download fetches: the weights as safetensors, never pickles."""


@dataclass
class ImportedModel:
    source: str
    run_dir: str
    """``final/`` (``model.safetensors`` + ``config.json``) and ``tokenizer.json``."""
    architecture: str
    parameters: int
    added_tokens: list[str]
    registered_model: str
    mlflow_run_id: str
    reused: bool
    """Found in the store from an earlier import of the same checkpoint."""

    @property
    def model_uri(self) -> str:
        return "models:/" + self.registered_model

    def render(self) -> str:
        added = f"; added {', '.join(self.added_tokens)} to its tokenizer" if self.added_tokens else ""
        return "\n".join([
            f"imported {self.source} ({self.architecture}, {human_count(self.parameters)} parameters){added}",
            f"model        {self.model_uri}  (files: {self.run_dir})",
            f"use it       gptflow finetune --model {self.model_uri} · gptflow evaluate --model {self.model_uri} "
            f"· gptflow generate --model {self.model_uri}",
        ])


def import_checkpoint(source: str, workspace: Workspace, revision: str | None = None,
                      block_size: int | None = None) -> ImportedModel:
    """Import the checkpoint ``source`` (a folder, or a Hub id fetched at ``revision``) into the
    workspace and register it; ``block_size`` caps its context (default: the checkpoint's)."""
    directory = _checkpoint_folder(source, revision)
    architecture = read_checkpoint_config(directory).get("architectures", ["?"])[0]
    tokenizer_path = directory / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise CheckpointImportError(
            f"{directory} has no {TOKENIZER_FILE}: gptflow reads fast (Rust) tokenizers; save the checkpoint's with "
            "AutoTokenizer.from_pretrained(...).save_pretrained(folder)"
        )
    files = sorted(path for path in directory.iterdir() if path.is_file() and not path.name.startswith("."))
    key = hash_json({"files": {path.name: hash_file(path) for path in files}, "block_size": block_size,
                     "code": code_version(__name__)})
    run_dir = workspace.store / IMPORTS_DIR / key
    artifacts = workspace.artifacts
    reused = all(artifacts.are_complete([run_dir / FINAL_DIR, run_dir / TOKENIZER_DIR])) and artifacts.pull(
        run_dir / TOKENIZER_FILE)
    if not reused:
        _write_model(directory, tokenizer_path, run_dir, block_size, artifacts)
    added = json.loads((run_dir / TOKENIZER_DIR / ADDED_TOKENS_FILE).read_text())
    final_dir, tokenizer_file = run_dir / FINAL_DIR, run_dir / TOKENIZER_FILE
    config = read_model_config(final_dir)
    with pipeline_run(workspace, "import", tags={"gptflow.flow": "import", "gptflow.import.source": source},
                      name=f"import {_model_name(source)}") as run:
        run.log_params({"source": source, "revision": revision or "", "architecture": architecture,
                        "added_tokens": ",".join(added),
                        **{f"model.{field}": value for field, value in asdict(config).items()}})
        registered = run.log_text_generator(final_dir, tokenizer_file, f"gptflow-import-{_model_name(source)}",
                                            f"Text generator: {describe_gpt(config)}, imported from {source}.")
    return ImportedModel(source, str(run_dir), architecture, parameter_count(config), added, registered, run.run_id,
                         reused)


def _write_model(directory: Path, tokenizer_path: Path, run_dir: Path, block_size: int | None,
                 artifacts: ArtifactStore) -> None:
    """Commit ``final/`` and ``tokenizer/`` (with the list of tokens added) under ``run_dir``."""
    from tokenizers import Tokenizer

    config, weights = read_transformers_checkpoint(directory, block_size)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    own_tokens = tokenizer.get_vocab_size()
    if own_tokens > config.vocab_size:
        raise CheckpointImportError(
            f"{tokenizer_path} has {own_tokens} tokens, more than the {config.vocab_size} embedding rows of the "
            f"model in {directory}: it is another model's tokenizer"
        )
    added = add_special_tokens(tokenizer)
    end_id = _end_token_id(directory, tokenizer)
    copied = {tokenizer.token_to_id(EOT_TOKEN): end_id} if EOT_TOKEN in added and end_id is not None else {}
    config, weights = grow_vocabulary(config, weights, pad_vocab_size(tokenizer.get_vocab_size()), copied)
    model = GPT(config)
    model.load_state_dict({name: tensor.float() for name, tensor in weights.items()})
    save_final(run_dir, model, artifacts)
    with artifacts.commit(run_dir / TOKENIZER_DIR) as tmp:
        tokenizer.save(str(tmp / TOKENIZER_FILE))
        (tmp / ADDED_TOKENS_FILE).write_text(json.dumps(added))
    # Beside final/, where a model source looks for it, as beside a pretrained run's.
    copy_file_atomic(run_dir / TOKENIZER_DIR / TOKENIZER_FILE, run_dir / TOKENIZER_FILE)
    artifacts.share(run_dir / TOKENIZER_FILE)


def _end_token_id(directory: Path, tokenizer) -> int | None:
    """The checkpoint's end-of-sequence id: its config's ``eos_token_id``, or its tokenizer
    config's ``eos_token``."""
    eos = read_checkpoint_config(directory).get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if isinstance(eos, int):
        return eos
    tokenizer_config = directory / "tokenizer_config.json"
    if tokenizer_config.is_file():
        token = json.loads(tokenizer_config.read_text()).get("eos_token")
        token = token.get("content") if isinstance(token, dict) else token
        return tokenizer.token_to_id(token) if token else None
    return None


def _checkpoint_folder(source: str, revision: str | None) -> Path:
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        raise CheckpointImportError(
            f"{source} is neither a folder nor a Hugging Face Hub id (owner/name): pass a transformers checkpoint "
            "folder or a Hub id"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, revision=revision, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:
        raise CheckpointImportError(
            f"{source} is not a folder here, and the Hugging Face Hub cannot be reached (offline, or "
            "HF_HUB_OFFLINE=1): download it where you are online (huggingface-cli download "
            f"{source}) and pass its folder"
        ) from None
    except HfHubHTTPError as error:
        raise CheckpointImportError(f"the Hugging Face Hub has no {source} at revision {revision or 'main'}: {error}") from None


def _model_name(source: str) -> str:
    """A registry-friendly name: the folder's or the Hub id's, lower case, [a-z0-9-] only."""
    raw = source.rstrip("/").replace("/", "-") if not Path(source).expanduser().is_dir() else Path(source).name
    return re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-") or "model"

