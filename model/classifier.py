"""Sequence classification on a GPT trunk: a linear head on the last real token's hidden state.

Sequences are right-padded: causal attention lets no real token see the padding after it, so the
hidden state at the last real position is the same as without padding, and that position (the
only one that has read the whole text) is what the head classifies.

On disk a classifier is two directories: the trunk as an ordinary model directory (``final/``,
``model.checkpoint.load_model`` reads it, so the trunk can be evaluated or fine-tuned again) and
``classifier/`` with the head's weights and ``classifier.json`` (labels in head order, and the
``max_length`` texts were cut to in training).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

from gptflow.data.store import atomic_directory
from gptflow.model.checkpoint import load_model
from gptflow.model.config import ModelConfig
from gptflow.model.gpt import GPT, INIT_STD

CLASSIFIER_DIR = "classifier"
"""Beside a classifier's trunk (``final/``): its head."""
HEAD_FILE = "head.safetensors"
CLASSIFIER_FILE = "classifier.json"


class GPTClassifier(nn.Module):
    def __init__(self, gpt: GPT, labels: Sequence[str]) -> None:
        super().__init__()
        if len(labels) < 2:
            raise ValueError(f"a classifier needs at least two labels, got {list(labels)}")
        self.gpt = gpt
        self.labels = list(labels)
        self.head = nn.Linear(gpt.config.n_embd, len(self.labels))
        nn.init.normal_(self.head.weight, mean=0.0, std=INIT_STD)
        nn.init.zeros_(self.head.bias)

    @property
    def config(self) -> ModelConfig:
        """The trunk's: what a checkpoint of the classifier records and checks on load."""
        return self.gpt.config

    def forward(
        self, idx: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Class logits ``(B, K)`` of right-padded ``idx`` (B, T) whose rows hold ``lengths`` (B,)
        real tokens, and the mean cross-entropy against ``targets`` (B,) class indices if given."""
        hidden = self.gpt.hidden_states(idx)  # (B, T, C)
        last = hidden[torch.arange(idx.size(0), device=idx.device), lengths - 1]  # (B, C)
        logits = self.head(last).float()  # (B, K)
        loss = F.cross_entropy(logits, targets) if targets is not None else None
        return logits, loss


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx, lengths)``: the sequences as one int64 ``(B, longest)`` tensor padded on the right
    with ``pad_id``, and each one's length."""
    lengths = torch.tensor([len(sequence) for sequence in sequences], dtype=torch.long)
    if (lengths == 0).any():
        raise ValueError("every sequence needs at least one token")
    idx = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        idx[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return idx, lengths


def save_head(directory: Path, classifier: GPTClassifier, max_length: int) -> Path:
    """Write ``classifier/`` (head weights + ``classifier.json``) atomically, replacing an older
    one; the trunk is saved with ``model.checkpoint.save_final``."""
    # atomic_directory would keep an existing complete directory; a retrained head must replace it.
    shutil.rmtree(directory, ignore_errors=True)
    with atomic_directory(Path(directory)) as tmp:
        safetensors.torch.save_model(classifier.head, str(tmp / HEAD_FILE))
        (tmp / CLASSIFIER_FILE).write_text(json.dumps({"labels": classifier.labels, "max_length": max_length}))
    return Path(directory)


def load_classifier(model_dir: Path, classifier_dir: Path, device: str | torch.device = "cpu") -> tuple[GPTClassifier, int]:
    """The classifier of a trunk directory and a head directory in eval mode, and its ``max_length``."""
    settings = json.loads((Path(classifier_dir) / CLASSIFIER_FILE).read_text())
    classifier = GPTClassifier(load_model(model_dir, device), settings["labels"]).to(device)
    safetensors.torch.load_model(classifier.head, Path(classifier_dir) / HEAD_FILE, strict=True, device=str(device))
    return classifier.eval(), settings["max_length"]


@dataclass
class ClassificationMetrics:
    accuracy: float
    macro_f1: float
    """Unweighted mean F1 over the classes that occur in the true or the predicted labels (as
    scikit-learn's default): a class absent from both says nothing about the model."""
    f1: list[float]
    """Per class, in label order (0 for a class absent from both)."""
    confusion: list[list[int]]
    """``confusion[true][predicted]``: examples of class ``true`` predicted as ``predicted``."""


def classification_metrics(true: Sequence[int], predicted: Sequence[int], n_classes: int) -> ClassificationMetrics:
    if len(true) != len(predicted) or not true:
        raise ValueError(f"need as many predictions as labels, and at least one: {len(true)} vs {len(predicted)}")
    confusion = [[0] * n_classes for _ in range(n_classes)]
    for actual, guess in zip(true, predicted):
        confusion[actual][guess] += 1
    f1, present = [], []
    for k in range(n_classes):
        true_positives = confusion[k][k]
        support = sum(confusion[k])
        predicted_k = sum(row[k] for row in confusion)
        f1.append(2 * true_positives / (support + predicted_k) if support + predicted_k else 0.0)
        if support + predicted_k:
            present.append(f1[-1])
    correct = sum(confusion[k][k] for k in range(n_classes))
    return ClassificationMetrics(
        accuracy=correct / len(true), macro_f1=sum(present) / len(present), f1=f1, confusion=confusion,
    )
