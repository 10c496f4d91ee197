"""Reruns over a corpus that changed: only what changed is recomputed, the rest is reused."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from gptflow.data.commits import CorruptArtifactError, is_complete
from gptflow.data.hashing import hash_file
from gptflow.data.shards import iter_raw_batches
from gptflow.data.store import store_paths
from gptflow.model.checkpoint import latest_checkpoint
from gptflow.tasks.model_source import resolve_model
from gptflow.tasks.runtime.workspace import Workspace

ROOT = Path(__file__).resolve().parents[2]
EXTRA_FILE = Path(json.__file__).parent.parent / "argparse.py"

pytestmark = pytest.mark.slow


@pytest.fixture()
def corpus(tiny_corpus_dir, tmp_path) -> Path:
    copy = tmp_path / "corpus"
    shutil.copytree(tiny_corpus_dir, copy)
    return copy


@pytest.fixture()
def run_pipeline(prefect_api_url, tmp_path, monkeypatch):
    """Runs the pretrain flow in this process on the tiny preset; returns (summary, MLflow tags)."""
    from gptflow.flows.pretrain import pretrain

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    workspace = tmp_path / "workspace"

    def run(corpus: Path, in_workspace: Path = workspace, **options):
        summary = pretrain(corpus=[str(corpus)], preset="tiny", workspace=str(in_workspace), **options)
        tags = MlflowClient(f"sqlite:///{in_workspace / 'mlflow.db'}").get_run(summary.mlflow_run_id).data.tags
        return summary, tags

    run.workspace = workspace
    return run


def _token_units(summary_tags: dict[str, str], workspace: Path) -> dict[str, dict]:
    """Token units of the run's manifest by source file: directory, file hashes and mtimes."""
    manifests = sorted((workspace / "store" / "manifests").glob("tokens-*.json"), key=os.path.getmtime)
    units = store_paths(json.loads(manifests[-1].read_text()), workspace / "store")["units"]
    described = {}
    for unit in units:
        files = sorted(Path(unit["directory"]).glob("*.arrow"))
        described[Path(unit["source"]).name] = {
            "directory": unit["directory"],
            "files": {path.name: (hash_file(path), path.stat().st_mtime_ns) for path in files},
        }
    return described


def _alter_behind_size_and_mtime(path: Path) -> None:
    stat = path.stat()
    with open(path, "r+b") as file:
        file.seek(stat.st_size // 2)
        file.write(b"\xff\xff")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _splits_by_document(workspace: Path) -> dict[str, str]:
    splits = {}
    for unit in (workspace / "store" / "raw").iterdir():
        if is_complete(unit):
            for batch in iter_raw_batches(unit, ["doc_hash", "split"]):
                splits.update(zip(batch.column("doc_hash").to_pylist(), batch.column("split").to_pylist()))
    return splits


def test_unchanged_corpus_reruns_nothing(run_pipeline, corpus):
    first, _ = run_pipeline(corpus)
    second, tags = run_pipeline(corpus)
    assert set(first.stages.values()) == {"executed"}
    assert set(second.stages.values()) == {"cached"}
    # Tags that would only say "nothing": no data changed, no stage computed a file.
    assert not [name for name in tags if name in ("gptflow.data_change", "gptflow.previous_run")
                or name.endswith(".files")]
    assert second.val_loss == first.val_loss


def test_added_file_is_ingested_and_tokenized_alone_and_training_continues(run_pipeline, corpus):
    first, first_tags = run_pipeline(corpus)
    before = _token_units(first_tags, run_pipeline.workspace)
    splits_before = _splits_by_document(run_pipeline.workspace)

    shutil.copy(EXTRA_FILE, corpus / "argparse.py")
    grown, tags = run_pipeline(corpus)

    assert grown.stages == {"ingest": "executed", "tokenizer": "cached", "tokenize": "executed",
                            "pretrain": "executed", "evaluate": "executed"}
    files = len(before)
    assert tags["gptflow.ingest.files"] == f"1 ingested, {files} reused"
    assert tags["gptflow.tokenize.files"] == f"1 tokenized, {files} reused"
    assert tags["gptflow.tokenizer.origin"] == f"reused from run {first.mlflow_run_id[:8]}"
    assert re.fullmatch(r"1 file added, [\d.]+K tokens added", tags["gptflow.data_change"])
    assert tags["gptflow.previous_run"] == first.mlflow_run_id
    assert tags["gptflow.training"] == "continued" and tags["gptflow.continues_run"] == first.mlflow_run_id
    assert grown.training == "continued" and grown.continues_run == first.mlflow_run_id

    after = _token_units(tags, run_pipeline.workspace)
    assert after.keys() - before.keys() == {"argparse.py"}
    for source, unit in before.items():  # same directory, same bytes, never rewritten
        assert after[source] == unit, source

    splits_after = _splits_by_document(run_pipeline.workspace)
    assert {doc: splits_after[doc] for doc in splits_before} == splits_before

    again, _ = run_pipeline(corpus)
    assert set(again.stages.values()) == {"cached"}


def test_modified_file_replaces_its_shards_and_deleted_file_leaves_the_manifest(run_pipeline, corpus):
    _, first_tags = run_pipeline(corpus)
    before = _token_units(first_tags, run_pipeline.workspace)

    modified = corpus / "json_decoder.py"
    modified.write_text(modified.read_text() + "\n\ndef added_later():\n    return 'new text'\n")
    (corpus / "json_encoder.py").unlink()
    changed, tags = run_pipeline(corpus)

    assert re.fullmatch(r"1 file changed, 1 removed, [\d.]+K? tokens added", tags["gptflow.data_change"])
    assert tags["gptflow.ingest.files"].startswith("1 ingested,") and tags["gptflow.tokenize.files"].startswith(
        "1 tokenized,")
    after = _token_units(tags, run_pipeline.workspace)
    assert "json_encoder.py" not in after
    assert after["json_decoder.py"]["directory"] != before["json_decoder.py"]["directory"]
    untouched = before.keys() - {"json_decoder.py", "json_encoder.py"}
    assert all(after[source] == before[source] for source in untouched)
    assert changed.stages["evaluate"] == "executed"


def test_deleted_artifact_is_recomputed_and_only_its_stage_reruns(run_pipeline, corpus):
    _, tags = run_pipeline(corpus)
    unit = _token_units(tags, run_pipeline.workspace)["json_decoder.py"]
    shutil.rmtree(unit["directory"])

    repaired, repaired_tags = run_pipeline(corpus)
    assert repaired.stages == {"ingest": "cached", "tokenizer": "cached", "tokenize": "executed",
                               "pretrain": "cached", "evaluate": "cached"}
    files = len(_token_units(tags, run_pipeline.workspace))
    assert repaired_tags["gptflow.tokenize.files"] == f"1 tokenized, {files - 1} reused"
    rebuilt = _token_units(repaired_tags, run_pipeline.workspace)["json_decoder.py"]
    assert rebuilt["directory"] == unit["directory"] and is_complete(Path(unit["directory"]))
    assert {name: digest for name, (digest, _) in rebuilt["files"].items()} == {
        name: digest for name, (digest, _) in unit["files"].items()
    }


def test_a_token_shard_altered_behind_its_size_and_mtime_fails_training_then_is_recomputed(run_pipeline, corpus):
    _, tags = run_pipeline(corpus)
    source, unit = next((source, unit) for source, unit in sorted(_token_units(tags, run_pipeline.workspace).items())
                        if "train.arrow" in unit["files"])
    shard = Path(unit["directory"]) / "train.arrow"
    _alter_behind_size_and_mtime(shard)

    # The cache check (size and mtime) keeps the tokenize stage cached; training, which the new
    # learning rate reruns, re-hashes each shard as it first reads it and refuses this one.
    retrain = {"train.learning_rate": 1e-3}
    with pytest.raises(CorruptArtifactError, match=f"{shard}.*altered after it was written.*next run recomputes"):
        run_pipeline(corpus, overrides=retrain)

    repaired, repaired_tags = run_pipeline(corpus, overrides=retrain)
    assert repaired.stages == {"ingest": "cached", "tokenizer": "cached", "tokenize": "executed",
                               "pretrain": "executed", "evaluate": "executed"}
    assert repaired_tags["gptflow.tokenize.files"].startswith("1 tokenized,")
    rebuilt = _token_units(repaired_tags, run_pipeline.workspace)[source]
    assert rebuilt["directory"] == unit["directory"] and is_complete(Path(unit["directory"]))
    assert {name: digest for name, (digest, _) in rebuilt["files"].items()} == {
        name: digest for name, (digest, _) in unit["files"].items()
    }


def test_a_config_change_reruns_its_stage_and_later_ones_only(run_pipeline, corpus):
    run_pipeline(corpus)
    sampling, _ = run_pipeline(corpus, overrides={"sampling.max_new_tokens": 8})
    assert sampling.stages == {"ingest": "cached", "tokenizer": "cached", "tokenize": "cached",
                               "pretrain": "cached", "evaluate": "executed"}
    training, tags = run_pipeline(corpus, overrides={"train.learning_rate": 1e-3})
    assert training.stages == {"ingest": "cached", "tokenizer": "cached", "tokenize": "cached",
                               "pretrain": "executed", "evaluate": "executed"}
    assert tags["gptflow.training"] == "from_scratch"


def test_retrain_tokenizer_and_from_scratch_are_honoured(run_pipeline, corpus):
    run_pipeline(corpus)
    shutil.copy(EXTRA_FILE, corpus / "argparse.py")
    fresh, tags = run_pipeline(corpus, retrain_tokenizer=True, from_scratch=True)
    assert fresh.stages["tokenizer"] == "executed" and tags["gptflow.tokenizer.origin"] == "trained"
    assert tags["gptflow.training"] == "from_scratch" and "gptflow.continues_run" not in tags


def test_two_runs_at_once_on_one_workspace_both_finish_consistently(prefect_api_url, corpus, tmp_path, run_at_once):
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update(PREFECT_API_URL=prefect_api_url, GPTFLOW_HOME=str(tmp_path / "shared"))
    command = [sys.executable, "-m", "gptflow.flows.cli", "pretrain", "--corpus", str(corpus), "--preset", "tiny"]
    finished = run_at_once([(command, env)] * 2)
    outputs = [output for _, output in finished]
    assert [code for code, _ in finished] == [0, 0], "\n\n".join(output[-3000:] for output in outputs)

    store = tmp_path / "shared" / "store"
    assert not list(store.rglob(".tmp-*"))
    for kind in ("raw", "tokens", "tokenizers", "eval"):
        assert all(is_complete(directory) for directory in (store / kind).iterdir()), kind
    assert all(is_complete(run / "final") for run in (store / "runs").iterdir())
    # Each stage was computed once: the run that waited found the other's result in the cache.
    stage_lines = sorted(next(line for line in output.splitlines() if line.startswith("stages")) for output in outputs)
    assert "pretrain cached" in stage_lines[0] and "pretrain executed" in stage_lines[1]
    client = MlflowClient(f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}")
    finished = client.search_runs([client.get_experiment_by_name("gptflow-pretrain").experiment_id])
    assert sorted(run.info.status for run in finished) == ["FINISHED", "FINISHED"]
    assert len(list((store / "runs").iterdir())) == 1


def test_an_interrupted_training_resumes_from_its_latest_loadable_checkpoint_unless_restarted(
    run_pipeline, corpus, caplog
):
    caplog.set_level(logging.INFO)
    run_pipeline(corpus)
    [run_dir] = (run_pipeline.workspace / "store" / "runs").iterdir()
    weights = hash_file(run_dir / "final" / "model.safetensors")
    # As a run killed after its last checkpoint leaves it, that checkpoint then altered on disk.
    shutil.rmtree(run_dir / "final")
    altered = run_dir / "checkpoints" / "step-00000030" / "model.safetensors"
    _alter_behind_size_and_mtime(altered)

    caplog.clear()
    resumed, tags = run_pipeline(corpus)
    assert resumed.stages["pretrain"] == "executed" and tags["gptflow.resumed_from_step"] == "15"
    assert (f"pretrain: cannot resume from checkpoint {altered.parent}, trying step-00000015 instead: {altered} "
            "does not hold the bytes written there") in caplog.text
    assert f"pretrain: resuming from step 15 (checkpoint {run_dir / 'checkpoints' / 'step-00000015'}," in caplog.text
    assert hash_file(run_dir / "final" / "model.safetensors") == weights
    assert "\ntraining    30 steps, resumed from step 15\n" in resumed.render()
    assert "training    30 steps, from scratch" in run_pipeline(corpus)[0].render()  # cached: reused, not resumed

    caplog.clear()
    restarted, tags = run_pipeline(corpus, restart=True)
    assert restarted.stages["pretrain"] == "executed" and "gptflow.resumed_from_step" not in tags
    assert f"pretrain: --restart: training from step 0, deleting the checkpoints and model in {run_dir}" in caplog.text
    assert "resuming" not in caplog.text
    assert hash_file(run_dir / "final" / "model.safetensors") == weights
    assert "training    30 steps, from scratch" in restarted.render()


def test_a_killed_run_is_marked_killed_and_the_next_run_of_its_settings_resumes_it(
    prefect_api_url, corpus, tmp_path
):
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    # One thread per process: float reductions then add up alike in every run, bit for bit.
    env.update(PREFECT_API_URL=prefect_api_url, OMP_NUM_THREADS="1")

    def pretrain(workspace: str, max_steps: int, wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
        command = [sys.executable, "-m", "gptflow.flows.cli", "pretrain", "--corpus", str(corpus), "--preset", "tiny",
                   "--set", f"train.max_steps={max_steps}", "--set", "train.checkpoint_interval=20",
                   "--set", "train.val_interval=200"]
        options = {"cwd": ROOT, "env": {**env, "GPTFLOW_HOME": str(tmp_path / workspace)}}
        if not wait:
            return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **options)
        finished = subprocess.run(command, capture_output=True, text=True, timeout=600, **options)
        assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
        return finished

    reference = pretrain("reference", 600, wait=False)  # the same settings, never interrupted
    victim = pretrain("killed", 600, wait=False)
    runs = tmp_path / "killed" / "store" / "runs"
    deadline = time.monotonic() + 300
    while not list(runs.glob("*/checkpoints/step-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not list(runs.glob("*/final")), "killed before the end, yet a final model exists"
    [run_dir] = runs.iterdir()
    checkpoint = latest_checkpoint(run_dir)
    client = MlflowClient(f"sqlite:///{tmp_path / 'killed' / 'mlflow.db'}")
    [killed_run] = client.search_runs([client.get_experiment_by_name("gptflow-pretrain").experiment_id])
    assert killed_run.info.status == "RUNNING"

    other_settings = pretrain("killed", 20)
    log = other_settings.stdout + other_settings.stderr
    assert client.get_run(killed_run.info.run_id).info.status == "KILLED"
    assert f"mlflow: run {killed_run.info.run_id} ({killed_run.info.run_name}) was still RUNNING" in log
    assert (f"pretrain: run {killed_run.info.run_id} of this corpus stopped at {checkpoint}; this run does not resume "
            "from it, as the settings differ: train.max_steps 600 → 20 (its checkpoints are kept)") in log
    assert latest_checkpoint(run_dir) == checkpoint

    same_settings = pretrain("killed", 600)
    step = int(checkpoint.name.removeprefix("step-"))
    assert f"pretrain: resuming from step {step} (checkpoint {checkpoint}," in same_settings.stdout + same_settings.stderr
    assert "pretrain executed" in same_settings.stdout
    assert reference.wait(timeout=600) == 0
    [reference_dir] = (tmp_path / "reference" / "store" / "runs").iterdir()
    assert reference_dir.name == run_dir.name
    assert hash_file(run_dir / "final" / "model.safetensors") == hash_file(reference_dir / "final" / "model.safetensors")


def test_a_copied_workspace_reads_and_writes_only_itself(run_pipeline, corpus, tmp_path):
    """``cp -a`` of a workspace, the original then deleted: the copy's cache, lineage and MLflow
    store serve it whole, and nothing is read from or written to the original's folder."""
    run_pipeline(corpus)
    original, copy = run_pipeline.workspace, tmp_path / "copy"
    shutil.copytree(original, copy, symlinks=True)
    shutil.rmtree(original)

    rerun, tags = run_pipeline(corpus, in_workspace=copy)

    assert set(rerun.stages.values()) == {"cached"} and not original.exists()
    kept = [path.read_text() for path in (copy / "store").rglob("*.json")]
    # Of a cache record, the result: Prefect's metadata names the file it wrote, which nothing reads.
    kept += [json.loads(path.read_text())["result"] for path in (copy / "prefect").iterdir()]
    assert [text for text in kept if str(original) in text] == []
    client = MlflowClient(f"sqlite:///{copy / 'mlflow.db'}")
    experiments = {experiment.name: experiment for experiment in client.search_experiments()}
    assert experiments["gptflow-pretrain"].artifact_location == (copy / "mlartifacts").as_uri()
    assert f"gptflow-pretrain (copied from {original})" in experiments  # the earlier runs, still to compare
    # The registered version's files were in the original: registered again, from the copy.
    name, version = tags["gptflow.registered_model"].split("/")
    assert version == "2"
    assert client.get_model_version(name, version).source.startswith((copy / "mlartifacts").as_uri())
    registered = resolve_model(f"models:/{name}/{version}", Workspace.resolve(copy))
    assert registered.weights_hash == client.get_model_version(name, "1").tags["gptflow.weights_hash"]
