"""The data stages' per-file units run on a real local Ray cluster (through prefect-ray's task
runner), each a Prefect task run, and write byte for byte what running them in the flow's own
process writes."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

from gptflow.data.hashing import hash_file
from gptflow.flows.pretrain import pretrain

pytestmark = pytest.mark.slow


def _shards(workspace: Path) -> dict[str, str]:
    """Every raw and token shard and the tokenizer of the workspace's store, by its path in the store:
    its hash."""
    store = workspace / "store"
    return {str(path.relative_to(store)): hash_file(path)
            for pattern in ("raw/*/*.arrow", "tokens/*/*.arrow", "tokenizers/*/tokenizer.json")
            for path in store.glob(pattern)}


def _unit_task_runs(workspace: Path, mlflow_run_id: str, prefix: str) -> list[str]:
    """The names of the flow run's task runs whose name starts with ``prefix``."""
    tags = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}").get_run(mlflow_run_id).data.tags
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[tags["prefect.flow_run_id"]])),
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=prefix)),
        )
    return sorted(run.name for run in runs)


def test_units_on_ray_write_what_the_flow_s_process_writes(prefect_api_url, ray_cluster, tiny_corpus_dir, tmp_path,
                                                          monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    corpus = [str(tiny_corpus_dir)]
    sources = sorted(path.name for path in tiny_corpus_dir.iterdir())

    in_process = pretrain(corpus=corpus, preset="tiny", workspace=str(tmp_path / "in-process"))
    on_ray = pretrain(corpus=corpus, preset="tiny", workspace=str(tmp_path / "ray"), ray=ray_cluster)

    expected = _shards(tmp_path / "in-process")
    assert len(expected) > len(sources)  # raw and token shards of every file
    assert _shards(tmp_path / "ray") == expected
    assert on_ray.train_tokens == in_process.train_tokens
    # One task run per file for ingest, per file and per sampled file for the tokenizer's sample, per
    # group of files for tokenize; none in the flow's process.
    assert _unit_task_runs(tmp_path / "ray", on_ray.mlflow_run_id, "ingest ") == [f"ingest {name}" for name in sources]
    assert len(_unit_task_runs(tmp_path / "ray", on_ray.mlflow_run_id, "tokenizer ")) > len(sources)
    assert _unit_task_runs(tmp_path / "ray", on_ray.mlflow_run_id, "tokenize ")
    assert _unit_task_runs(tmp_path / "in-process", in_process.mlflow_run_id, "ingest ") == []
