"""The evaluate flow on a model the pretrain flow trained, with a real Prefect server and a real
MLflow store: registry URI, run id and directory sources, caching, reports and input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from gptflow.data.errors import CorpusError
from gptflow.flows.cli import main
from gptflow.flows.evaluate import evaluate
from gptflow.flows.pretrain import pretrain

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tests" / "fixtures" / "hellaswag_sample.jsonl"
# The tiny preset's eval_tokens, so the val loss must equal the one the pretrain flow logged.
EVAL_SETTINGS = {"eval.eval_tokens": 4096, "sampling.max_new_tokens": 8}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(flows_run_here, tiny_corpus_dir, tmp_path_factory):
    """A tiny model trained in this process by the pretrain flow; its workspace and summary."""
    workspace = tmp_path_factory.mktemp("evaluate-flow")
    with flows_run_here():
        yield workspace, pretrain(preset="tiny", corpus=[str(tiny_corpus_dir)], workspace=str(workspace))


def _evaluate(workspace: Path, model: str, corpus: Path, **options):
    return evaluate(model=model, corpus=[str(corpus)], multiple_choice=str(SAMPLE), overrides=EVAL_SETTINGS,
                    workspace=str(workspace), **options)


def test_registry_uri_then_run_id_score_the_same_model_and_the_rerun_is_cached(trained, tiny_corpus_dir):
    workspace, pretrained = trained
    first = _evaluate(workspace, "models:/gptflow-tiny/1", tiny_corpus_dir)
    second = _evaluate(workspace, pretrained.mlflow_run_id, tiny_corpus_dir)

    # The pretrain flow already ingested and tokenized this corpus with this tokenizer.
    assert first.stages == {"ingest": "cached", "tokenize": "cached", "loss": "executed",
                            "multiple_choice": "executed", "samples": "executed"}
    assert set(second.stages.values()) == {"cached"}
    assert first.weights_hash == second.weights_hash
    assert first.metrics() == second.metrics()
    metrics = first.metrics()
    assert metrics["eval/val_loss"] == pytest.approx(pretrained.val_loss, rel=1e-9)
    assert metrics["eval/unigram_loss"] == pytest.approx(pretrained.unigram_loss, rel=1e-9)
    assert metrics["eval/mc_examples"] == 8 and metrics["eval/mc_truncated"] >= 1
    assert 0 <= metrics["eval/mc_acc"] <= 1 and 0 <= metrics["eval/mc_acc_norm"] <= 1
    assert [sample.split(" ")[0] for sample in first.samples][:2] == ["def", "import"]

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    first_run, second_run = client.get_run(first.mlflow_run_id), client.get_run(second.mlflow_run_id)
    pretrain_run = client.get_run(pretrained.mlflow_run_id)
    # Evaluations compare with evaluations, in their own experiment.
    assert client.get_experiment(first_run.info.experiment_id).name == "gptflow-evaluate"
    assert client.get_experiment(pretrain_run.info.experiment_id).name == "gptflow-pretrain"
    assert first_run.info.status == second_run.info.status == "FINISHED"
    assert first_run.data.tags["gptflow.flow"] == "evaluate"
    assert first_run.data.tags["gptflow.stage.multiple_choice"] == "executed"
    assert second_run.data.tags["gptflow.stage.multiple_choice"] == "cached"
    assert first_run.data.params["model_source"] == "models:/gptflow-tiny/1"
    assert second_run.data.params["model_source"] == pretrained.mlflow_run_id
    assert first_run.data.params["model_weights_hash"] == first.weights_hash
    assert first_run.data.params["model.n_layer"] == "2" and first_run.data.params["eval.eval_tokens"] == "4096"
    assert second_run.data.metrics == first_run.data.metrics

    report = json.loads(Path(client.download_artifacts(second.mlflow_run_id, "eval/report.json")).read_text())
    assert report["model"]["source"] == pretrained.mlflow_run_id
    assert report["loss"]["split"] == "val" and report["loss"]["corpus"] == [str(tiny_corpus_dir)]
    assert report["multiple_choice"]["examples"] == 8 and "characters" in report["multiple_choice"]["scoring"]
    assert report["metrics"] == pytest.approx(metrics)
    predictions = client.download_artifacts(first.mlflow_run_id, "eval/multiple_choice/predictions.jsonl")
    rows = [json.loads(line) for line in Path(predictions).read_text().splitlines()]
    assert [row["location"] for row in rows] == [f"{SAMPLE}:{line}" for line in range(1, 9)]
    assert all(len(row["log_likelihoods"]) == 4 for row in rows)


def test_a_model_directory_on_every_document_of_a_held_out_file(trained, tmp_path):
    workspace, _ = trained
    [final_dir] = (workspace / "store" / "runs").glob("*/final")
    held_out = tmp_path / "held_out.py"
    held_out.write_text(Path(json.__file__).read_text())
    # A file shorter than data.segment_chars is one segment, here in train: no val split.
    settings = {"eval.eval_tokens": 1024, "sampling.max_new_tokens": 4, "data.segment_chars": 1 << 20}
    with pytest.raises(CorpusError, match="val split is empty"):
        evaluate(model=str(final_dir), corpus=[str(held_out)], overrides=settings, workspace=str(workspace))
    summary = evaluate(model=str(final_dir), corpus=[str(held_out)], split="all", overrides=settings,
                       workspace=str(workspace))
    assert summary.multiple_choice is None and summary.loss.unigram_loss is None
    assert set(summary.metrics()) == {"eval/all_loss", "eval/all_tokens", "eval/perplexity", "eval/bits_per_byte"}
    assert summary.metrics()["eval/all_tokens"] == 1024


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--model", "no-such-model", "--multiple-choice", str(SAMPLE)], "is neither an MLflow model URI"),
        (["--model", "models:/gptflow-tiny/1"], "Nothing to evaluate"),
        (["--model", "models:/gptflow-tiny/1", "--multiple-choice", "missing.jsonl"], "missing.jsonl does not exist"),
        (["--model", "models:/gptflow-tiny/1", "--multiple-choice", str(SAMPLE), "--set", "train.max_steps=3"],
         "evaluate takes data.*, tokenize.*, eval.*, sampling.* settings, not train.*"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(trained, capsys, arguments, message):
    workspace, _ = trained
    assert main(["evaluate", *arguments, "--workspace", str(workspace)]) == 2
    assert message in capsys.readouterr().err.splitlines()[-1]


def test_a_malformed_multiple_choice_line_is_reported_before_anything_runs(trained, tmp_path, capsys):
    workspace, _ = trained
    bad = tmp_path / "bad.jsonl"
    out_of_range = {"ctx": "x", "endings": ["a", "b"], "label": 7}
    bad.write_text(SAMPLE.read_text().splitlines()[0] + "\n" + json.dumps(out_of_range) + "\n")
    assert main(["evaluate", "--model", "anything", "--multiple-choice", str(bad), "--workspace", str(workspace)]) == 2
    error = capsys.readouterr().err
    assert f"{bad}:2: label 7 is out of range for 2 endings" in error and "Traceback" not in error
