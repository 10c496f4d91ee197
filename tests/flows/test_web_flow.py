"""A WARC corpus with ``--set data.languages=en`` and ``data.quality=fineweb`` end to end: a real
pretrain, a real Prefect server and a real MLflow store; what the language and quality filters
dropped is in the run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from gptflow.flows.pretrain import pretrain

pytestmark = pytest.mark.slow


def test_documents_dropped_by_language_and_quality_are_logged_per_filter_and_per_file(
        prefect_api_url, tiny_corpus_dir, make_crawl, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus_dir, corpus)
    warc = make_crawl(tmp_path)
    shutil.move(warc, corpus / warc.name)
    # English prose, repeated: Gopher's repetition filter drops it.
    repeated = "\n\n".join(["She kept the old letters in a wooden box under the bed and read them again every winter, "
                             "one by one, while the snow fell on the roof and the fire burned low."] * 40)
    (corpus / "letters.txt").write_text(repeated, encoding="utf-8")
    workspace = tmp_path / "workspace"

    summary = pretrain(corpus=[str(corpus)], preset="tiny", workspace=str(workspace),
                       overrides={"data.languages": "en", "data.quality": "fineweb", "train.max_steps": 2,
                                  "eval.eval_tokens": 512})

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

    quality = json.loads(Path(client.download_artifacts(summary.mlflow_run_id, "data/quality.json",
                                                        str(tmp_path))).read_text())
    # Only the prose documents that data.languages kept are judged: the English page and the letters,
    # not the Python files.
    assert set(quality["by_source"]) == {str(corpus / warc.name), str(corpus / "letters.txt")}
    assert quality["judged"] == int(params["dataset.quality_judged"]) == 2
    assert quality["by_source"][str(corpus / "letters.txt")]["dropped"] == {"gopher_repetition": 1}
    assert {key: int(value) for key, value in params.items() if key.startswith("dataset.quality_dropped")} == {
        "dataset.quality_dropped.gopher_repetition": 1, "dataset.quality_dropped.gopher_quality": 0,
        "dataset.quality_dropped.c4": 0, "dataset.quality_dropped.fineweb": 0,
        "dataset.quality_dropped_bytes.gopher_repetition": len(repeated.encode()),
        "dataset.quality_dropped_bytes.gopher_quality": 0, "dataset.quality_dropped_bytes.c4": 0,
        "dataset.quality_dropped_bytes.fineweb": 0}
    samples = json.loads(Path(client.download_artifacts(summary.mlflow_run_id, "data/quality_samples.json",
                                                        str(tmp_path))).read_text())
    assert samples == {"gopher_repetition": [{"source": str(corpus / "letters.txt"), "rule": "dup_para_frac",
                                              "bytes": len(repeated.encode()), "excerpt": repeated[:400]}]}
    assert summary.filtered == ("data.quality=fineweb kept 1 of 2 prose documents judged: "
                                "gopher_repetition 1 (50%) → gopher_quality 1 (50%) → c4 1 (50%) → fineweb 1 (50%)")
    assert f"filtered    {summary.filtered}" in summary.render()
