"""Classification heads on a GPT trunk: a linear layer on the last real token's hidden state
(``GPTClassifier``: a label per text), or on every token's (``GPTTagger``: a tag per token).

Sequences are right-padded: causal attention lets no real token see the padding after it, so the
hidden state at a real position is the same as without padding. The last real position is the
only one that has read the whole text: it is what the classifier classifies. A tagger's token
has read only the tokens up to it (see ``data.tagging`` for where a span's label is read).

On disk a classifier or tagger is two directories: the trunk as an ordinary model directory
(``final/``, ``model.checkpoint.load_model`` reads it, so the trunk can be evaluated or fine-tuned
again) and ``classifier/`` with the head's weights and ``classifier.json`` (the ``objective``,
labels in order, the ``max_length`` texts were cut to in training, and a tagger's
``span_label_from``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer

from gptflow.data.store import LOCAL_STORE, ArtifactStore
from gptflow.data.tagging import char_span, spans_of_tags, tag_names
from gptflow.data.tokenizer import EOT_TOKEN, PAD_TOKEN
from gptflow.model.checkpoint import load_model
from gptflow.model.config import ModelConfig
from gptflow.model.gpt import GPT, INIT_STD

CLASSIFIER_DIR = "classifier"
"""Beside a classifier's trunk (``final/``): its head."""
HEAD_FILE = "head.safetensors"
CLASSIFIER_FILE = "classifier.json"


def _new_head(n_embd: int, classes: int) -> nn.Linear:
    """A linear head at the trunk's init scale, zero bias: it starts by predicting every class alike."""
    head = nn.Linear(n_embd, classes)
    nn.init.normal_(head.weight, mean=0.0, std=INIT_STD)
    nn.init.zeros_(head.bias)
    return head


class GPTClassifier(nn.Module):
    def __init__(self, gpt: GPT, labels: Sequence[str]) -> None:
        super().__init__()
        if len(labels) < 2:
            raise ValueError(f"a classifier needs at least two labels, got {list(labels)}")
        self.gpt = gpt
        self.labels = list(labels)
        self.head = _new_head(gpt.config.n_embd, len(self.labels))

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


class GPTTagger(nn.Module):
    """A tag per token: ``tags`` are the head's classes (``data.tagging.tag_names`` of the span
    ``labels`` and ``span_label_from``)."""

    def __init__(self, gpt: GPT, labels: Sequence[str], span_label_from: str) -> None:
        super().__init__()
        if not labels:
            raise ValueError("a tagger needs at least one span label")
        self.gpt = gpt
        self.labels = list(labels)
        self.span_label_from = span_label_from
        self.tags = tag_names(self.labels, span_label_from)
        self.head = _new_head(gpt.config.n_embd, len(self.tags))

    @property
    def config(self) -> ModelConfig:
        return self.gpt.config

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tag logits ``(B, T, K)`` of ``idx`` (B, T), and the mean cross-entropy over the tokens
        whose ``targets`` (B, T) are not -1 (padding, the start token), if given."""
        logits = self.head(self.gpt.hidden_states(idx)).float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
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


SpanPrediction = dict[str, Any]
"""``{"start", "end", "label", "text"}``: a tagged span, in characters of its text."""


@torch.no_grad()
def tag_texts(tagger: GPTTagger, tokenizer: Tokenizer, texts: Sequence[str], max_length: int,
              batch_size: int = 16) -> list[list[SpanPrediction]]:
    """The spans ``tagger`` finds in each text, encoded as in training (the start token, then the
    text's tokens, cut to ``max_length``: a longer text's end is not tagged)."""
    start_id, pad_id = tokenizer.token_to_id(EOT_TOKEN), tokenizer.token_to_id(PAD_TOKEN)
    device = next(tagger.parameters()).device
    found: list[list[SpanPrediction]] = []
    for batch_start in range(0, len(texts), batch_size):
        batch = texts[batch_start : batch_start + batch_size]
        encodings = [tokenizer.encode(text, add_special_tokens=False) for text in batch]
        ids = [[start_id, *encoding.ids][:max_length] for encoding in encodings]
        logits, _ = tagger(pad_right(ids, pad_id)[0].to(device))
        for text, encoding, row, tags in zip(batch, encodings, ids, logits.argmax(dim=-1).tolist()):
            names = [tagger.tags[tag] for tag in tags[1 : len(row)]]  # the start token is never tagged
            spans = []
            for first, end, label in spans_of_tags(names, tagger.span_label_from):
                start, stop = char_span(text, encoding.offsets, first, end)
                spans.append({"start": start, "end": stop, "label": label, "text": text[start:stop]})
            found.append(spans)
    return found


def save_head(directory: Path, model: GPTClassifier | GPTTagger, max_length: int,
              artifacts: ArtifactStore = LOCAL_STORE) -> Path:
    """Commit ``classifier/`` (head weights + ``classifier.json``) to ``artifacts``, replacing an
    older one (a retrained head must); the trunk is saved with ``model.checkpoint.save_final``."""
    settings = {"objective": head_objective(model), "labels": model.labels, "max_length": max_length}
    if isinstance(model, GPTTagger):
        settings["span_label_from"] = model.span_label_from
    with artifacts.replace(Path(directory)) as tmp:
        safetensors.torch.save_model(model.head, str(tmp / HEAD_FILE))
        (tmp / CLASSIFIER_FILE).write_text(json.dumps(settings))
    return Path(directory)


def head_objective(model: nn.Module) -> str:
    """``classification`` or ``tagging``: what a model with a head was fine-tuned for."""
    return "tagging" if isinstance(model, GPTTagger) else "classification"


def read_head_settings(classifier_dir: Path) -> dict:
    """``classifier.json``; a head saved before taggers existed is a classifier's."""
    return {"objective": "classification", **json.loads((Path(classifier_dir) / CLASSIFIER_FILE).read_text())}


def load_classifier(model_dir: Path, classifier_dir: Path,
                    device: str | torch.device = "cpu") -> tuple[GPTClassifier | GPTTagger, int]:
    """The classifier or tagger of a trunk directory and a head directory in eval mode, and its ``max_length``."""
    settings = read_head_settings(classifier_dir)
    gpt = load_model(model_dir, device)
    model = (GPTTagger(gpt, settings["labels"], settings["span_label_from"]) if settings["objective"] == "tagging"
             else GPTClassifier(gpt, settings["labels"])).to(device)
    safetensors.torch.load_model(model.head, Path(classifier_dir) / HEAD_FILE, strict=True, device=str(device))
    return model.eval(), settings["max_length"]


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
