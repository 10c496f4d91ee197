"""Fine-tuning a pretrained GPT: instruction tuning (sft), classification or tagging, fully or with LoRA.

Examples are independent sequences, batched with padding on the right: a micro-batch is as long
as its longest example, padded inputs carry the pad id and padded targets -1, which the loss
ignores. Packing several examples into one window would waste no compute on padding, but with
the model's plain causal attention every example would attend to the ones before it in the pack;
padding keeps each example's computation exactly what it is alone (and classification needs one
sequence per row to pool anyway).

sft trains on the assistant tokens only (targets -1 elsewhere), so the loss is the mean over
response tokens; tagging on every tagged token (all but the start token and a span cut by
``max_length``). Batches are a pure function of ``(seed, step)``: epoch ``e`` visits the examples
in the permutation drawn from ``(seed, e)``.

Training is pretraining's loop (``model.train.train``) with a ``FinetuneObjective``: the same step,
checkpoints and resume, ``torch.compile``, throughput and MFU, DDP or FSDP across ranks. Rank ``r``
of N takes rows ``r·B .. (r+1)·B`` of each global micro-batch and scales its loss by its share of
the micro-batch's trained tokens (sft and tagging), so N ranks take one process's steps. The whole
val split is scored before the first step (the base model's loss, kept in every checkpoint's
``trainer.json`` for a resumed run), every ``train.val_interval`` steps and after the last. The
export folds the LoRA updates into the weights (``model.lora.merge_lora``), so ``final/`` is an
ordinary GPT directory, with a classifier's or tagger's head beside it (``model.classifier``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn
from tokenizers import Tokenizer

from gptflow.data.chat import ChatTemplate, Message
from gptflow.data.finetune_data import PreparedSplit
from gptflow.data.finetune_inputs import OBJECTIVES
from gptflow.data.store import LOCAL_STORE, ArtifactStore
from gptflow.model.checkpoint import load_model, save_final
from gptflow.model.classifier import CLASSIFIER_DIR, GPTClassifier, GPTTagger, head_objective, pad_right, save_head
from gptflow.model.config import SamplingConfig, TrainConfig
from gptflow.model.device import autocast
from gptflow.model.distributed import Ranks
from gptflow.model.finetune_config import FinetuneConfig
from gptflow.model.gpt import GPT
from gptflow.model.lora import apply_lora, merge_lora
from gptflow.model.objective import Batch, TrainingCallback, TrainingObjective
from gptflow.model.train import train

SCORE_BATCH_EXAMPLES = 16
"""Examples per batch when scoring (validation loss, classification) outside training."""


@dataclass
class FinetuneOutcome:
    """What a fine-tuning run achieved: kept by the loop's result and by the stage's record alike."""

    steps: int
    trainable_parameters: int
    total_parameters: int
    initial_val_loss: float
    """Validation loss before the first step (the base model's, for sft)."""
    final_val_loss: float
    final_train_loss: float | None
    """None when the run resumed from its last step's checkpoint and took no step."""
    elapsed_s: float

    def outcome(self) -> dict[str, Any]:
        """The ``FinetuneOutcome`` fields alone, to build another kind of record from."""
        return {shared.name: getattr(self, shared.name) for shared in fields(FinetuneOutcome)}


@dataclass
class FinetuneResult(FinetuneOutcome):
    model_dir: Path
    """The fine-tuned GPT (LoRA merged): ``model.safetensors`` + ``config.json``."""
    classifier_dir: Path | None
    """Classification and tagging: the head (``model.classifier.load_classifier`` reads both)."""
    resumed_from_step: int | None = None
    """Step of the checkpoint this call continued from; None for a fresh start."""


@dataclass
class FinetuneObjective(TrainingObjective):
    """Tune the model of ``base_dir`` on prepared examples: sft (next-token loss on the response
    tokens), classification (a new head on the last real token) or tagging (a new head on every
    token), fully or with LoRA (``config.lora_rank`` > 0)."""

    validates_before_training: ClassVar[bool] = True

    base_dir: Path
    objective: str
    labels: list[str]
    """Classification: the head's classes, in order; tagging: the span labels."""
    config: FinetuneConfig
    train: PreparedSplit
    val: PreparedSplit
    pad_id: int
    max_length: int
    """Tokens texts were cut to: kept with a classifier's head, so inference cuts them the same way."""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")

    def build_model(self) -> GPT | GPTClassifier | GPTTagger:
        gpt = load_model(self.base_dir, device="cpu")
        if self.config.lora_rank:
            apply_lora(gpt, self.config.lora_rank, self.config.lora_alpha, self.config.lora_dropout)
        if self.objective == "classification":
            return GPTClassifier(gpt, self.labels)
        return GPTTagger(gpt, self.labels, self.config.span_label_from) if self.objective == "tagging" else gpt

    def trunk(self, model: nn.Module) -> GPT:
        return model.gpt if isinstance(model, (GPTClassifier, GPTTagger)) else model

    def batches(self, seed: int, first_sequence: int, steps: range, accum_steps: int, micro_batch_size: int,
                ranks: Ranks, pin_memory: bool) -> Iterator[Batch]:
        # Rank r takes rows r·B .. (r+1)·B of each global micro-batch.
        global_batch = micro_batch_size * ranks.world_size
        for step in steps:
            for micro_step in range(accum_steps):
                first = first_sequence + ((step - steps.start) * accum_steps + micro_step) * global_batch
                indices = example_indices(len(self.train.input_ids), seed, first, global_batch)
                mine = slice(ranks.rank * micro_batch_size, (ranks.rank + 1) * micro_batch_size)
                batch = make_batch(self.objective, self.train, indices[mine], self.pad_id)
                if self.objective != "classification" and ranks.is_distributed:
                    targets = [_target_count(self.train, index) for index in indices]
                    batch.loss_scale = sum(targets[mine]) * ranks.world_size / sum(targets)
                yield batch

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        if self.objective == "classification":
            return model(batch.inputs, batch.lengths, batch.targets)[1]
        if self.objective == "tagging":
            return model(batch.inputs, batch.targets)[1]
        return model(batch.inputs, batch.targets, return_logits=False)[1]

    def validate(self, model: nn.Module, train_config: TrainConfig, device: torch.device,
                 autocast_dtype: torch.dtype | None) -> dict[str, float]:
        scores = score_examples(model, self.val, self.pad_id, train_config.micro_batch_size, autocast_dtype)
        return {"loss": scores.loss, **({"accuracy": scores.accuracy} if scores.accuracy is not None else {})}

    def export(self, model: nn.Module, run_dir: Path, artifacts: ArtifactStore) -> None:
        merge_lora(model)
        save_final(run_dir, self.trunk(model), artifacts)
        if isinstance(model, (GPTClassifier, GPTTagger)):
            save_head(Path(run_dir) / CLASSIFIER_DIR, model, self.max_length, artifacts)


def run_finetuning(objective: FinetuneObjective, config: TrainConfig, run_dir: Path,
                   callback: TrainingCallback | None = None, resume: bool = False,
                   artifacts: ArtifactStore = LOCAL_STORE) -> FinetuneResult:
    """Train ``objective`` through the training loop (``model.train.train``: its optimizer,
    schedule, intervals, checkpoints and resume, as in pretraining), validating on the whole val
    split before the first step, every ``val_interval`` steps and after the last; then merge LoRA
    and write the model to ``run_dir/final`` (and the head to ``run_dir/classifier``), checkpoints
    and model committed to ``artifacts``."""
    trained = train(objective, config, run_dir, callback, resume, artifacts)
    return FinetuneResult(
        model_dir=trained.final_dir,
        classifier_dir=Path(run_dir) / CLASSIFIER_DIR if objective.objective != "sft" else None,
        steps=trained.steps, trainable_parameters=trained.trainable_parameters,
        total_parameters=trained.total_parameters, initial_val_loss=trained.initial_val["loss"],
        final_val_loss=trained.final_val_loss, final_train_loss=trained.final_train_loss,
        elapsed_s=trained.elapsed_s, resumed_from_step=trained.resumed_from_step,
    )


def make_batch(objective: str, split: PreparedSplit, indices: np.ndarray, pad_id: int) -> Batch:
    """The examples ``indices`` of ``split`` as padded tensors on the CPU."""
    sequences = [split.input_ids[index] for index in indices]
    if objective == "classification":
        inputs, lengths = pad_right(sequences, pad_id)
        targets = torch.as_tensor(split.labels[indices], dtype=torch.long)
        return Batch(inputs, targets, int(lengths.sum()), lengths)
    if objective == "tagging":
        inputs, lengths = pad_right(sequences, pad_id)
        targets, _ = pad_right([split.tags[index] for index in indices], -1)
        return Batch(inputs, targets, int(lengths.sum()), lengths)
    # The model reads tokens 0..L-2 and predicts 1..L-1; only assistant tokens are targets.
    inputs, lengths = pad_right([sequence[:-1] for sequence in sequences], pad_id)
    targets = torch.full_like(inputs, -1)
    for row, index in enumerate(indices):
        ids, mask = split.input_ids[index], split.loss_mask[index]
        targets[row, : len(ids) - 1] = torch.as_tensor(np.where(mask[1:], ids[1:], -1), dtype=torch.long)
    return Batch(inputs, targets, int(lengths.sum()))


def _target_count(split: PreparedSplit, index: int) -> int:
    """Tokens of example ``index`` its loss is the mean over: response tokens (sft), tagged tokens (tagging)."""
    if split.tags is not None:
        return int((split.tags[index] >= 0).sum())
    return int(split.loss_mask[index][1:].sum())


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
    """sft: mean cross-entropy per response token (nats); classification: per example; tagging: per tagged token."""
    predictions: list[int] | None = None
    """classification: the predicted class of each example, in split order."""
    tag_predictions: list[np.ndarray] | None = None
    """tagging: the predicted tag of each token of each example, in split order."""
    accuracy: float | None = None
    """classification: of examples; tagging: of tagged tokens."""


@torch.no_grad()
def score_examples(
    model: GPT | GPTClassifier | GPTTagger, split: PreparedSplit, pad_id: int, batch_size: int = SCORE_BATCH_EXAMPLES,
    autocast_dtype: torch.dtype | None = None,
) -> ExampleScores:
    """Loss over a whole split (and classification or tagging predictions), in eval mode. Batches
    group examples of similar length, so little compute goes to padding."""
    objective = _objective_of(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, total_weight = 0.0, 0
    predictions = np.zeros(len(split.input_ids), dtype=np.int64)
    tag_predictions: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(split.input_ids)
    for indices in _by_length(split, batch_size):
        batch = make_batch(objective, split, indices, pad_id).to(device)
        with autocast(device, autocast_dtype):
            if isinstance(model, GPTClassifier):
                logits, loss = model(batch.inputs, batch.lengths, batch.targets)
                predictions[indices] = logits.argmax(dim=-1).cpu().numpy()
                weight = len(indices)
            elif isinstance(model, GPTTagger):
                logits, loss = model(batch.inputs, batch.targets)
                tags = logits.argmax(dim=-1).cpu().numpy()
                for row, index in enumerate(indices):
                    tag_predictions[index] = tags[row, : len(split.input_ids[index])]
                weight = int((batch.targets != -1).sum())
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
    if objective == "tagging":
        scores.tag_predictions = tag_predictions
        scored = np.concatenate(split.tags) >= 0
        scores.accuracy = float((np.concatenate(tag_predictions) == np.concatenate(split.tags))[scored].mean())
    return scores


def _by_length(split: PreparedSplit, batch_size: int) -> Iterator[np.ndarray]:
    order = np.argsort([len(ids) for ids in split.input_ids], kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _objective_of(model: nn.Module) -> str:
    return head_objective(model) if isinstance(model, (GPTClassifier, GPTTagger)) else "sft"


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
