"""The pretrain task re-hashes every token shard it will read before training starts."""

from __future__ import annotations

import os

import numpy as np
import pytest

from gptflow.data.commits import CorruptArtifactError, atomic_directory, is_complete
from gptflow.tasks.stages.training import pretrain_model_task
from gptflow.tasks.stages.training_job import TrainingJob


def test_training_refuses_a_shard_altered_behind_an_unchanged_size_and_mtime(tmp_path, write_shard):
    units = {}
    for name in ("old", "new"):
        with atomic_directory(tmp_path / "tokens" / name) as tmp:
            write_shard(tmp / "train.arrow", np.arange(1000, dtype=np.uint16))
            write_shard(tmp / "val.arrow", np.arange(500, dtype=np.uint16))
        units[name] = tmp_path / "tokens" / name
    altered = units["new"] / "train.arrow"
    stat = altered.stat()
    with open(altered, "r+b") as file:
        file.seek(stat.st_size // 2)
        file.write(b"\xff\xff")
    os.utime(altered, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    job = TrainingJob(
        model_config={}, train_config={"nproc": 1}, train_paths=[str(units["old"] / "train.arrow")],
        val_paths=[str(units["old"] / "val.arrow")],
        continuation={"checkpoint": "unused", "new_train_paths": [str(altered)], "new_data_fraction": 0.5},
        run_dir=str(tmp_path / "run"), tokenizer_file="unused", registered_model_name="unused",
        workspace="unused", tracking_uri="unused", mlflow_run_id="unused", restart=False,
    )
    with pytest.raises(CorruptArtifactError, match=f"{altered}.*altered after it was written"):
        pretrain_model_task.fn(job)
    assert not is_complete(units["new"]) and is_complete(units["old"])
    assert not (tmp_path / "run").exists()
