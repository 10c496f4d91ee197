"""The finetune flow on a model the pretrain flow trained, with a real Prefect server and a real
MLflow store: sft with LoRA and classification on the built-in demo, MLflow runs, registered
pyfunc models that load and predict, cached reruns, and bad input as one line."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from gptflow.data.finetune_demo import CLASSIFICATION_PACKAGES, TAG_KINDS
from gptflow.data.hashing import hash_file
from gptflow.flows.cli import main
from gptflow.flows.evaluate import evaluate
from gptflow.flows.finetune import finetune
from gptflow.flows.pretrain import pretrain

BASE = "models:/gptflow-tiny/1"
# A few steps of everything: these tests check the pipeline, not what a tiny model learns.
QUICK = {"train.max_steps": 6, "train.log_interval": 2, "train.val_interval": 3, "finetune.lora_rank": 4,
         "train.micro_batch_size": 4, "finetune.samples": 2, "sampling.max_new_tokens": 6}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(flows_run_here, tiny_corpus_dir, tmp_path_factory):
    """A workspace holding a tiny model trained in this process by the pretrain flow (a context of
    128 tokens, so an instruction and its answer fit)."""
    root = tmp_path_factory.mktemp("finetune-flow")
    with flows_run_here():
        pretrain(preset="tiny", corpus=[str(tiny_corpus_dir)], workspace=str(root),
                 overrides={"model.block_size": 128, "train.max_steps": 10})
        yield root


@pytest.fixture
def client(workspace):
    return MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")


def _load_registered(workspace: Path, uri: str):
    """``mlflow.pyfunc.load_model(uri)`` as a user pointing MLflow at the workspace's store does."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
        return mlflow.pyfunc.load_model(uri)




def _instructions(path: Path) -> Path:
    records = [{"prompt": f"What is {index} plus 1?", "response": f"{index + 1}"} for index in range(40)]
    records.append({"prompt": "Say nothing.", "response": ""})
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_sft_with_lora_is_logged_registered_and_cached_on_rerun(workspace, client, tmp_path, capsys, artifact_paths):
    data = _instructions(tmp_path / "instructions.jsonl")
    first = finetune(objective="sft", model=BASE, data=str(data), overrides=QUICK, workspace=str(workspace))
    second = finetune(objective="sft", model=BASE, data=str(data), overrides=QUICK, workspace=str(workspace))

    assert first.stages == {"prepare": "executed", "finetune": "executed", "evaluate": "executed"}
    assert second.stages == {"prepare": "cached", "finetune": "cached", "evaluate": "cached"}
    assert first.registered_model == second.registered_model == "gptflow-finetune-sft/1"
    assert first.metrics == second.metrics
    assert first.skipped.startswith("skipped 1 inputs: empty response ×1") and str(data) in first.skipped
    assert 0 < first.trainable_parameters < first.total_parameters
    # Evaluated on the saved, merged model: the loss the loop measured with LoRA modules in place.
    assert first.metrics["eval/val_loss"] == pytest.approx(first.final_val_loss, rel=1e-4)
    assert first.metrics["eval/base_val_loss"] == first.initial_val_loss
    assert len(first.samples) == 2 and first.samples[0]["prompt"].endswith("### Assistant:\n")

    first_run, second_run = client.get_run(first.mlflow_run_id), client.get_run(second.mlflow_run_id)
    assert first_run.info.status == second_run.info.status == "FINISHED"
    assert first_run.data.tags["gptflow.flow"] == "finetune" and first_run.data.tags["gptflow.objective"] == "sft"
    # Beside the fine-tunings, apart from the pretraining it started from: their losses are on other scales.
    assert client.get_experiment(first_run.info.experiment_id).name == "gptflow-finetune"
    assert client.search_runs([client.get_experiment_by_name("gptflow-pretrain").experiment_id],
                              filter_string="tags.`gptflow.flow` = 'finetune'") == []
    assert first.experiment == "gptflow-finetune" and "viewStateShareKey=gptflow&workflowType=machine_learning" \
        in first.runs_table
    assert second_run.data.tags["gptflow.stage.finetune"] == "cached"
    assert second_run.data.tags["gptflow.trained_in_run"] == first.mlflow_run_id
    assert "gptflow.trained_in_run" not in first_run.data.tags  # it trained its model itself
    params = first_run.data.params
    assert params["base_model"] == BASE and params["base_weights_hash"] == first.base_weights_hash
    assert params["finetune.lora_rank"] == "4" and params["finetune.max_length"] == "128"
    assert params["train.learning_rate"] == "0.003" and params["model.block_size"] == "128"
    assert params["sampling.max_new_tokens"] == "6" and params["objective"] == "sft"
    val_losses = client.get_metric_history(first.mlflow_run_id, "val/loss")
    assert [metric.step for metric in val_losses] == [0, 3, 6]
    assert [metric.step for metric in client.get_metric_history(first.mlflow_run_id, "train/loss")] == [2, 4, 6]
    # The cached run shows the curves of the training it reused, and that training's model.
    assert [(metric.step, metric.value) for metric in client.get_metric_history(second.mlflow_run_id, "val/loss")] == [
        (metric.step, metric.value) for metric in val_losses]
    assert second_run.data.metrics["val/loss"] == pytest.approx(first.final_val_loss)
    [model] = [client.get_logged_model(output.model_id) for output in first_run.outputs.model_outputs]
    assert [model_input.model_id for model_input in second_run.inputs.model_inputs] == [model.model_id]
    assert f"/runs/{first.mlflow_run_id}?" in second_run.data.tags["mlflow.note.content"]
    assert model.name == "gptflow-finetune-sft"
    assert model.tags["mlflow.note.content"] == (f"Chat model: {BASE} fine-tuned to answer prompts (LoRA rank 4, "
                                                 "6 steps).")
    assert model.params["finetune.lora_rank"] == "4" and model.params["base_model"] == BASE
    assert {metric.key for metric in model.metrics} >= {"eval/val_loss", "eval/base_val_loss"}
    [dataset_input] = first_run.inputs.dataset_inputs
    digest = params["data_fingerprint"][:8]
    assert (dataset_input.dataset.name, dataset_input.dataset.digest) == ("instructions.jsonl", digest)
    assert {(metric.dataset_name, metric.dataset_digest) for metric in model.metrics} == {
        ("instructions.jsonl", digest)}
    artifacts = artifact_paths(client, first.mlflow_run_id)
    model_files = ("MLmodel", "artifacts/final/model.safetensors", "artifacts/tokenizer.json",
                   "artifacts/chat_template.json")
    for expected in (*(f"gptflow-finetune-sft/{path}" for path in model_files), "eval/report.json", "eval/samples.md",
                     "loss_curve.png", "data/prepared.json"):
        assert expected in artifacts
    assert not [path for path in artifacts if path.endswith("contents.json") and not path.startswith("gptflow-")]
    assert not [path for path in artifact_paths(client, second.mlflow_run_id) if path.endswith("MLmodel")]

    chat = _load_registered(workspace, "models:/gptflow-finetune-sft/1")
    sampling = {"max_new_tokens": 4, "temperature": 0.7, "top_k": 20, "seed": 3}
    answers = chat.predict(["What is 3 plus 1?", "What is 7 plus 1?"], params=sampling)
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)
    # gptflow generate answers through the same chat template as the MLflow model.
    capsys.readouterr()
    assert main(["generate", "--model", "models:/gptflow-finetune-sft/1", "--prompt", "What is 3 plus 1?",
                 "--max-new-tokens", "4", "--temperature", "0.7", "--top-k", "20", "--seed", "3",
                 "--workspace", str(workspace)]) == 0
    assert capsys.readouterr().out == answers[0] + "\n"


def test_an_interrupted_finetuning_resumes_from_its_latest_checkpoint_unless_restarted(
    workspace, client, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    data = _instructions(tmp_path / "instructions.jsonl")
    # A training of its own, without dropout: its masks are drawn per process, so they differ on two ranks.
    settings = {**QUICK, "train.checkpoint_interval": 2, "train.seed": 7, "finetune.lora_dropout": 0.0}
    first = finetune(objective="sft", model=BASE, data=str(data), overrides=settings, workspace=str(workspace))
    [run_dir] = [directory for directory in (workspace / "store" / "finetunes").iterdir()
                 if (directory / "checkpoints").is_dir() and
                 json.loads((directory / "checkpoints/step-00000006/trainer.json").read_text())["train_config"]["seed"] == 7]
    weights = hash_file(run_dir / "final" / "model.safetensors")
    shutil.copytree(run_dir / "final", tmp_path / "first")
    # As a run killed after the checkpoint of step 4 leaves it.
    shutil.rmtree(run_dir / "final")
    shutil.rmtree(run_dir / "checkpoints" / "step-00000006")

    caplog.clear()
    # Resumed on two sharded ranks, each taking half of each micro-batch: the same training, so
    # the same key and checkpoints, the whole checkpoint split into the ranks' shards.
    on_two_ranks = {**settings, "train.nproc": 2, "train.parallelism": "fsdp", "train.micro_batch_size": 2}
    resumed = finetune(objective="sft", model=BASE, data=str(data), overrides=on_two_ranks, workspace=str(workspace))
    assert resumed.stages["finetune"] == "executed"
    assert f"finetune: resuming from step 4 (checkpoint {run_dir / 'checkpoints' / 'step-00000004'}," in caplog.text
    assert client.get_run(resumed.mlflow_run_id).data.tags["gptflow.resumed_from_step"] == "4"
    resumed_weights, first_weights = (load_file(directory / "model.safetensors")
                                      for directory in (run_dir / "final", tmp_path / "first"))
    for name, tensor in first_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, atol=1e-4, rtol=1e-4, msg=name)
    assert resumed.initial_val_loss == first.initial_val_loss
    assert resumed.final_val_loss == pytest.approx(first.final_val_loss, rel=1e-4)

    caplog.clear()
    restarted = finetune(objective="sft", model=BASE, data=str(data), overrides=settings, workspace=str(workspace),
                         restart=True)
    assert restarted.stages["finetune"] == "executed" and "resuming" not in caplog.text
    assert hash_file(run_dir / "final" / "model.safetensors") == weights


def test_sft_sharded_over_two_processes_logs_one_run_and_registers_one_model(workspace, client, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    data = _instructions(tmp_path / "instructions.jsonl")
    settings = {**QUICK, "train.nproc": 2, "train.parallelism": "fsdp", "train.micro_batch_size": 2, "train.seed": 11}
    summary = finetune(objective="sft", model=BASE, data=str(data), overrides=settings, workspace=str(workspace))
    assert summary.stages["finetune"] == "executed"
    assert "finetune: launching 2 processes" in caplog.text
    run = client.get_run(summary.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.parallelism"] == "fsdp"
    # Rank 0 alone reports: one value per report step.
    assert [metric.step for metric in client.get_metric_history(summary.mlflow_run_id, "val/loss")] == [0, 3, 6]
    assert [metric.step for metric in client.get_metric_history(summary.mlflow_run_id, "train/loss")] == [2, 4, 6]
    # The sharded model was gathered into one merged model, which evaluates to the loop's last score.
    assert summary.metrics["eval/val_loss"] == pytest.approx(summary.final_val_loss, rel=1e-4)
    model = _load_registered(workspace, summary.model_uri)
    assert isinstance(model.predict(["Add 1 to 3."])[0], str)


def test_classification_demo_reports_accuracy_f1_and_a_confusion_matrix(workspace, client, artifact_paths):
    summary = finetune(objective="classification", model=BASE, overrides=QUICK, workspace=str(workspace))

    assert summary.stages["demo-data"] == "executed" and summary.stages["finetune"] == "executed"
    assert summary.data.startswith("built-in demo") and summary.truncated > 0  # functions longer than 128 tokens
    metrics = summary.metrics
    assert 0 <= metrics["eval/accuracy"] <= 1 and 0 <= metrics["eval/macro_f1"] <= 1
    assert metrics["eval/majority_accuracy"] == pytest.approx(1 / len(CLASSIFICATION_PACKAGES), abs=0.1)
    assert set(metrics) >= {f"eval/f1/{package}" for package in CLASSIFICATION_PACKAGES}
    run = client.get_run(summary.mlflow_run_id)
    assert run.data.metrics["eval/accuracy"] == metrics["eval/accuracy"]
    # The accuracy is the classifier's own: its logged model's page shows it.
    [model] = [client.get_logged_model(output.model_id) for output in run.outputs.model_outputs]
    assert {metric.key: metric.value for metric in model.metrics}["eval/accuracy"] == metrics["eval/accuracy"]
    assert model.name == "gptflow-finetune-classification"
    description = model.tags["mlflow.note.content"]
    assert description.startswith(f"Classifier into {len(CLASSIFICATION_PACKAGES)} labels (")
    assert description.endswith(f"{BASE} fine-tuned with a linear head (LoRA rank 4, 6 steps).")
    artifacts = artifact_paths(client, summary.mlflow_run_id)
    assert {"eval/confusion_matrix.png", "eval/predictions.jsonl", "eval/report.json",
            "gptflow-finetune-classification/artifacts/classifier/head.safetensors"} <= artifacts
    report = json.loads(Path(client.download_artifacts(summary.mlflow_run_id, "eval/report.json")).read_text())
    assert report["classes"]["labels"] == sorted(CLASSIFICATION_PACKAGES)
    assert sum(map(sum, report["classes"]["confusion"])) == metrics["eval/val_examples"]

    classifier = _load_registered(workspace, "models:/" + summary.registered_model)
    labels = classifier.predict(["def run_until_complete(self, future):\n    return future.result()", "import email"])
    assert len(labels) == 2 and set(labels) <= set(CLASSIFICATION_PACKAGES)


def test_the_evaluate_flow_scores_a_registered_classifier_on_a_labelled_file(workspace, client, tmp_path, capsys,
                                                                            artifact_paths):
    tuned = finetune(objective="classification", model=BASE, overrides=QUICK, workspace=str(workspace))  # cached
    uri = "models:/" + tuned.registered_model
    packages = sorted(CLASSIFICATION_PACKAGES)
    rows = [(f"def handler_{index}(self, value):\n    return {packages[index % len(packages)]}.run(value)",
             packages[index % len(packages)]) for index in range(12)]
    labelled = tmp_path / "labelled.csv"
    labelled.write_text("snippet,package\n" + "".join(f'"{text}",{label}\n' for text, label in rows)
                        + '"def other(): pass",no_such_package\n')
    fields = {"data.text_field": "snippet", "data.label_field": "package"}

    first = evaluate(model=uri, classification=str(labelled), overrides=fields, workspace=str(workspace))
    second = evaluate(model=uri, classification=str(labelled), overrides=fields, workspace=str(workspace))

    assert first.stages == {"classification": "executed"} and second.stages == {"classification": "cached"}
    assert first.samples == [] and first.metrics() == second.metrics()
    metrics = first.metrics()
    assert metrics["eval/eval_examples"] == 12 and metrics["eval/skipped"] == 1
    assert "label the classifier was not trained on ×1" in first.classification.skipped
    # The flow classifies exactly as the registered MLflow model does.
    predicted = _load_registered(workspace, uri).predict([text for text, _ in rows])
    assert metrics["eval/accuracy"] == pytest.approx(sum(p == label for p, (_, label) in zip(predicted, rows)) / 12)
    confusion = first.classification.classes["confusion"]
    assert sum(map(sum, confusion)) == 12
    assert [sum(row) for row in confusion] == [sum(label == package for _, label in rows) for package in packages]
    assert metrics["eval/majority_accuracy"] == pytest.approx(max(sum(row) for row in confusion) / 12)
    artifacts = artifact_paths(client, first.mlflow_run_id)
    assert {"eval/classification/confusion_matrix.png", "eval/classification/predictions.jsonl",
            "eval/report.json"} <= artifacts
    report = json.loads(Path(client.download_artifacts(first.mlflow_run_id, "eval/report.json")).read_text())
    assert report["classification"]["labels"] == packages and report["metrics"]["eval/accuracy"] == metrics["eval/accuracy"]
    assert client.get_run(first.mlflow_run_id).data.metrics["eval/macro_f1"] == metrics["eval/macro_f1"]

    assert main(["generate", "--model", uri, "--prompt", "def f():", "--workspace", str(workspace)]) == 2
    assert "is a classifier" in capsys.readouterr().err
    assert main(["export", "--model", uri, "--out", str(tmp_path / "hf"), "--workspace", str(workspace)]) == 2
    assert "is a classifier" in capsys.readouterr().err and not (tmp_path / "hf").exists()
    # The trunk alone is a language model: it has no head to classify with.
    assert main(["evaluate", "--model", BASE, "--classification", str(labelled), "--workspace", str(workspace)]) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and "is a language model, not a classifier" in error


def test_tagging_demo_reports_span_scores_and_a_token_confusion_matrix(workspace, client, artifact_paths):
    summary = finetune(objective="tagging", model=BASE, overrides=QUICK, workspace=str(workspace))

    assert summary.stages["demo-data"] == "executed" and summary.stages["finetune"] == "executed"
    assert summary.data.startswith("built-in demo: the Python token kind")
    metrics = summary.metrics
    assert {"eval/precision", "eval/recall", "eval/f1", "eval/token_accuracy", "eval/val_spans"} <= set(metrics)
    assert set(metrics) >= {f"eval/{name}/{kind}" for kind in TAG_KINDS for name in ("precision", "recall", "f1")}
    assert all(0 <= metrics[name] <= 1 for name in ("eval/precision", "eval/recall", "eval/f1"))
    run = client.get_run(summary.mlflow_run_id)
    assert run.data.metrics["eval/f1"] == metrics["eval/f1"]
    assert int(run.data.params["dataset.val_spans"]) >= metrics["eval/val_spans"]  # less the spans cut by max_length
    artifacts = artifact_paths(client, summary.mlflow_run_id)
    assert {"eval/confusion_matrix.png", "eval/predictions.jsonl", "eval/report.json",
            "gptflow-finetune-tagging/artifacts/classifier/head.safetensors"} <= artifacts
    report = json.loads(Path(client.download_artifacts(summary.mlflow_run_id, "eval/report.json")).read_text())
    assert report["classes"]["token_labels"] == ["O", *sorted(TAG_KINDS)]
    assert sum(support["support"] for support in report["classes"]["per_label"].values()) == metrics["eval/val_spans"]
    predictions = Path(client.download_artifacts(summary.mlflow_run_id, "eval/predictions.jsonl")).read_text().splitlines()
    assert len(predictions) == metrics["eval/val_examples"]
    assert all(len(span) == 4 for line in predictions for span in json.loads(line)["gold"])

    tagger = _load_registered(workspace, "models:/" + summary.registered_model)
    texts = ["def area(r):\n    return 3.14 * r * r  # circle\n", "x = 1"]
    found = tagger.predict(texts)
    assert len(found) == 2
    for text, spans in zip(texts, found):
        for span in spans:  # character offsets into the text the span came from
            assert text[span["start"]:span["end"]] == span["text"] and span["label"] in TAG_KINDS


def test_the_evaluate_flow_scores_a_tagger_on_a_conll_file(workspace, client, tmp_path, capsys, artifact_paths):
    # Long enough to learn something, so that there are predicted spans to compare.
    tuned = finetune(objective="tagging", model=BASE, workspace=str(workspace),
                     overrides={**QUICK, "finetune.span_label_from": "last_token", "finetune.lora_rank": 0,
                                "train.max_steps": 40})
    uri = "models:/" + tuned.registered_model
    lines, sentences = [], []
    for index in range(10):
        words = ["def", f"f{index}", "(", "x", ")", ":", "return", "x", "+", str(index), "#", "add"]
        tags = ["B-keyword", "B-name", "O", "B-name", "O", "O", "B-keyword", "B-name", "O", "B-number", "B-comment",
                "I-comment"]
        lines += [f"{word} {tag}" for word, tag in zip(words, tags)] + [""]
        sentences.append((words, tags))
    lines += ["def PER", "f O", ""]  # line 131: a tag of no scheme
    lines += ["Ada B-PER", ""]  # a label the tagger was never trained on
    conll = tmp_path / "code.conll"
    conll.write_text("\n".join(lines))

    first = evaluate(model=uri, tagging=str(conll), workspace=str(workspace))
    second = evaluate(model=uri, tagging=str(conll), workspace=str(workspace))

    assert first.stages == {"tagging": "executed"} and second.stages == {"tagging": "cached"}
    assert first.samples == [] and first.metrics() == second.metrics()
    metrics = first.metrics()
    assert metrics["eval/eval_examples"] == 10 and metrics["eval/eval_spans"] == 70 and metrics["eval/skipped"] == 2
    assert f"{conll}:131 ('PER')" in first.tagging.skipped and "span label the tagger was not trained on" in first.tagging.skipped
    # The flow scores exactly what the registered MLflow model finds, span for span.
    found = _load_registered(workspace, uri).predict([" ".join(words) for words, _ in sentences])
    gold = {(index, start, end, label) for index, (words, tags) in enumerate(sentences)
            for start, end, label in _conll_char_spans(words, tags)}
    predicted = {(index, span["start"], span["end"], span["label"]) for index, spans in enumerate(found) for span in spans}
    scored = [json.loads(line)["predicted"] for line in (Path(first.tagging.directory) / "predictions.jsonl").open()]
    assert predicted and predicted == {(index, *span[:3]) for index, spans in enumerate(scored) for span in spans}
    correct = len(gold & predicted)
    assert metrics["eval/precision"] == pytest.approx(correct / len(predicted) if predicted else 0.0)
    assert metrics["eval/recall"] == pytest.approx(correct / len(gold))
    assert first.tagging.labels["span_label_from"] == "last_token"
    assert {"eval/tagging/confusion_matrix.png", "eval/tagging/predictions.jsonl", "eval/report.json"} <= artifact_paths(
        client, first.mlflow_run_id)

    assert main(["evaluate", "--model", BASE, "--tagging", str(conll), "--workspace", str(workspace)]) == 2
    assert "is a language model, not a tagger: --tagging scores" in capsys.readouterr().err
    assert main(["evaluate", "--model", uri, "--classification", str(conll), "--workspace", str(workspace)]) == 2
    assert "is a tagger, not a classifier" in capsys.readouterr().err
    assert main(["generate", "--model", uri, "--prompt", "def f():", "--workspace", str(workspace)]) == 2
    assert "is a tagger: it labels texts rather than writing them" in capsys.readouterr().err


def _conll_char_spans(words: list[str], tags: list[str]) -> list[tuple[int, int, str]]:
    """IOB2 tags of space-joined words as character spans (every span here is one word, or B- then I-)."""
    spans, position = [], 0
    for word, tag in zip(words, tags):
        if tag.startswith("B-"):
            spans.append([position, position + len(word), tag[2:]])
        elif tag.startswith("I-"):
            spans[-1][1] = position + len(word)
        position += len(word) + 1
    return [tuple(span) for span in spans]


def test_without_a_model_the_newest_pretrained_model_is_tuned_and_named(workspace, capsys):
    settings = [argument for name, value in QUICK.items() for argument in ("--set", f"{name}={value}")]
    assert main(["finetune", "--objective", "classification", *settings, "--workspace", str(workspace)]) == 0
    output = capsys.readouterr()
    assert f'gptflow: no --model given: fine-tuning {BASE}, the newest pretrained model (run "' in output.err
    assert f"base model  {BASE} (weights" in output.out


def test_bad_data_and_a_missing_default_model_are_one_line(workspace, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": ""}\n{"prompt": "b"}\nnot json\n')
    assert main(["finetune", "--model", BASE, "--data", str(bad), "--workspace", str(workspace)]) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert f"No usable training example in {bad}" in error and f"{bad}:3" in error

    # Refused before any flow starts: one line, not Prefect's report of a failed flow run as well.
    assert main(["finetune", "--workspace", str(tmp_path / "empty")]) == 2
    error = capsys.readouterr().err
    assert error.count("no pretrained model (gptflow-<preset>) is registered") == 1 and "gptflow pretrain" in error
    assert "Flow run" not in error and "Traceback" not in error

    assert main(["finetune", "--model", BASE, "--set", "finetune.max_length=4096", "--workspace", str(workspace)]) == 2
    assert "exceeds the base model's context of 128" in capsys.readouterr().err
