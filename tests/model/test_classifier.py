"""The classifier pools the last real token of right-padded sequences, the tagger tags every token; their metrics and files."""

from __future__ import annotations

import pytest
import torch

from gptflow.model.checkpoint import save_final
from gptflow.model.classifier import (
    GPTClassifier,
    GPTTagger,
    classification_metrics,
    load_classifier,
    pad_right,
    save_head,
)
from gptflow.model.gpt import GPT


@pytest.fixture
def classifier(tiny_config) -> GPTClassifier:
    torch.manual_seed(0)
    tiny_config.dropout = 0.0
    return GPTClassifier(GPT(tiny_config), ["neg", "neu", "pos"]).eval()


def test_padding_does_not_change_a_sequence_class_logits(classifier):
    sequences = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    idx, lengths = pad_right(sequences, pad_id=1)
    assert idx.tolist()[1] == [11, 12, 1, 1, 1, 1] and lengths.tolist() == [6, 2, 3]
    with torch.no_grad():
        batched, _ = classifier(idx, lengths)
        alone = [classifier(*pad_right([sequence], pad_id=1))[0][0] for sequence in sequences]
        # Pooling a pad position instead would read a different hidden state.
        wrong, _ = classifier(idx, torch.full_like(lengths, idx.size(1)))
    assert batched.shape == (3, 3)
    for row, logits in enumerate(alone):
        assert torch.allclose(batched[row], logits, atol=1e-5)
    assert not torch.allclose(wrong[1], alone[1], atol=1e-3)


def test_loss_is_cross_entropy_against_the_labels(classifier):
    idx, lengths = pad_right([[5, 6], [7, 8, 9]], pad_id=1)
    logits, loss = classifier(idx, lengths, torch.tensor([2, 0]))
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.tensor([2, 0])).item())


def test_metrics_accuracy_macro_f1_and_confusion():
    true = [0, 0, 0, 1, 1, 2]
    predicted = [0, 0, 1, 1, 2, 2]
    metrics = classification_metrics(true, predicted, n_classes=4)
    assert metrics.confusion == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert metrics.accuracy == pytest.approx(4 / 6)
    assert metrics.f1[:3] == pytest.approx([0.8, 0.5, 2 / 3])
    # Class 3 is neither a label nor a prediction: it does not dilute the macro average.
    assert metrics.macro_f1 == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_head_and_trunk_round_trip(classifier, tmp_path):
    final = save_final(tmp_path / "run", classifier.gpt)
    save_head(tmp_path / "run" / "classifier", classifier, max_length=12)
    loaded, max_length = load_classifier(final, tmp_path / "run" / "classifier")
    idx, lengths = pad_right([[5, 6, 7]], pad_id=1)
    assert max_length == 12 and loaded.labels == ["neg", "neu", "pos"]
    with torch.no_grad():
        assert torch.equal(loaded(idx, lengths)[0], classifier(idx, lengths)[0])


@pytest.fixture
def tagger(tiny_config) -> GPTTagger:
    torch.manual_seed(0)
    tiny_config.dropout = 0.0
    return GPTTagger(GPT(tiny_config), ["name", "number"], "each_token").eval()


def test_padding_does_not_change_a_token_tag_logits(tagger):
    sequences = [[5, 6, 7, 8, 9, 10], [11, 12]]
    idx, _ = pad_right(sequences, pad_id=1)
    with torch.no_grad():
        batched, _ = tagger(idx)
        alone = tagger(torch.tensor([sequences[1]]))[0][0]
    assert batched.shape == (2, 6, len(tagger.tags)) and tagger.tags == ["O", "B-name", "I-name", "B-number", "I-number"]
    assert torch.allclose(batched[1, :2], alone, atol=1e-5)


def test_tagging_loss_is_the_mean_over_tagged_tokens_only(tagger):
    idx = torch.tensor([[5, 6, 7, 8]])
    targets = torch.tensor([[-1, 1, 2, -1]])
    logits, loss = tagger(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits[0, 1:3], targets[0, 1:3])
    assert loss.item() == pytest.approx(expected.item())


def test_a_tagger_head_round_trips_with_its_reading(tiny_config, tmp_path):
    torch.manual_seed(0)
    tagger = GPTTagger(GPT(tiny_config), ["name"], "last_token").eval()
    final = save_final(tmp_path / "run", tagger.gpt)
    save_head(tmp_path / "run" / "classifier", tagger, max_length=10)
    loaded, max_length = load_classifier(final, tmp_path / "run" / "classifier")
    assert isinstance(loaded, GPTTagger) and max_length == 10
    assert loaded.span_label_from == "last_token" and loaded.tags == ["O", "B", "I", "E-name", "S-name"]
    idx = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], tagger(idx)[0])
