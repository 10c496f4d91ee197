"""A WARC corpus with ``--set data.languages=en`` end to end: a real pretrain, a real Prefect server
and a real MLflow store; what the language filter dropped is in the run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from gptflow.flows.pretrain import pretrain

pytestmark = pytest.mark.slow


def test_documents_dropped_by_language_are_logged_per_language_and_per_file(prefect_api_url, tiny_corpus_dir,
                                                                           make_crawl, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus_dir, corpus)
    warc = make_crawl(tmp_path)
    shutil.move(warc, corpus / warc.name)
    workspace = tmp_path / "workspace"

    summary = pretrain(corpus=[str(corpus)], preset="tiny", workspace=str(workspace),
                       overrides={"data.languages": "en", "train.max_steps": 2, "eval.eval_tokens": 512})

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    params = client.get_run(summary.mlflow_run_id).data.params
    logged = json.loads(Path(client.download_artifacts(summary.mlflow_run_id, "data/languages.json",
                                                       str(tmp_path))).read_text())
    assert logged["by_source"][str(corpus / warc.name)] == {"kept": {"en": 1}, "dropped": {"fr": 1, "de": 1}}
    assert int(params["dataset.language_dropped.fr"]) == logged["dropped"]["fr"] >= 1
    assert int(params["dataset.language_dropped"]) == sum(logged["dropped"].values())
    assert {key.removeprefix("dataset.language_kept."): int(value) for key, value in params.items()
            if key.startswith("dataset.language_kept.")} == logged["kept"]
    assert logged["kept"]["en"] >= 1
