"""The fine-tuning loop: response-only targets, padding, example order, and a run that learns."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from gptflow.data.finetune_data import PreparedSplit
from gptflow.data.tagging import span_scores, spans_of_tags, tag_names, tags_of
from gptflow.model.checkpoint import TRAINER_FILE, WEIGHTS_FILE, load_model, save_final
from gptflow.model.classifier import load_classifier
from gptflow.model.config import SamplingConfig, TrainConfig
from gptflow.model.finetune import (
    FinetuneObjective,
    example_indices,
    generate_response,
    make_batch,
    run_finetuning,
    score_examples,
)
from gptflow.model.finetune_config import FinetuneConfig
from gptflow.model.gpt import GPT

PAD_ID = 1


def _train_config(**settings) -> TrainConfig:
    """Fine-tuning's loop settings: a short run at a high rate, no weight decay."""
    return TrainConfig(**{"micro_batch_size": 8, "learning_rate": 1e-2, "warmup_steps": 2, "weight_decay": 0.0,
                          "seed": 0, "log_interval": 10, **settings})


TINY_FINETUNE = Path(__file__).with_name("tiny_finetune.py")


def _sft_split(examples: list[tuple[list[int], list[bool]]]) -> PreparedSplit:
    return PreparedSplit(input_ids=[np.array(ids, dtype=np.int32) for ids, _ in examples],
                         locations=[f"data.jsonl:{line}" for line in range(len(examples))],
                         loss_mask=[np.array(mask) for _, mask in examples])


def test_sft_targets_are_the_response_tokens_only():
    split = _sft_split([([0, 10, 11, 12, 20, 21, 0], [False] * 4 + [True] * 3), ([0, 13, 22], [False, False, True])])
    batch = make_batch("sft", split, np.array([0, 1]), PAD_ID)
    assert batch.inputs.tolist() == [[0, 10, 11, 12, 20, 21], [0, 13, PAD_ID, PAD_ID, PAD_ID, PAD_ID]]
    assert batch.targets.tolist() == [[-1, -1, -1, 20, 21, 0], [-1, 22, -1, -1, -1, -1]]
    assert batch.real_tokens == 8


def test_sft_loss_is_the_mean_over_response_tokens(tiny_config):
    torch.manual_seed(0)
    gpt = GPT(tiny_config).eval()
    split = _sft_split([([0, 10, 11, 12, 20, 21, 0], [False] * 4 + [True] * 3), ([0, 13, 22], [False, False, True])])
    batch = make_batch("sft", split, np.array([0, 1]), PAD_ID)
    with torch.no_grad():
        logits, loss = gpt(batch.inputs, batch.targets)
    picked = [(0, 3, 20), (0, 4, 21), (0, 5, 0), (1, 1, 22)]
    expected = torch.stack([-F.log_softmax(logits[row, column], dim=-1)[target] for row, column, target in picked])
    assert loss.item() == pytest.approx(expected.mean().item(), rel=1e-5)
    scores = score_examples(gpt, split, PAD_ID, batch_size=1)  # per-example batches, weighted by tokens
    assert scores.loss == pytest.approx(expected.mean().item(), rel=1e-5)


def test_example_order_is_a_permutation_per_epoch_and_a_function_of_the_seed():
    stream = example_indices(10, seed=3, start=0, count=30)
    for epoch in range(3):
        assert sorted(stream[10 * epoch : 10 * (epoch + 1)]) == list(range(10))
    assert example_indices(10, seed=3, start=7, count=6).tolist() == stream[7:13].tolist()
    assert example_indices(10, seed=4, start=0, count=10).tolist() != stream[:10].tolist()


@pytest.fixture
def base_dir(tiny_config, tmp_path):
    torch.manual_seed(0)
    tiny_config.dropout = 0.0
    gpt = GPT(tiny_config)
    with torch.no_grad():
        # As after pretraining: at their 0.02 init the tied embeddings bound every logit near 0, and
        # LoRA, which leaves them frozen, could not make any token likely.
        gpt.transformer.wte.weight.mul_(25)
    return save_final(tmp_path / "base", gpt)


class RecordingCallback:
    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.checkpoints: list[int] = []

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.append((step, metrics))

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.checkpoints.append(step)

    def on_resume(self, step: int, path: Path) -> None:
        pass

    def on_unusable_checkpoint(self, path: Path, error: Exception, fallback: Path | None) -> None:
        pass


def test_sft_with_lora_learns_and_saves_a_merged_model(base_dir, tmp_path):
    # Prompts of random tokens; the response is always the same two tokens, then the end token.
    rng = np.random.default_rng(0)
    examples = [([0, *rng.integers(10, 40, size=3).tolist(), 5, 60, 61, 0], [False] * 5 + [True] * 3)
                for _ in range(48)]
    train, val = _sft_split(examples[:40]), _sft_split(examples[40:])
    config = _train_config(max_steps=40, val_interval=20, checkpoint_interval=20)
    callback = RecordingCallback()
    objective = FinetuneObjective(base_dir, "sft", [], FinetuneConfig(lora_rank=4), train, val, PAD_ID, 8)
    result = run_finetuning(objective, config, tmp_path / "run", callback)
    assert [step for step, metrics in callback.metrics if "val/loss" in metrics] == [0, 20, 40]
    assert [step for step, metrics in callback.metrics if "train/loss" in metrics] == [10, 20, 30, 40]
    assert all("train/tokens_per_sec" in metrics for step, metrics in callback.metrics if "train/loss" in metrics)
    assert callback.checkpoints == [20, 40]
    assert result.final_val_loss < 0.1 * result.initial_val_loss
    assert result.trainable_parameters < 0.5 * result.total_parameters
    merged = load_model(result.model_dir)
    assert score_examples(merged, val, PAD_ID, 4).loss == pytest.approx(result.final_val_loss, rel=1e-4)
    # Greedy (top_k=1) answer to a new prompt: the learned response, stopped at the end token.
    greedy = SamplingConfig(max_new_tokens=40, temperature=1.0, top_k=1, seed=0)
    answer = generate_response(merged, [0, 12, 13, 14, 5], end_id=0, sampling=greedy, vocab_limit=128)
    assert answer == [60, 61]


def test_classification_learns_a_separable_task(base_dir, tmp_path):
    # The class is decided by the last token, after varying-length filler: pooling must find it.
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=96)
    sequences = [np.array([0, *rng.integers(50, 60, size=rng.integers(1, 6)), 10 + label], dtype=np.int32)
                 for label in labels]
    locations = [f"l:{index}" for index in range(96)]
    train = PreparedSplit(sequences[:80], locations[:80], labels=labels[:80].astype(np.int32))
    val = PreparedSplit(sequences[80:], locations[80:], labels=labels[80:].astype(np.int32))
    config = _train_config(max_steps=40, val_interval=0)
    callback = RecordingCallback()
    objective = FinetuneObjective(base_dir, "classification", ["a", "b", "c"], FinetuneConfig(lora_rank=0),
                                  train, val, PAD_ID, 16)
    result = run_finetuning(objective, config, tmp_path / "run", callback)
    classifier, max_length = load_classifier(result.model_dir, result.classifier_dir)
    scores = score_examples(classifier, val, PAD_ID, 8)
    assert max_length == 16
    assert scores.accuracy == 1.0
    assert scores.loss == pytest.approx(result.final_val_loss, rel=1e-4)
    assert callback.metrics[-1][1]["val/accuracy"] == 1.0


def _marked_spans(count: int, seed: int, span_label_from: str) -> PreparedSplit:
    """One span per example: 1 to 3 tokens from 20-29, then a marker (40 or 41) that decides its
    label, amid filler from 50-59. Only the span's last token has read what the label is."""
    rng = np.random.default_rng(seed)
    tags_of_label = tag_names(["a", "b"], span_label_from)
    sequences, tags = [], []
    for _ in range(count):
        before, length, after = rng.integers(0, 3), rng.integers(1, 4), rng.integers(0, 3)
        marker = int(rng.integers(0, 2))
        ids = [0, *rng.integers(50, 60, size=before), *rng.integers(20, 30, size=length), 40 + marker,
               *rng.integers(50, 60, size=after)]
        first = 1 + before
        names = ["O", *tags_of([(first - 1, first + length, "ab"[marker])], len(ids) - 1, span_label_from)]
        sequences.append(np.array(ids, dtype=np.int32))
        tags.append(np.array([-1, *(tags_of_label.index(name) for name in names[1:])], dtype=np.int16))
    return PreparedSplit(sequences, [f"l:{index}" for index in range(count)], tags=tags)


@pytest.mark.parametrize("span_label_from", ["each_token", "last_token"])
def test_tagging_reads_a_label_only_its_last_token_can_know_where_told_to(base_dir, tmp_path, span_label_from):
    train, val = _marked_spans(160, 0, span_label_from), _marked_spans(40, 1, span_label_from)
    objective = FinetuneObjective(base_dir, "tagging", ["a", "b"],
                                  FinetuneConfig(lora_rank=0, span_label_from=span_label_from), train, val, PAD_ID, 16)
    result = run_finetuning(objective, _train_config(max_steps=60, val_interval=0), tmp_path / "run")
    tagger, _ = load_classifier(result.model_dir, result.classifier_dir)
    scores = score_examples(tagger, val, PAD_ID, 8)
    decoded = [[spans_of_tags([tagger.tags[tag] if keep >= 0 else "O" for tag, keep in zip(tags, gold)],
                              span_label_from) for tags, gold in zip(example_tags, val.tags)]
               for example_tags in (val.tags, scores.tag_predictions)]
    f1 = span_scores(decoded[0], decoded[1], ["a", "b"]).f1
    assert scores.loss == pytest.approx(result.final_val_loss, rel=1e-4)
    if span_label_from == "last_token":
        assert f1 == 1.0
    else:  # the first token of a span must guess its label: right about half the time
        assert f1 < 0.8


def test_killed_finetuning_resumes_to_the_weights_of_an_uninterrupted_run(base_dir, tmp_path, kill_repeatedly):
    """The fine-tuning loop is pretraining's: SIGKILLed at random moments (mostly mid-checkpoint)
    and resumed, LoRA adapters, dropout and example order included, it ends bit-identical."""
    reference = subprocess.Popen([sys.executable, str(TINY_FINETUNE), str(tmp_path / "reference"), str(base_dir)])
    run_dir = tmp_path / "killed"
    kill_repeatedly([sys.executable, str(TINY_FINETUNE), str(run_dir), str(base_dir)], run_dir, kills=2)
    assert reference.wait() == 0
    expected, actual = (load_file(directory / "final" / WEIGHTS_FILE) for directory in (tmp_path / "reference", run_dir))
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    trainer = json.loads((run_dir / "checkpoints/step-00000040" / TRAINER_FILE).read_text())
    reference_trainer = json.loads((tmp_path / "reference/checkpoints/step-00000040" / TRAINER_FILE).read_text())
    assert trainer["initial_val"] == reference_trainer["initial_val"]  # the base model's score, kept over resumes


LAUNCHERS = {"one": [], "two": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]}


def _finetune_ranks(ranks: str, run_dir: Path, base_dir: Path, parallelism: str, *flags: str) -> dict[str, float]:
    """tiny_finetune.py's 10 steps on one process or two ranks; the train losses rank 0 reported."""
    losses = run_dir.with_suffix(".json")
    command = [sys.executable, *LAUNCHERS[ranks], str(TINY_FINETUNE), str(run_dir), str(base_dir),
               "--parallelism", parallelism, "--losses", str(losses), *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(losses.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_finetuning_on_two_ranks_follows_one_process(base_dir, tmp_path, parallelism):
    """LoRA fine-tuning with the global batch split over two ranks (DDP, or FSDP sharding the frozen
    base weights with the adapters) takes the steps of one process."""
    losses = {ranks: _finetune_ranks(ranks, tmp_path / ranks, base_dir, parallelism) for ranks in LAUNCHERS}
    assert losses["one"].keys() == losses["two"].keys() == {"5", "10"}
    for step, loss in losses["one"].items():
        assert losses["two"][step] == pytest.approx(loss, rel=1e-4), step
    single, parallel = (load_file(tmp_path / name / "final" / WEIGHTS_FILE) for name in ("one", "two"))
    for name, tensor in single.items():
        torch.testing.assert_close(parallel[name], tensor, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(("saved_on", "resumed_on"), [("one", "two"), ("two", "one")])
def test_a_finetuning_checkpoint_resumes_at_another_world_size(base_dir, tmp_path, saved_on, resumed_on):
    """A LoRA model's last checkpoint, whole (one process) or sharded (two FSDP ranks), loads at the
    other world size: resumed there, it exports the weights the run that saved it exported."""
    run_dir = tmp_path / "run"
    _finetune_ranks(saved_on, run_dir, base_dir, "fsdp")
    expected = load_file(run_dir / "final" / WEIGHTS_FILE)
    shutil.rmtree(run_dir / "final")  # as a run killed after its last checkpoint leaves it
    assert _finetune_ranks(resumed_on, run_dir, base_dir, "fsdp", "--resume") == {}  # resumed at the last step
    resumed = load_file(run_dir / "final" / WEIGHTS_FILE)
    assert resumed.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, msg=name)
