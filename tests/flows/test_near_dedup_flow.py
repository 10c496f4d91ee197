"""``--set data.near_dedup_threshold``, end to end: a real pretrain on a tiny corpus with a near
copy of one file, a real Prefect server and a real MLflow store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow
pytest.importorskip("datasketch", reason="near-dedup is an optional extra: pip install 'gptflow[near-dedup]'")


def test_near_duplicate_removals_are_logged_per_source_and_the_setting_keys_the_ingest_stage(
    prefect_api_url, tiny_corpus_dir, tmp_path
):
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus_dir, corpus)
    original = (corpus / "json_decoder.py").read_text()
    near_copy = corpus / "zz_json_decoder_copy.py"  # sorts last: the original is the copy kept
    # One word swapped for one of the same length, so the copy is cut into segments where the
    # original is: all but one of them are exact duplicates, that one a near duplicate.
    near_copy.write_text(original.replace("self", "this", 1))
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update(PREFECT_API_URL=prefect_api_url, GPTFLOW_HOME=str(tmp_path / "workspace"))

    def pretrain(*settings: str) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "gptflow.flows.cli", "pretrain", "--corpus", str(corpus), "--preset", "tiny",
             "--set", "train.max_steps=4", *settings],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    pretrain("--set", "data.near_dedup_threshold=0.8")
    pretrain()

    client = MlflowClient(f"sqlite:///{tmp_path / 'workspace' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gptflow-pretrain")
    near, off = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    assert near.data.params["data.near_dedup_threshold"] == "0.8"
    logged = json.loads(Path(client.download_artifacts(near.info.run_id, "data/near_duplicates.json",
                                                       str(tmp_path))).read_text())
    assert logged["by_source"][str(near_copy)] == 1
    assert set(logged["by_source"]) == {str(path) for path in corpus.iterdir()}
    assert logged["total"] == sum(logged["by_source"].values())
    assert near.data.params["dataset.near_duplicates"] == str(logged["total"])

    # Off, the stage runs again (another key) on every file's unit from the first run, and
    # tokenize sees one more segment: the near copy's.
    assert off.data.tags["gptflow.stage.ingest"] == "executed"
    assert off.data.tags["gptflow.ingest.files"] == f"0 ingested, {len(logged['by_source'])} reused"
    assert "dataset.near_duplicates" not in off.data.params
    assert int(off.data.params["dataset.segments"]) == int(near.data.params["dataset.segments"]) + logged["total"]
    assert off.data.params["data_fingerprint"] != near.data.params["data_fingerprint"]
