"""gptflow evaluate --lm-eval: lm-evaluation-harness runs on a gptflow model through gptflow's own
model class, on a task YAML and a JSONL file made here (nothing downloaded); on the same file its
multiple-choice acc and acc_norm equal gptflow's own --multiple-choice scorer's; metrics land in
MLflow as lm_eval/<task>/<metric>; a rerun is cached; an unknown task is one clear line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from gptflow.data.tokenizer import load_tokenizer
from gptflow.flows.cli import main
from gptflow.flows.evaluate import evaluate
from gptflow.model.checkpoint import save_final
from gptflow.model.config import ModelConfig, pad_vocab_size
from gptflow.model.gpt import GPT

pytestmark = pytest.mark.slow
HELLASWAG_SAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "hellaswag_sample.jsonl"
TASK_YAML = """task: gptflow_sample
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture
def model_dir(tmp_path, bpe_tokenizer_file):
    pytest.importorskip("lm_eval")
    vocab_size = pad_vocab_size(load_tokenizer(bpe_tokenizer_file).get_vocab_size())
    torch.manual_seed(0)
    gpt = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=vocab_size))
    with torch.no_grad():  # a random model with opinions: its choices must differ between endings
        gpt.transformer.wte.weight.mul_(30)
    final = save_final(tmp_path / "run", gpt)
    shutil.copyfile(bpe_tokenizer_file, tmp_path / "run" / "tokenizer.json")
    return final


def test_the_harness_and_gptflows_scorer_agree_and_metrics_reach_mlflow(model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "gptflow_sample.yaml").write_text(TASK_YAML.format(data=HELLASWAG_SAMPLE))
    workspace = tmp_path / "ws"
    arguments = dict(model=str(model_dir), multiple_choice=str(HELLASWAG_SAMPLE), lm_eval=["gptflow_sample"],
                     lm_eval_tasks_dir=str(tasks_dir), workspace=str(workspace))
    first = evaluate(**arguments)
    harness = first.lm_eval.metrics
    assert harness["lm_eval/gptflow_sample/acc"] == pytest.approx(first.multiple_choice.acc)
    assert harness["lm_eval/gptflow_sample/acc_norm"] == pytest.approx(first.multiple_choice.acc_norm)
    assert 0 < first.multiple_choice.acc < 1 or first.multiple_choice.acc_norm != first.multiple_choice.acc

    run = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}").get_run(first.mlflow_run_id)
    assert run.data.metrics["lm_eval/gptflow_sample/acc"] == harness["lm_eval/gptflow_sample/acc"]
    assert run.data.params["lm_eval"] == "gptflow_sample"
    second = evaluate(**arguments)
    assert second.stages["lm_eval"] == "cached" and second.lm_eval.metrics == harness


def test_an_unknown_harness_task_is_one_line(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    status = main(["evaluate", "--model", str(model_dir), "--lm-eval", "no_such_task_anywhere",
                   "--workspace", str(tmp_path / "ws")])
    assert status == 2
    [line] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("gptflow: error:")]
    assert "lm-evaluation-harness has no task no_such_task_anywhere" in line
