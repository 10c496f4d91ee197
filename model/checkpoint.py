"""Training checkpoints and the exported model, as atomically committed directories.

Layout under a run directory::

    checkpoints/step-00000250/
        model.safetensors   weights (the tied embedding / output matrix stored once)
        config.json         ModelConfig
        optimizer.pt        optimizer state (AdamW, or Muon + AdamW), tensors and plain values
                            only (loaded weights_only)
        trainer.json        step, tokens seen, data seed, TrainConfig, validation before step 1
        contents.json       written by data.commits.atomic_directory
    checkpoints/step-00000500/    (written by train.parallelism=fsdp on several ranks)
        .metadata, __R_0.distcp   torch.distributed.checkpoint: every rank's shards of the weights
                                  and AdamW state, loadable at any world size, sharded or not
        config.json, trainer.json, contents.json    as above
    final/
        model.safetensors
        config.json
        contents.json

A checkpoint holds whatever model trains: a GPT, or a GPT with LoRA adapters or a task head
(fine-tuning), whose ``config`` is its GPT's; its weights load into that same architecture.

Each directory is filled under a ``.tmp-*`` name and renamed into place when complete (for a
sharded checkpoint, by rank 0 once every rank has written its shards into it), so a
process killed at any moment leaves either a loadable checkpoint or debris that nothing reads; a
write that runs out of space removes the temporary directory and raises
``data.disk_space.OutOfSpaceError`` naming the checkpoint. A sharded checkpoint goes through
``torch.distributed.checkpoint``: rank 0 opens the directory and sends its temporary name to the
other ranks, every rank writes its shards there, and rank 0 adds ``config.json`` and
``trainer.json`` and commits once ``dcp.save`` has returned (after the last shard and the
``.metadata`` index), so the commit stays one rename.

``load_checkpoint`` tells the two layouts apart by ``.metadata``, re-hashes every listed file it
reads, and loads either layout into either model: a sharded checkpoint is resharded to the
current world size (or read whole by a model that is not sharded), a whole one is split into
shards (its optimizer state renamed from positions to parameter names). So a training resumes at
any world size. Checkpoints are listed through the ``ArtifactStore`` (on an object-store workspace,
those only the store holds too), so a run resumes or continues on another machine.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import safetensors.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from gptflow.data.commits import remove_stale_temporaries, write_json_atomic
from gptflow.data.store import LOCAL_STORE, ArtifactStore
from gptflow.model.config import ModelConfig
from gptflow.model.distributed import is_sharded
from gptflow.model.gpt import GPT

CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.pt"
TRAINER_FILE = "trainer.json"
SHARDED_METADATA_FILE = ".metadata"  # torch.distributed.checkpoint's index of the shards
CHECKPOINT_NAME = re.compile(r"^step-(\d{8})$")


@dataclass
class TrainerState:
    """Where training stands after ``step`` optimizer steps."""

    step: int
    tokens_seen: int
    data_seed: int
    train_config: dict[str, Any]
    initial_val: dict[str, float] = field(default_factory=dict)
    """Validation metrics before the first step, where the objective takes them (fine-tuning)."""
    sequences_seen: int | None = None
    """Sequences (training windows, examples) consumed over all ranks: the position in the data
    that a resumed run continues from, at any world size. None in checkpoints written before it
    was recorded: ``step`` global batches."""


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"step-{step:08d}"


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainerState,
                    artifacts: ArtifactStore = LOCAL_STORE) -> Path:
    """Commit a checkpoint of ``state.step`` to ``artifacts``; returns its directory."""
    path = checkpoint_path(run_dir, state.step)
    with artifacts.commit(path) as tmp:
        _save_model_files(model, tmp)
        with open(tmp / OPTIMIZER_FILE, "wb") as file:
            save_to_file(optimizer.state_dict(), file)
        write_json_atomic(tmp / TRAINER_FILE, asdict(state))
    return path


def save_to_file(state: dict[str, Any], file: BinaryIO) -> None:
    """``torch.save`` through a Python file: torch's own writer reports a failed write (a full disk)
    without its errno, while this one keeps the OSError as the context of torch's error. A SIGTERM
    or Ctrl-C whose handler raises during a write becomes torch's RuntimeError as well: it is raised
    again as itself, so that the run ends stopped (KILLED), not failed."""
    try:
        torch.save(state, file)
    except RuntimeError as error:
        interruption = error.__context__
        if interruption is not None and not isinstance(interruption, Exception):
            raise interruption from None
        raise


def save_sharded_checkpoint(
    run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainerState, is_main: bool,
    artifacts: ArtifactStore = LOCAL_STORE,
) -> Path:
    """Commit a checkpoint of ``state.step`` of a model sharded over the ranks; every rank calls
    this. Each writes its own shards into one temporary directory, which rank 0 commits once all
    are written, so a kill at any moment still leaves no partial checkpoint."""
    path = checkpoint_path(run_dir, state.step)
    shards = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    if not is_main:
        dcp.save(shards, checkpoint_id=_directory_of_rank_0(None))
        return path
    with artifacts.commit(path) as tmp:
        _directory_of_rank_0(tmp)
        # Returns on every rank once rank 0 has written the index, after all shards are written.
        dcp.save(shards, checkpoint_id=tmp)
        write_json_atomic(tmp / CONFIG_FILE, asdict(model.config))
        write_json_atomic(tmp / TRAINER_FILE, asdict(state))
    return path


def _directory_of_rank_0(directory: Path | None) -> Path:
    """Rank 0's ``directory`` on every rank: the temporary name is random, so it is sent."""
    sent = [str(directory) if directory is not None else None]
    dist.broadcast_object_list(sent, src=0)
    return Path(sent[0])


def checkpoint_directories(run_dir: Path, artifacts: ArtifactStore = LOCAL_STORE) -> list[Path]:
    """Committed checkpoints of a run, oldest first, with any whose files were altered or whose
    record was discarded since (``load_checkpoint`` says what is wrong with those)."""
    directory = Path(run_dir) / CHECKPOINTS_DIR
    return [directory / name for name in artifacts.list_folder(directory) if CHECKPOINT_NAME.match(name)]


def list_checkpoints(run_dir: Path, artifacts: ArtifactStore = LOCAL_STORE) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    return [path for path in checkpoint_directories(run_dir, artifacts) if artifacts.is_complete(path)]


def latest_checkpoint(run_dir: Path, artifacts: ArtifactStore = LOCAL_STORE) -> Path | None:
    """The complete checkpoint with the highest step, or None; partial writes are never returned."""
    checkpoints = list_checkpoints(run_dir, artifacts)
    return checkpoints[-1] if checkpoints else None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    artifacts: ArtifactStore = LOCAL_STORE) -> TrainerState:
    """Load weights (and optimizer state, when given) in place; returns the trainer state. Files
    that do not hash to what was written are refused with ``CorruptArtifactError``.

    Either kind of checkpoint loads into either kind of model: a sharded checkpoint (see
    ``save_sharded_checkpoint``) is resharded to this run's world size, or read whole by a model
    that is not sharded; a whole one is split into the shards of a sharded model.
    """
    path = Path(path)
    sharded_checkpoint = is_sharded_checkpoint(path)
    # Resuming or continuing reads the whole checkpoint anyway: re-hashing it first is cheap, and
    # catches bytes altered behind an unchanged size and mtime, which is_complete lets through.
    if sharded_checkpoint:
        artifacts.verify(path)
    else:
        artifacts.verify(path, (WEIGHTS_FILE, CONFIG_FILE, TRAINER_FILE, *((OPTIMIZER_FILE,) if optimizer else ())))
    saved_config = read_model_config(path)
    if saved_config != model.config:
        raise ValueError(
            f"checkpoint {path} was written by a model with config {saved_config}, which differs from "
            f"{model.config}: resume with the original model config, or start a new run"
        )
    if sharded_checkpoint:
        _load_sharded(path, model, optimizer)
    elif is_sharded(model):
        _load_whole_into_shards(path, model, optimizer)
    else:
        _load_weights(model, path)
        if optimizer is not None:
            optimizer.load_state_dict(_read_optimizer_state(path))
    return TrainerState(**json.loads((path / TRAINER_FILE).read_text()))


def _read_optimizer_state(path: Path) -> dict[str, Any]:
    # weights_only: the file holds tensors and plain values; refusing pickled code means a
    # tampered checkpoint cannot run anything on load.
    return torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)


def _load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(
            f"checkpoint {path} was written by train.parallelism=fsdp, which trains with AdamW: resume it "
            "with train.optimizer=adamw"
        )
    # The state dicts of this model and optimizer say which shard (or whole tensor) each rank
    # holds; torch.distributed.checkpoint reads just that from the saved shards.
    shards: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        shards["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.load(shards, checkpoint_id=path)
    set_model_state_dict(model, shards["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, shards["optimizer"])


def _load_whole_into_shards(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a checkpoint of a whole model into a sharded one: each rank reads it all, keeps its shards."""
    weights = safetensors.torch.load_file(path / WEIGHTS_FILE)
    # The file holds a tied tensor once (save_model); the state dict names it under each of its names.
    names_of: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(parameter), []).append(name)
    for names in names_of.values():
        saved = next((name for name in names if name in weights), None)
        for name in names:
            if saved is not None:
                weights.setdefault(name, weights[saved])
    full = StateDictOptions(full_state_dict=True)
    try:
        set_model_state_dict(model, weights, options=full)
    except RuntimeError as error:  # missing or unexpected keys: another architecture's checkpoint
        raise ValueError(f"checkpoint {path} does not hold this model's weights: {error}") from error
    if optimizer is None:
        return
    saved = _read_optimizer_state(path)
    if set(saved) != {"state", "param_groups"}:
        raise ValueError(
            f"checkpoint {path} holds the state of train.optimizer=muon, which train.parallelism=fsdp cannot "
            "shard: resume it with train.parallelism=ddp"
        )
    # optimizer.pt numbers the parameters in the order of the optimizer's groups; the sharded
    # optimizer lists the same parameters in the same order, and torch names them by module path.
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    name_of = {
        index: names[id(parameter)]
        for saved_group, group in zip(saved["param_groups"], optimizer.param_groups, strict=True)
        for index, parameter in zip(saved_group["params"], group["params"], strict=True)
    }
    by_name = {
        "state": {name_of[index]: value for index, value in saved["state"].items()},
        "param_groups": [{**group, "params": [name_of[index] for index in group["params"]]}
                         for group in saved["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=full)


def prune_checkpoints(run_dir: Path, keep: int, artifacts: ArtifactStore = LOCAL_STORE) -> None:
    """Delete all but the ``keep`` most recent complete checkpoints, plus any left incomplete.

    Temporary directories are removed only once stale, since a recent one may belong to a
    concurrent writer.
    """
    directory = Path(run_dir) / CHECKPOINTS_DIR
    if not directory.is_dir():
        return
    kept = set(list_checkpoints(run_dir, artifacts)[-keep:])
    for path in checkpoint_directories(run_dir, artifacts):
        if path not in kept:
            artifacts.remove_directory(path)
    remove_stale_temporaries(directory)


def save_final(run_dir: Path, model: GPT, artifacts: ArtifactStore = LOCAL_STORE) -> Path:
    """Export the trained model to ``run_dir/final`` (weights + config), replacing an older export:
    a longer or continued run's must replace its earlier one."""
    path = Path(run_dir) / FINAL_DIR
    with artifacts.replace(path) as tmp:
        _save_model_files(model, tmp)
    return path


def is_sharded_checkpoint(directory: Path) -> bool:
    return (Path(directory) / SHARDED_METADATA_FILE).exists()


def save_whole_model(checkpoint: Path, directory: Path, artifacts: ArtifactStore = LOCAL_STORE) -> Path:
    """The model of the sharded ``checkpoint`` as one model directory (``model.safetensors`` +
    ``config.json``, as ``final/``) at ``directory``, committed atomically: its shards are read in
    this one process, whatever the world size that wrote them."""
    model = GPT(read_model_config(checkpoint))
    load_checkpoint(checkpoint, model, artifacts=artifacts)
    with artifacts.commit(Path(directory)) as tmp:
        _save_model_files(model, tmp)
    return Path(directory)


def load_model(directory: Path, device: str | torch.device = "cpu", artifacts: ArtifactStore = LOCAL_STORE) -> GPT:
    """A model from ``final/`` or any checkpoint directory, in eval mode on ``device``; a weights or
    config file that does not hash to what was written is refused with ``CorruptArtifactError``."""
    directory = Path(directory)
    if not artifacts.is_complete(directory):
        raise FileNotFoundError(f"{directory} is not a complete model directory (missing or altered files)")
    # Loading reads every weight anyway: re-hashing them first costs about as much, and catches
    # bytes altered behind an unchanged size and mtime, which is_complete lets through.
    artifacts.verify(directory, (WEIGHTS_FILE, CONFIG_FILE))
    model = GPT(read_model_config(directory))
    _load_weights(model, directory)
    return model.to(device).eval()


def _save_model_files(model: nn.Module, directory: Path) -> None:
    # save_model (unlike save_file) drops the tied duplicate instead of refusing shared tensors.
    safetensors.torch.save_model(model, str(directory / WEIGHTS_FILE))
    write_json_atomic(directory / CONFIG_FILE, asdict(model.config))


def _load_weights(model: nn.Module, directory: Path) -> None:
    device = next(model.parameters()).device
    safetensors.torch.load_model(model, directory / WEIGHTS_FILE, strict=True, device=str(device))


def read_model_config(directory: Path) -> ModelConfig:
    """The ``ModelConfig`` of a model or checkpoint directory, without loading its weights."""
    return ModelConfig(**json.loads((directory / CONFIG_FILE).read_text()))
