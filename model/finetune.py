"""Fine-tuning a pretrained GPT: instruction tuning (sft) or classification, fully or with LoRA.

Examples are independent sequences, batched with padding on the right: a micro-batch is as long
as its longest example, padded inputs carry the pad id and padded targets -1, which the loss
ignores. Packing several examples into one window would waste no compute on padding, but with
the model's plain causal attention every example would attend to the ones before it in the pack;
padding keeps each example's computation exactly what it is alone (and classification needs one
sequence per row to pool anyway).

sft trains on the assistant tokens only (targets -1 elsewhere), so the loss is the mean over
response tokens. Batches are a pure function of ``(seed, step)``: epoch ``e`` visits the examples
in the permutation drawn from ``(seed, e)``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tokenizers import Tokenizer

from gptflow.data.chat import ChatTemplate, Message
from gptflow.data.finetune_data import PreparedSplit
from gptflow.data.finetune_inputs import OBJECTIVES
from gptflow.model.checkpoint import load_model, save_final
from gptflow.model.classifier import CLASSIFIER_DIR, GPTClassifier, pad_right, save_head
from gptflow.model.device import autocast, resolve_autocast_dtype
from gptflow.model.config import SamplingConfig, TrainConfig
from gptflow.model.finetune_config import FinetuneConfig
from gptflow.model.gpt import GPT
from gptflow.model.lora import apply_lora, merge_lora
from gptflow.model.optim import build_optimizer, learning_rate_at

SCORE_BATCH_EXAMPLES = 16
"""Examples per batch when scoring (validation loss, classification) outside training."""
MetricsCallback = Callable[[int, dict[str, float]], None]
"""Called with an optimizer step (0: before the first) and the metrics measured there."""


@dataclass
class FinetuneOutcome:
    """What a fine-tuning run achieved: kept by the loop's result and by the stage's record alike."""

    steps: int
    trainable_parameters: int
    total_parameters: int
    initial_val_loss: float
    """Validation loss before the first step (the base model's, for sft)."""
    final_val_loss: float
    final_train_loss: float
    elapsed_s: float

    def outcome(self) -> dict[str, Any]:
        """The ``FinetuneOutcome`` fields alone, to build another kind of record from."""
        return {shared.name: getattr(self, shared.name) for shared in fields(FinetuneOutcome)}


@dataclass
class FinetuneResult(FinetuneOutcome):
    model_dir: Path
    """The fine-tuned GPT (LoRA merged): ``model.safetensors`` + ``config.json``."""
    classifier_dir: Path | None
    """Classification: the head (``model.classifier.load_classifier`` reads both)."""
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """Metric name → (step, value) of every report."""


def build_finetune_model(
    base_dir: Path, objective: str, labels: list[str], config: FinetuneConfig, seed: int, device: torch.device
) -> GPT | GPTClassifier:
    """The base model with LoRA applied (``lora_rank`` > 0) and, for classification, a new head,
    initialised from ``seed``."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    torch.manual_seed(seed)
    gpt = load_model(base_dir, device="cpu")  # LoRA and head initialised on the CPU: the same on any device
    if config.lora_rank:
        apply_lora(gpt, config.lora_rank, config.lora_alpha, config.lora_dropout)
    model = GPTClassifier(gpt, labels) if objective == "classification" else gpt
    return model.to(device)


def finetune(
    model: GPT | GPTClassifier,
    train: PreparedSplit,
    val: PreparedSplit,
    config: TrainConfig,
    pad_id: int,
    max_length: int,
    run_dir: Path,
    on_metrics: MetricsCallback | None = None,
) -> FinetuneResult:
    """Train ``model`` (from ``build_finetune_model``) on ``train`` as ``config`` says (its
    optimizer, schedule and intervals, as in pretraining), validating on all of ``val`` before the
    first step, every ``val_interval`` steps and after the last; then merge
    LoRA and write the model to ``run_dir/final`` (and the head to ``run_dir/classifier``, with
    ``max_length``, the tokens texts were cut to, so inference cuts them the same way)."""
    started = time.perf_counter()
    device = next(model.parameters()).device
    autocast_dtype = resolve_autocast_dtype(config.dtype, device)
    objective = _objective_of(model)
    optimizer = build_optimizer(model, config, device)
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    total = sum(parameter.numel() for parameter in model.parameters())

    history: dict[str, list[tuple[int, float]]] = {"finetune/train_loss": [], "finetune/val_loss": []}

    def validate(step: int) -> dict[str, float]:
        scores = score_examples(model, val, pad_id, config.micro_batch_size, autocast_dtype)
        metrics = {"finetune/val_loss": scores.loss}
        if scores.accuracy is not None:
            metrics["finetune/val_accuracy"] = scores.accuracy
        history["finetune/val_loss"].append((step, scores.loss))
        return metrics

    initial = validate(0)
    if on_metrics:
        on_metrics(0, initial)
    max_grad_norm = config.grad_clip or float("inf")
    # Summed on the device and read once per report, so steps in between never wait for it.
    loss_sum = torch.zeros((), device=device)
    tokens_since_report, steps_since_report = 0, 0
    report_clock = time.perf_counter()
    final_train_loss = float("nan")
    model.train()
    for step in range(config.max_steps):
        learning_rate = learning_rate_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate
        torch.manual_seed(int(np.random.SeedSequence([config.seed, step]).generate_state(1)[0]))  # dropout
        for micro_step in range(config.grad_accum_steps):
            indices = example_indices(len(train.input_ids), config.seed,
                                      (step * config.grad_accum_steps + micro_step) * config.micro_batch_size,
                                      config.micro_batch_size)
            batch = make_batch(objective, train, indices, pad_id, device)
            with autocast(device, autocast_dtype):
                loss = batch_loss(model, batch)
            (loss / config.grad_accum_steps).backward()
            loss_sum += loss.detach()
            tokens_since_report += batch.real_tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [parameter for parameter in model.parameters() if parameter.requires_grad], max_grad_norm
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps_done = step + 1
        steps_since_report += 1
        is_last = steps_done == config.max_steps
        metrics = {}
        if steps_done % config.log_interval == 0 or is_last:
            now = time.perf_counter()
            final_train_loss = loss_sum.item() / (steps_since_report * config.grad_accum_steps)
            metrics.update({
                "finetune/train_loss": final_train_loss,
                "finetune/lr": learning_rate,
                "finetune/grad_norm": float(grad_norm),
                "finetune/tokens_per_sec": tokens_since_report / (now - report_clock),
            })
            history["finetune/train_loss"].append((steps_done, final_train_loss))
            loss_sum.zero_()
            tokens_since_report, steps_since_report = 0, 0
        if is_last or (config.val_interval and steps_done % config.val_interval == 0):
            metrics.update(validate(steps_done))
            model.train()
        if metrics:
            report_clock = time.perf_counter()  # validation time does not count against throughput
            if on_metrics:
                on_metrics(steps_done, metrics)
    model.eval()
    merge_lora(model)
    gpt = model.gpt if isinstance(model, GPTClassifier) else model
    model_dir = save_final(run_dir, gpt)
    classifier_dir = None
    if isinstance(model, GPTClassifier):
        classifier_dir = save_head(Path(run_dir) / CLASSIFIER_DIR, model, max_length)
    return FinetuneResult(
        model_dir=model_dir, classifier_dir=classifier_dir, steps=config.max_steps, trainable_parameters=trainable,
        total_parameters=total, initial_val_loss=initial["finetune/val_loss"],
        final_val_loss=history["finetune/val_loss"][-1][1], final_train_loss=final_train_loss,
        elapsed_s=time.perf_counter() - started, history=history,
    )


@dataclass
class Batch:
    inputs: torch.Tensor
    """(B, T) token ids, padded on the right."""
    targets: torch.Tensor
    """sft: (B, T) next-token targets, -1 where not trained; classification: (B,) class indices."""
    lengths: torch.Tensor | None
    """classification: (B,) real tokens per row."""
    real_tokens: int
    """Tokens that are not padding."""


def make_batch(objective: str, split: PreparedSplit, indices: np.ndarray, pad_id: int, device: torch.device) -> Batch:
    """The examples ``indices`` of ``split`` as padded tensors on ``device``."""
    sequences = [split.input_ids[index] for index in indices]
    if objective == "classification":
        inputs, lengths = pad_right(sequences, pad_id)
        targets = torch.as_tensor(split.labels[indices], dtype=torch.long)
        return Batch(inputs.to(device), targets.to(device), lengths.to(device), int(lengths.sum()))
    # The model reads tokens 0..L-2 and predicts 1..L-1; only assistant tokens are targets.
    inputs, lengths = pad_right([sequence[:-1] for sequence in sequences], pad_id)
    targets = torch.full_like(inputs, -1)
    for row, index in enumerate(indices):
        ids, mask = split.input_ids[index], split.loss_mask[index]
        targets[row, : len(ids) - 1] = torch.as_tensor(np.where(mask[1:], ids[1:], -1), dtype=torch.long)
    return Batch(inputs.to(device), targets.to(device), None, int(lengths.sum()))


def batch_loss(model: GPT | GPTClassifier, batch: Batch) -> torch.Tensor:
    if isinstance(model, GPTClassifier):
        return model(batch.inputs, batch.lengths, batch.targets)[1]
    return model(batch.inputs, batch.targets, return_logits=False)[1]


def example_indices(n_examples: int, seed: int, start: int, count: int) -> np.ndarray:
    """Positions ``start .. start + count`` of the endless example order: epoch after epoch, each
    a permutation drawn from ``(seed, epoch)``."""
    taken: list[np.ndarray] = []
    while count > 0:
        epoch, offset = divmod(start, n_examples)
        order = np.random.default_rng([seed, epoch]).permutation(n_examples)
        taken.append(order[offset : offset + count])
        start += len(taken[-1])
        count -= len(taken[-1])
    return np.concatenate(taken)


@dataclass
class ExampleScores:
    loss: float
    """sft: mean cross-entropy per response token (nats); classification: per example."""
    predictions: list[int] | None = None
    """classification: the predicted class of each example, in split order."""
    accuracy: float | None = None


@torch.no_grad()
def score_examples(
    model: GPT | GPTClassifier, split: PreparedSplit, pad_id: int, batch_size: int = SCORE_BATCH_EXAMPLES,
    autocast_dtype: torch.dtype | None = None,
) -> ExampleScores:
    """Loss over a whole split (and classification predictions), in eval mode. Batches group
    examples of similar length, so little compute goes to padding."""
    objective = _objective_of(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, total_weight = 0.0, 0
    predictions = np.zeros(len(split.input_ids), dtype=np.int64)
    for indices in _by_length(split, batch_size):
        batch = make_batch(objective, split, indices, pad_id, device)
        with autocast(device, autocast_dtype):
            if isinstance(model, GPTClassifier):
                logits, loss = model(batch.inputs, batch.lengths, batch.targets)
                predictions[indices] = logits.argmax(dim=-1).cpu().numpy()
                weight = len(indices)
            else:
                _, loss = model(batch.inputs, batch.targets, return_logits=False)
                weight = int((batch.targets != -1).sum())
        total_loss += loss.item() * weight
        total_weight += weight
    model.train(was_training)
    scores = ExampleScores(loss=total_loss / total_weight)
    if objective == "classification":
        scores.predictions = predictions.tolist()
        scores.accuracy = float((predictions == split.labels).mean())
    return scores


def _by_length(split: PreparedSplit, batch_size: int) -> Iterator[np.ndarray]:
    order = np.argsort([len(ids) for ids in split.input_ids], kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _objective_of(model: nn.Module) -> str:
    return "classification" if isinstance(model, GPTClassifier) else "sft"


STOP_CHECK_TOKENS = 16
"""Tokens generated between checks for the end token (each check starts ``GPT.generate`` again,
which reads the context once more)."""


@torch.no_grad()
def generate_response(
    gpt: GPT, prompt_ids: list[int], end_id: int, sampling: SamplingConfig, vocab_limit: int
) -> list[int]:
    """The tokens ``gpt`` (in eval mode) samples after ``prompt_ids``, up to the first ``end_id``
    (left out) or ``sampling.max_new_tokens``; a pure function of ``sampling.seed``. ``vocab_limit`` (the tokenizer's
    size) keeps the embedding's padding rows from being sampled."""
    device = next(gpt.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(sampling.seed)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    produced: list[int] = []
    while len(produced) < sampling.max_new_tokens:
        count = min(STOP_CHECK_TOKENS, sampling.max_new_tokens - len(produced))
        idx = gpt.generate(idx, count, temperature=sampling.temperature, top_k=sampling.top_k_or_none,
                           generator=generator, vocab_limit=vocab_limit)
        new = idx[0, -count:].tolist()
        if end_id in new:
            return produced + new[: new.index(end_id)]
        produced += new
    return produced


def answer(
    gpt: GPT, tokenizer: Tokenizer, template: ChatTemplate, conversations: list[list[Message]],
    sampling: SamplingConfig,
) -> list[str]:
    """The next assistant message of each conversation, as ``template`` prompts for it; the
    conversation at index ``i`` is sampled with seed ``sampling.seed + i``."""
    end_id = template.token_id(tokenizer, template.end_token)
    answers = []
    for index, conversation in enumerate(conversations):
        prompt_ids, _ = template.encode(tokenizer, conversation, add_generation_prompt=True)
        response = generate_response(gpt, prompt_ids, end_id, dataclasses.replace(sampling, seed=sampling.seed + index),
                                     tokenizer.get_vocab_size())
        answers.append(tokenizer.decode(response))
    return answers
