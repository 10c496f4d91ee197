"""A training job on an S3 workspace: the ranks stream its shards, so a joining node fetches only one."""

from __future__ import annotations

import pytest

from gptflow.data.commits import CONTENTS_FILE
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.stages.training_job import TrainingJob


@pytest.fixture()
def head_and_node(s3_bucket, tmp_path, monkeypatch) -> tuple[Workspace, Workspace]:
    """Two machines' copies of one S3 workspace."""
    url = f"{s3_bucket}/team"
    monkeypatch.setenv("GPTFLOW_CACHE", str(tmp_path / "head"))
    head = Workspace.resolve(url)
    monkeypatch.setenv("GPTFLOW_CACHE", str(tmp_path / "node"))
    return head, Workspace.resolve(url)


def _job(head: Workspace, shard_tokens: list[int]) -> TrainingJob:
    units = [head.store / "tokens" / f"unit-{index}" for index in range(3)]
    for unit in units:
        with head.artifacts.commit(unit) as tmp:
            (tmp / "train.arrow").write_bytes(bytes(1000))
    head.artifacts.wait_for_uploads()
    return TrainingJob(model_config={}, train_config={}, train_paths=[str(unit / "train.arrow") for unit in units],
                       val_paths=[], continuation=None, run_dir=str(head.store / "runs" / "key"), tokenizer_file="",
                       registered_model_name="model", workspace=str(head.root), tracking_uri="", mlflow_run_id="",
                       restart=False, shard_tokens=shard_tokens)


def test_a_node_joining_with_token_counts_fetches_one_shard_directory_and_leaves_the_rest_to_stream(head_and_node):
    head, node = head_and_node
    joined = TrainingJob.joined(_job(head, [500, 500, 500]).published(head.store), node)
    assert joined.train_paths == [str(node.store / "tokens" / f"unit-{index}" / "train.arrow") for index in range(3)]
    assert (node.store / "tokens" / "unit-0" / CONTENTS_FILE).exists()
    assert not (node.store / "tokens" / "unit-1").exists() and not (node.store / "tokens" / "unit-2").exists()


def test_a_node_joining_without_token_counts_fetches_every_shard_directory(head_and_node):
    head, node = head_and_node
    TrainingJob.joined(_job(head, []).published(head.store), node)
    assert all((node.store / "tokens" / f"unit-{index}" / CONTENTS_FILE).exists() for index in range(3))
