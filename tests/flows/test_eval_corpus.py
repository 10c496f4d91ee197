"""``--eval-corpus``: a sweep over how the corpus is read (``data.quality``) scores every point on the
same text, ranks the points by it, and a rerun finds every score cached; on a real Prefect server
and a real MLflow store."""

from __future__ import annotations

import ast
import math
import shutil
import sysconfig
from pathlib import Path

import pytest
from mlflow import MlflowClient

from gptflow.flows.sweep import sweep
from gptflow.tasks.sweep_plan import EVAL_CORPUS_BITS_PER_BYTE

pytestmark = pytest.mark.slow

SHARED = {"train.max_steps": 4, "train.val_interval": 4, "train.log_interval": 2, "eval.eval_tokens": 1024}


def _module_docstrings(names: list[str]) -> str:
    """English prose that ships with Python: the docstrings of standard-library modules."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [ast.get_docstring(ast.parse((stdlib / f"{name}.py").read_text(encoding="utf-8"))) for name in names]
    return "\n\n".join(text for text in texts if text)


@pytest.fixture(scope="module")
def corpora(tiny_corpus_dir, tmp_path_factory):
    """A training corpus of code and prose, one prose file of which Gopher's repetition filter
    drops, and an evaluation corpus of other prose."""
    train = tmp_path_factory.mktemp("train-corpus")
    for source in sorted(tiny_corpus_dir.glob("json_*.py")):
        shutil.copy2(source, train / source.name)
    (train / "modules.txt").write_text(_module_docstrings(["argparse", "subprocess", "typing", "tarfile"]))
    (train / "letters.txt").write_text("\n\n".join(
        ["She kept the old letters in a wooden box under the bed and read them again every winter."] * 40))
    held_out = tmp_path_factory.mktemp("eval-corpus")
    (held_out / "prose.txt").write_text(_module_docstrings(["zipfile", "pickle", "logging/__init__", "difflib"]))
    return train, held_out


def test_a_data_sweep_is_ranked_by_the_same_evaluation_text_for_every_point(
        corpora, flows_run_here, tmp_path, artifact_paths):
    train, held_out = corpora
    workspace = tmp_path / "workspace"
    grid = {"data.quality": ["none", "gopher"]}
    with flows_run_here():
        first = sweep(grid=grid, corpus=[str(train)], preset="tiny", overrides=SHARED, workspace=str(workspace),
                      eval_corpus=[str(held_out)])
        again = sweep(grid=grid, corpus=[str(train)], preset="tiny", overrides=SHARED, workspace=str(workspace),
                      eval_corpus=[str(held_out)])

    assert [outcome.status for outcome in first.outcomes] == ["completed", "completed"]
    scores = [outcome.eval_corpus_bits_per_byte for outcome in first.outcomes]
    assert all(math.isfinite(score) and score > 0 for score in scores)
    assert first.best.eval_corpus_bits_per_byte == min(scores)
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    points = [client.get_run(outcome.mlflow_run_id).data for outcome in first.outcomes]
    # Each point trained on its own corpus (the gopher point without letters.txt) and was scored on the same text.
    assert points[0].params["data_fingerprint"] != points[1].params["data_fingerprint"]
    assert points[0].params["eval_corpus.fingerprint"] == points[1].params["eval_corpus.fingerprint"]
    assert [point.metrics[EVAL_CORPUS_BITS_PER_BYTE] for point in points] == pytest.approx(scores)
    assert all(point.tags["gptflow.stage.eval-corpus"] == "executed" for point in points)

    parent = client.get_run(first.mlflow_run_id).data
    assert parent.metrics["sweep/best_eval_corpus_bits_per_byte"] == pytest.approx(min(scores))
    assert "sweep/best_val_loss" not in parent.metrics  # the best point's val loss need not be the lowest
    assert f"| status | {EVAL_CORPUS_BITS_PER_BYTE} | eval/val_loss |" in parent.tags["mlflow.note.content"]
    assert f"2 points over data.quality, 0 failed, ranked by {EVAL_CORPUS_BITS_PER_BYTE}" in first.description()
    assert "sweep/bits_per_byte_vs_data.quality.png" in artifact_paths(client, first.mlflow_run_id)
    assert "best        point" in first.render() and EVAL_CORPUS_BITS_PER_BYTE in first.render()

    # The rerun trains nothing and finds each point's score cached, equal to the first.
    assert [outcome.training for outcome in again.outcomes] == ["cached", "cached"]
    assert [outcome.eval_corpus_bits_per_byte for outcome in again.outcomes] == scores
    assert all(client.get_run(outcome.mlflow_run_id).data.tags["gptflow.stage.eval-corpus"] == "cached"
               for outcome in again.outcomes)
