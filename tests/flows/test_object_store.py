"""The pipeline on a workspace kept on S3 (a real moto server on 127.0.0.1), reading its corpus from
S3, its data units on a real local Ray cluster: the artifacts of a local run, reused by a machine with an empty cache, which
ingests only the file added to the bucket (a machine that finds every stage cached copies no
corpus; training and evaluation stream what they read), an object altered in the store refused
and named by its reader and recomputed by the next run, two machines at once computing each stage once, and a run killed
mid-stage leaving no committed partial unit."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import s3fs
from mlflow import MlflowClient

from gptflow.data.commits import CONTENTS_FILE
from gptflow.data.hashing import hash_bytes, hash_file
from gptflow.flows.pretrain import pretrain

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEPS = "train.max_steps=4"
OVERRIDES = {"train.max_steps": 4}
DATA_STAGES = ("ingest", "tokenizer", "tokenize")


def _local_shards(workspace: Path) -> dict[str, str]:
    """Every token shard of a local workspace, by its path in the store: its hash."""
    store = workspace / "store"
    return {str(path.relative_to(store)): hash_file(path) for path in store.glob("tokens/*/*.arrow")}


def _stored_shards(url: str) -> dict[str, str]:
    """Every committed token shard of a workspace on S3, by its path in the store: its hash."""
    filesystem = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    store = f"{url.removeprefix('s3://')}/store"
    return {name[len(store) + 1:]: hash_bytes(filesystem.cat_file(name))
            for name in filesystem.glob(f"{store}/tokens/*/*.arrow")
            if filesystem.exists(f"{name.rsplit('/', 1)[0]}/{CONTENTS_FILE}")}


def _use_cache(monkeypatch, folder: Path) -> None:
    monkeypatch.setenv("GPTFLOW_CACHE", str(folder))


def test_an_s3_workspace_holds_what_a_local_run_writes_and_an_empty_cache_reuses_it(
        prefect_api_url, ray_cluster, s3_bucket, tiny_corpus_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    url, corpus_on_s3 = f"{s3_bucket}/team", f"{s3_bucket}/raw/"
    s3fs.S3FileSystem(skip_instance_cache=True).put(f"{tiny_corpus_dir}/", corpus_on_s3.removeprefix("s3://"),
                                                     recursive=True)
    local = pretrain(corpus=[str(tiny_corpus_dir)], preset="tiny", overrides=OVERRIDES,
                     workspace=str(tmp_path / "local"))

    _use_cache(monkeypatch, tmp_path / "machine-a")
    corpus = [corpus_on_s3]
    on_s3 = pretrain(corpus=corpus, preset="tiny", overrides=OVERRIDES, workspace=url, ray=ray_cluster)
    assert _stored_shards(url) == _local_shards(tmp_path / "local")
    assert on_s3.train_tokens == local.train_tokens
    assert set(on_s3.stages.values()) == {"executed"}
    [workspace_a] = (tmp_path / "machine-a" / "workspaces").iterdir()
    [dataset] = MlflowClient(f"sqlite:///{workspace_a / 'mlflow.db'}").get_run(on_s3.mlflow_run_id).inputs.dataset_inputs
    assert dataset.dataset.source_type == "s3" and corpus_on_s3 in dataset.dataset.source

    _use_cache(monkeypatch, tmp_path / "machine-b")  # another machine: nothing on its disk yet
    elsewhere = pretrain(corpus=corpus, preset="tiny", overrides=OVERRIDES, workspace=url)
    assert set(elsewhere.stages.values()) == {"cached"}, elsewhere.stages
    assert elsewhere.val_loss == on_s3.val_loss
    [copy] = (tmp_path / "machine-b" / "workspaces").iterdir()
    assert _local_shards(copy) == {}, "a cached stage checks its units' commits: no corpus is copied"
    assert not list(copy.glob("store/raw/*/docs-*"))

    files = len(list(tiny_corpus_dir.iterdir()))
    s3fs.S3FileSystem(skip_instance_cache=True).pipe_file(  # new data arrives in the bucket
        f"{corpus_on_s3.removeprefix('s3://')}zz_added.py", b"def added():\n    return 42\n" * 50)
    grown = pretrain(corpus=corpus, preset="tiny", overrides=OVERRIDES, workspace=url)
    tags = MlflowClient(f"sqlite:///{copy / 'mlflow.db'}").get_run(grown.mlflow_run_id).data.tags
    assert tags["gptflow.ingest.files"] == f"1 ingested, {files} reused"
    assert tags["gptflow.tokenize.files"] == f"1 tokenized, {files} reused"
    assert grown.stages["pretrain"] == grown.stages["evaluate"] == "executed"
    # Training and evaluation streamed the record batches they read: the one unit on this disk is the new file's.
    assert len({Path(name).parent for name in _local_shards(copy)}) == 1
    assert set(_local_shards(copy).items()) <= set(_stored_shards(url).items())


def test_an_object_altered_in_the_store_is_refused_by_its_reader_and_recomputed_by_the_next_run(
        prefect_api_url, s3_bucket, tiny_corpus_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    corpus, url = [str(tiny_corpus_dir)], f"{s3_bucket}/team"
    _use_cache(monkeypatch, tmp_path / "machine-a")
    pretrain(corpus=corpus, preset="tiny", overrides=OVERRIDES, workspace=url)
    written = _stored_shards(url)

    filesystem = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    index = f"{url.removeprefix('s3://')}/store/{sorted(written)[0].replace('.arrow', '.batches.json')}"
    data = filesystem.cat_file(index)
    filesystem.pipe_file(index, data.replace(b"[", b" [", 1)[:len(data)])  # same size, other bytes

    _use_cache(monkeypatch, tmp_path / "machine-b")
    caplog.set_level(logging.WARNING, logger="gptflow.data")
    longer = {**OVERRIDES, "train.max_steps": 5}  # a new training: it reads the shards, every batch index first
    with pytest.raises(Exception, match="could not be fetched from the object store"):
        pretrain(corpus=corpus, preset="tiny", overrides=longer, workspace=url)
    assert f"{index.rsplit('/store/', 1)[1]} in the object store does not hash to its commit" in caplog.text

    rerun = pretrain(corpus=corpus, preset="tiny", overrides=longer, workspace=url)
    assert rerun.stages["ingest"] == "cached" and rerun.stages["tokenizer"] == "cached"
    assert rerun.stages["tokenize"] == "executed"  # the reader withdrew the altered unit's commit
    assert _stored_shards(url) == written, "the unit was written again, byte for byte"
    assert filesystem.cat_file(index) == data
    assert rerun.stages["pretrain"] == "executed"


def _cli(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gptflow.flows.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _env(prefect_api_url: str, s3_server: dict[str, str], cache: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    return {**env, **s3_server, "PREFECT_API_URL": prefect_api_url, "GPTFLOW_CACHE": str(cache)}


def _stage_statuses(output: str) -> dict[str, str]:
    [line] = [line for line in output.splitlines() if line.startswith("stages ")]
    return dict(item.rsplit(" ", 1) for item in line.removeprefix("stages").strip().split(", "))


def test_two_machines_at_once_compute_each_stage_once(prefect_api_url, s3_server, s3_bucket, tiny_corpus_dir,
                                                      tmp_path, run_at_once):
    url = f"{s3_bucket}/team"
    command = [sys.executable, "-m", "gptflow.flows.cli", "pretrain", "--corpus", str(tiny_corpus_dir), "--preset",
               "tiny", "--set", STEPS, "--workspace", url]
    finished = run_at_once([(command, _env(prefect_api_url, s3_server, tmp_path / name)) for name in ("a", "b")])
    outputs = [output for _, output in finished]
    for code, output in finished:
        assert code == 0, output[-4000:]
    statuses = [_stage_statuses(output) for output in outputs]
    for stage in (*DATA_STAGES, "pretrain"):
        assert sorted(status[stage] for status in statuses) == ["cached", "executed"], statuses
    assert any("another run is computing this stage; waiting for its result" in output for output in outputs)


def test_a_run_killed_while_tokenizing_leaves_no_committed_partial_unit(prefect_api_url, s3_server, s3_bucket,
                                                                        tiny_corpus_dir, tmp_path):
    url = f"{s3_bucket}/team"
    command = ("pretrain", "--corpus", str(tiny_corpus_dir), "--preset", "tiny", "--set", STEPS, "--workspace", url)
    run = _cli(*command, env=_env(prefect_api_url, s3_server, tmp_path / "a"))
    deadline = time.monotonic() + 300
    for line in run.stdout:
        if "tokenize:" in line:
            os.killpg(run.pid, signal.SIGKILL)
            break
        assert time.monotonic() < deadline
    run.wait()

    filesystem = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    store = f"{url.removeprefix('s3://')}/store"
    for commit in filesystem.glob(f"{store}/*/*/{CONTENTS_FILE}"):
        folder = commit.rsplit("/", 1)[0]
        for name, entry in json.loads(filesystem.cat_file(commit))["files"].items():
            assert hash_bytes(filesystem.cat_file(f"{folder}/{name}")) == entry["hash"], f"{folder}/{name}"

    rerun = _cli(*command, env=_env(prefect_api_url, s3_server, tmp_path / "b"))
    output = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, output[-4000:]
    assert _stage_statuses(output)["ingest"] == "cached"
