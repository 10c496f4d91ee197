"""A WARC corpus with ``--set data.languages=en``, ``data.quality=fineweb`` and a
``data.url_blocklist`` end to end: a real pretrain, a real Prefect server and a real MLflow store;
what the blocklist, the language and the quality filters dropped is in the run, and the samples of
dropped documents are a Prefect table too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

from gptflow.data.errors import SkipReport
from gptflow.data.sources import SourceFile
from gptflow.data.web import read_pages
from gptflow.flows.pretrain import pretrain

PAGES = Path(__file__).parent.parent / "fixtures" / "web"

pytestmark = pytest.mark.slow


def test_documents_dropped_by_blocklist_language_and_quality_are_logged_per_filter_and_per_file(
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
    blocklist = tmp_path / "blocked.txt"
    blocklist.write_text("# the German page's host\nexample.de\n", encoding="utf-8")
    [(_, german)] = read_pages(SourceFile(PAGES / "article_de.htm", "html"), SkipReport())

    summary = pretrain(corpus=[str(corpus)], preset="tiny", workspace=str(workspace),
                       overrides={"data.languages": "en", "data.quality": "fineweb",
                                  "data.url_blocklist": str(blocklist), "train.max_steps": 2, "eval.eval_tokens": 512})

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    params = client.get_run(summary.mlflow_run_id).data.params
    logged = json.loads(Path(client.download_artifacts(summary.mlflow_run_id, "data/languages.json",
                                                       str(tmp_path))).read_text())
    # The German page is blocked before it is identified: only the French one counts as dropped by language.
    assert logged["by_source"][str(corpus / warc.name)] == {"kept": {"en": 1}, "dropped": {"fr": 1}}
    assert int(params["dataset.language_dropped.fr"]) == logged["dropped"]["fr"] >= 1
    assert int(params["dataset.language_dropped"]) == sum(logged["dropped"].values())
    assert {key.removeprefix("dataset.language_kept."): int(value) for key, value in params.items()
            if key.startswith("dataset.language_kept.")} == logged["kept"]
    assert logged["kept"]["en"] >= 1

    quality = json.loads(Path(client.download_artifacts(summary.mlflow_run_id, "data/quality.json",
                                                        str(tmp_path))).read_text())
    # Judged: the blocked German page, then the prose documents that data.languages kept (the English
    # page and the letters), not the Python files.
    assert set(quality["by_source"]) == {str(corpus / warc.name), str(corpus / "letters.txt")}
    assert quality["judged"] == int(params["dataset.quality_judged"]) == 3
    assert quality["by_source"][str(corpus / warc.name)]["dropped"] == {"url_blocklist": 1}
    assert quality["by_source"][str(corpus / "letters.txt")]["dropped"] == {"gopher_repetition": 1}
    assert {key: int(value) for key, value in params.items() if key.startswith("dataset.quality_dropped")} == {
        "dataset.quality_dropped.url_blocklist": 1, "dataset.quality_dropped.gopher_repetition": 1,
        "dataset.quality_dropped.gopher_quality": 0, "dataset.quality_dropped.c4": 0,
        "dataset.quality_dropped.fineweb": 0, "dataset.quality_dropped_bytes.url_blocklist": len(german.encode()),
        "dataset.quality_dropped_bytes.gopher_repetition": len(repeated.encode()),
        "dataset.quality_dropped_bytes.gopher_quality": 0, "dataset.quality_dropped_bytes.c4": 0,
        "dataset.quality_dropped_bytes.fineweb": 0}
    samples = json.loads(Path(client.download_artifacts(summary.mlflow_run_id, "data/quality_samples.json",
                                                        str(tmp_path))).read_text())
    assert samples == {
        "url_blocklist": [{"source": str(corpus / warc.name), "rule": "listed_domain", "bytes": len(german.encode()),
                           "excerpt": german[:400], "url": "https://example.de/"}],
        "gopher_repetition": [{"source": str(corpus / "letters.txt"), "rule": "dup_para_frac",
                               "bytes": len(repeated.encode()), "excerpt": repeated[:400], "url": None}]}
    assert summary.filtered == (f"data.url_blocklist={blocklist}, data.quality=fineweb kept 1 of 3 prose documents "
                                "judged: url_blocklist 2 (67%) → gopher_repetition 1 (33%) → gopher_quality 1 (33%) "
                                "→ c4 1 (33%) → fineweb 1 (33%)")
    assert f"filtered    {summary.filtered}" in summary.render()

    # The same samples, as a table in the flow run's Prefect artifacts, in the filters' order, excerpts
    # shortened to one line.
    flow_run_id = client.get_run(summary.mlflow_run_id).data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as prefect:
        [table] = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["quality-dropped-samples"]),
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    assert table.type == "table" and summary.filtered in table.description
    assert json.loads(table.data) == [
        {"filter": "url_blocklist", "rule": "listed_domain", "bytes": len(german.encode()),
         "source": str(corpus / warc.name), "url": "https://example.de/", "excerpt": " ".join(german[:150].split())},
        {"filter": "gopher_repetition", "rule": "dup_para_frac", "bytes": len(repeated.encode()),
         "source": str(corpus / "letters.txt"), "url": "", "excerpt": " ".join(repeated[:150].split())}]
