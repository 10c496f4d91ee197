"""The data stages' per-file units run on a real local Ray cluster (through prefect-ray's task
runner), each a Prefect task run, and write byte for byte what running them in the flow's own
process writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

from gptflow.data.errors import SkipReport
from gptflow.data.hashing import hash_file
from gptflow.data.sources import SourceFile
from gptflow.data.web import read_pages
from gptflow.flows.pretrain import pretrain

PAGES = Path(__file__).parent.parent / "fixtures" / "web"

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


def _filter_reports(workspace: Path, mlflow_run_id: str, download_to: Path) -> dict[str, dict]:
    """What the run logged of its language and quality filters: ``data/languages.json`` and
    ``data/quality.json``, by name."""
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    return {name: json.loads(Path(client.download_artifacts(mlflow_run_id, f"data/{name}.json",
                                                            str(download_to))).read_text())
            for name in ("languages", "quality")}


def test_language_and_quality_filters_on_ray_keep_and_drop_what_the_flow_s_process_does(
        prefect_api_url, ray_cluster, tiny_corpus_dir, make_crawl, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus_dir, corpus)  # code, which no prose filter judges: enough text for a val split
    crawl = make_crawl(tmp_path)  # English, French and German pages
    shutil.move(crawl, corpus / crawl.name)
    [(_, article)] = read_pages(SourceFile(PAGES / "article_en.html", "html"), SkipReport())
    sentences = [sentence.strip() + "." for sentence in article.split(".") if len(sentence.split()) > 3]
    prose = {  # each crafted to be dropped by one filter, and one kept
        "letters.txt": "\n\n".join(["She kept the old letters in a wooden box under the bed and read them again "
                                    "every winter, one by one, while the snow fell on the roof."] * 40),
        "note.txt": sentences[1],
        "placeholder.txt": "\n".join([*sentences[:4], "Lorem ipsum dolor sit amet is placeholder text.",
                                      *sentences[4:]]),
        "unfinished.txt": "\n".join(sentence.rstrip(".") + " and so on" for sentence in sentences),
        "article.txt": article,
    }
    for name, text in prose.items():
        (corpus / name).write_text(text, encoding="utf-8")
    overrides = {"data.languages": "en", "data.quality": "fineweb", "train.max_steps": 2, "eval.eval_tokens": 512}

    in_process = pretrain(corpus=[str(corpus)], preset="tiny", workspace=str(tmp_path / "in-process"),
                          overrides=overrides)
    on_ray = pretrain(corpus=[str(corpus)], preset="tiny", workspace=str(tmp_path / "ray"), ray=ray_cluster,
                      overrides=overrides)

    expected = _filter_reports(tmp_path / "in-process", in_process.mlflow_run_id, tmp_path / "in-process-logged")
    assert _filter_reports(tmp_path / "ray", on_ray.mlflow_run_id, tmp_path / "ray-logged") == expected
    assert expected["languages"]["dropped"] == {"fr": 1, "de": 1}
    dropped = {Path(source).name: report["dropped"] for source, report in expected["quality"]["by_source"].items()}
    assert dropped == {"pages.warc.gz": {}, "letters.txt": {"gopher_repetition": 1}, "note.txt": {"gopher_quality": 1},
                       "placeholder.txt": {"c4": 1}, "unfinished.txt": {"fineweb": 1}, "article.txt": {}}
    assert on_ray.filtered == in_process.filtered
    assert _shards(tmp_path / "ray") == _shards(tmp_path / "in-process")
    sources = sorted(path.name for path in corpus.iterdir())
    assert _unit_task_runs(tmp_path / "ray", on_ray.mlflow_run_id, "ingest ") == [f"ingest {name}" for name in sources]
