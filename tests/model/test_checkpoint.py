from __future__ import annotations

import dataclasses
import errno
import io
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gptflow.data.commits import CONTENTS_FILE, CorruptArtifactError, atomic_directory, is_complete
from gptflow.data.disk_space import OutOfSpaceError
from gptflow.model.checkpoint import (
    OPTIMIZER_FILE,
    WEIGHTS_FILE,
    TrainerState,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    prune_checkpoints,
    save_checkpoint,
    save_final,
    save_to_file,
)
from gptflow.model.config import TrainConfig
from gptflow.model.gpt import GPT
from gptflow.model.optim import build_optimizer


def trained_pair(
    config, steps: int = 3, seed: int = 0, train_config: TrainConfig | None = None
) -> tuple[GPT, torch.optim.Optimizer]:
    """A model and optimizer a few steps in, so the optimizer's moments are non-trivial."""
    torch.manual_seed(seed)
    model = GPT(config)
    optimizer = build_optimizer(model, train_config or TrainConfig(), torch.device("cpu"))
    for _ in range(steps):
        idx = torch.randint(0, config.vocab_size, (2, config.block_size))
        model(idx, idx)[1].backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def state_at(step: int) -> TrainerState:
    return TrainerState(step=step, tokens_seen=step * 64, data_seed=5, train_config=dataclasses.asdict(TrainConfig()))


def test_round_trip_restores_weights_optimizer_and_step(tmp_path, tiny_config):
    model, optimizer = trained_pair(tiny_config)
    path = save_checkpoint(tmp_path, model, optimizer, state_at(3))
    assert path == checkpoint_path(tmp_path, 3) == tmp_path / "checkpoints" / "step-00000003"

    restored_model, restored_optimizer = trained_pair(tiny_config, steps=1, seed=1)
    state = load_checkpoint(path, restored_model, restored_optimizer)
    assert state == state_at(3)
    for (name, expected), (_, actual) in zip(model.state_dict().items(), restored_model.state_dict().items()):
        assert torch.equal(expected, actual), name
    assert restored_model.lm_head.weight is restored_model.transformer.wte.weight
    for expected, actual in zip(optimizer.state.values(), restored_optimizer.state.values()):
        assert all(torch.equal(expected[key], actual[key]) for key in ("step", "exp_avg", "exp_avg_sq"))
    assert restored_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_tied_weights_are_stored_once(tmp_path, tiny_config):
    model, optimizer = trained_pair(tiny_config, steps=0)
    path = save_checkpoint(tmp_path, model, optimizer, state_at(0))
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as weights:
        names = set(weights.keys())
    assert len({"lm_head.weight", "transformer.wte.weight"} & names) == 1


def test_optimizer_state_is_never_unpickled_as_code(tmp_path, tiny_config):
    model, optimizer = trained_pair(tiny_config, steps=0)
    saved = save_checkpoint(tmp_path, model, optimizer, state_at(0))
    # A crafted checkpoint, committed with its own contents.json, so it passes the hash check:
    # its pickle would run a command if loaded with weights_only=False.
    path = tmp_path / "crafted"
    with atomic_directory(path) as tmp:
        shutil.copytree(saved, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(CONTENTS_FILE))
        (tmp / OPTIMIZER_FILE).write_bytes(pickle.dumps(_RunsCodeOnLoad(), protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path, model, optimizer)


class _RunsCodeOnLoad:
    def __reduce__(self):
        return (print, ("code ran on load",))


def test_latest_checkpoint_ignores_temporary_and_incomplete_directories(tmp_path, tiny_config):
    assert latest_checkpoint(tmp_path) is None
    model, optimizer = trained_pair(tiny_config, steps=0)
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, model, optimizer, state_at(step))
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / ".tmp-step-00000050-abc").mkdir()  # a killed write
    shutil.copytree(checkpoints / "step-00000030", checkpoints / "step-00000040")
    (checkpoints / "step-00000040" / OPTIMIZER_FILE).write_bytes(b"truncated")  # altered after commit
    shutil.copytree(checkpoints / "step-00000030", checkpoints / "step-00000045")
    (checkpoints / "step-00000045" / "contents.json").unlink()  # never committed
    (checkpoints / "notes").mkdir()
    assert latest_checkpoint(tmp_path) == checkpoints / "step-00000030"

    prune_checkpoints(tmp_path, keep=2)
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step-00000020", "step-00000030"]
    assert not (checkpoints / "step-00000040").exists() and not (checkpoints / "step-00000045").exists()
    assert (checkpoints / "notes").exists()


def test_a_checkpoint_of_another_model_shape_is_refused(tmp_path, tiny_config):
    model, optimizer = trained_pair(tiny_config, steps=0)
    path = save_checkpoint(tmp_path, model, optimizer, state_at(0))
    wider = GPT(dataclasses.replace(tiny_config, n_embd=64))
    with pytest.raises(ValueError, match="original model config"):
        load_checkpoint(path, wider)


def test_final_export_loads_as_an_eval_mode_model(tmp_path, tiny_config):
    model, _ = trained_pair(tiny_config)
    final = save_final(tmp_path, model)
    assert sorted(path.name for path in final.iterdir()) == ["config.json", "contents.json", WEIGHTS_FILE]
    loaded = load_model(final)
    assert loaded.config == tiny_config and not loaded.training
    idx = torch.randint(0, tiny_config.vocab_size, (2, tiny_config.block_size))
    assert torch.equal(loaded(idx)[0], model.eval()(idx)[0])


def test_a_new_export_replaces_the_old_one(tmp_path, tiny_config):
    first, _ = trained_pair(tiny_config, steps=1)
    second, _ = trained_pair(tiny_config, steps=2)
    save_final(tmp_path, first)
    final = save_final(tmp_path, second)
    assert torch.equal(load_model(final).lm_head.weight, second.lm_head.weight)


def test_load_model_refuses_an_altered_export(tmp_path, tiny_config):
    model, _ = trained_pair(tiny_config, steps=0)
    final = save_final(tmp_path, model)
    with open(final / WEIGHTS_FILE, "r+b") as weights:
        weights.seek(-4, 2)
        weights.write(b"\x00\x00\x80\x7f")  # flip the last float: same size, new bytes
    with pytest.raises(FileNotFoundError, match="not a complete model directory"):
        load_model(final)


def alter_keeping_size_and_mtime(path: Path) -> None:
    """Overwrite the last 4 bytes of ``path`` and put its mtime back: ``is_complete``'s size and
    mtime check cannot see the change."""
    stat = path.stat()
    with open(path, "r+b") as file:
        file.seek(-4, os.SEEK_END)
        last = file.read(4)
        file.seek(-4, os.SEEK_END)
        file.write(bytes(255 - byte for byte in last))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_load_model_refuses_weights_altered_behind_an_unchanged_size_and_mtime(tmp_path, tiny_config):
    model, _ = trained_pair(tiny_config, steps=0)
    final = save_final(tmp_path, model)
    alter_keeping_size_and_mtime(final / WEIGHTS_FILE)
    assert is_complete(final)  # the cheap check is fooled...
    with pytest.raises(CorruptArtifactError, match=f"{final / WEIGHTS_FILE}.*altered after it was written"):
        load_model(final)
    assert not is_complete(final)  # ...and, once the load found out, no longer trusts the directory


def test_load_checkpoint_refuses_an_optimizer_state_altered_behind_an_unchanged_size_and_mtime(tmp_path, tiny_config):
    model, optimizer = trained_pair(tiny_config, steps=1)
    path = save_checkpoint(tmp_path, model, optimizer, state_at(1))
    alter_keeping_size_and_mtime(path / OPTIMIZER_FILE)
    load_checkpoint(path, model)  # weights only: the optimizer state is not read
    with pytest.raises(CorruptArtifactError, match=OPTIMIZER_FILE):
        load_checkpoint(path, model, optimizer)
    assert latest_checkpoint(tmp_path) is None


def test_round_trip_of_a_modern_model_with_muon_continues_identically(tmp_path, tiny_config):
    config = dataclasses.replace(
        tiny_config, position="rotary", norm="rmsnorm", qk_norm=True, mlp="relu2", tie_embeddings=False,
        zero_init_projections=True, logit_softcap=15.0, dropout=0.0,
    )
    muon = TrainConfig(optimizer="muon")
    model, optimizer = trained_pair(config, train_config=muon)
    path = save_checkpoint(tmp_path, model, optimizer, state_at(3))
    restored_model, restored_optimizer = trained_pair(config, steps=1, seed=1, train_config=muon)
    load_checkpoint(path, restored_model, restored_optimizer)
    for (name, expected), (_, actual) in zip(model.state_dict().items(), restored_model.state_dict().items()):
        assert torch.equal(expected, actual), name
    assert restored_model.lm_head.weight is not restored_model.transformer.wte.weight
    # Momentum buffers and Adam moments are back: the next step is bit-identical.
    idx = torch.randint(0, config.vocab_size, (2, config.block_size))
    for pair_model, pair_optimizer in ((model, optimizer), (restored_model, restored_optimizer)):
        pair_model(idx, idx)[1].backward()
        pair_optimizer.step()
    for (name, expected), (_, actual) in zip(model.state_dict().items(), restored_model.state_dict().items()):
        assert torch.equal(expected, actual), name


def _file_sizes(tmp_path: Path, model: GPT, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """The size of each file of a checkpoint of ``model`` and ``optimizer``."""
    path = save_checkpoint(tmp_path / "measured", model, optimizer, state_at(3))
    return {file.name: file.stat().st_size for file in path.iterdir()}


@pytest.mark.parametrize("file_over_the_limit", [WEIGHTS_FILE, OPTIMIZER_FILE])
def test_a_checkpoint_that_runs_out_of_space_leaves_nothing_and_names_the_checkpoint(
    tmp_path, tiny_config, file_size_limit, file_over_the_limit
):
    model, optimizer = trained_pair(tiny_config)
    sizes = _file_sizes(tmp_path, model, optimizer)
    # Under the weights (safetensors fails), or between them and the larger optimizer state (torch.save fails).
    weights, optimizer_state = sizes[WEIGHTS_FILE], sizes[OPTIMIZER_FILE]
    limit = weights // 2 if file_over_the_limit == WEIGHTS_FILE else (weights + optimizer_state) // 2
    assert limit < sizes[file_over_the_limit] and all(size < limit for name, size in sizes.items()
                                                      if name not in (WEIGHTS_FILE, OPTIMIZER_FILE))
    pair, run_dir = tmp_path / "pair.pt", tmp_path / "run"
    torch.save((model, optimizer, state_at(3)), pair)
    code = f"""
import torch
from gptflow.data.disk_space import OutOfSpaceError
from gptflow.model.checkpoint import save_checkpoint
model, optimizer, state = torch.load({str(pair)!r}, weights_only=False)
try:
    save_checkpoint({str(run_dir)!r}, model, optimizer, state)
except OutOfSpaceError as error:
    print(error)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            preexec_fn=file_size_limit(limit))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        f"out of space writing {checkpoint_path(run_dir, 3)}: a file reached the file size limit")
    assert list((run_dir / "checkpoints").iterdir()) == [] and latest_checkpoint(run_dir) is None


@pytest.mark.parametrize("small_tmpfs", [160 * 1024], indirect=True)
def test_a_checkpoint_on_a_full_disk_leaves_nothing_and_reports_the_space_left(small_tmpfs, tmp_path, tiny_config):
    model, optimizer = trained_pair(tiny_config)
    sizes = _file_sizes(tmp_path, model, optimizer)
    assert sizes[WEIGHTS_FILE] < 160 * 1024 < sizes[WEIGHTS_FILE] + sizes[OPTIMIZER_FILE]
    with pytest.raises(OutOfSpaceError) as raised:
        save_checkpoint(small_tmpfs, model, optimizer, state_at(3))
    assert str(raised.value).startswith(
        f"out of space writing {checkpoint_path(small_tmpfs, 3)}: the disk is full (160 KiB free on the filesystem "
        f"at {small_tmpfs}). Free space on {small_tmpfs} or point --workspace / GPTFLOW_HOME elsewhere"
    )
    assert list((small_tmpfs / "checkpoints").iterdir()) == []


class _InterruptedFile(io.BytesIO):
    """A file whose third write is interrupted, as a SIGTERM or Ctrl-C handler raises in the middle of one."""

    def __init__(self, interruption: BaseException):
        super().__init__()
        self.interruption, self.writes = interruption, 0

    def write(self, data) -> int:
        self.writes += 1
        if self.writes == 3:
            raise self.interruption
        return super().write(data)


@pytest.mark.parametrize("interruption", [KeyboardInterrupt(), SystemExit(143)])
def test_an_interrupted_optimizer_write_raises_the_interruption_not_torch_s_error(interruption):
    with pytest.raises(type(interruption)):
        save_to_file({"weights": torch.ones(1000)}, _InterruptedFile(interruption))


def test_a_failed_optimizer_write_keeps_its_os_error_beside_torch_s_error():
    with pytest.raises(RuntimeError) as raised:
        save_to_file({"weights": torch.ones(1000)}, _InterruptedFile(OSError(errno.ENOSPC, "No space left on device")))
    assert isinstance(raised.value.__context__, OSError) and raised.value.__context__.errno == errno.ENOSPC
