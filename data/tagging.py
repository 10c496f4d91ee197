"""Token classification ("tagging"): labelled character spans, their tags on BPE tokens, and
entity-level scores.

A tagging example is a text and its spans: half-open character ranges ``[start, end)`` with a
label (``[[0, 3, "keyword"], [4, 9, "name"]]``). Spans come from JSONL/JSON/CSV/parquet records
(``{"text": ..., "spans": [[start, end, label], ...]}``) or from CoNLL files (a token and its tag
per line, a blank line between sentences; tags in the IOB1, IOB2, IOBES or BILOU scheme).

The model labels BPE tokens, so spans are aligned to them by character offsets: a token belongs
to the span its characters (leading whitespace left out) overlap most; a span's tokens carry its
tags. A span whose edges fall inside a token (``=""`` is one BPE token holding an operator and
an empty string) is trained and scored at token granularity, and counted as *misaligned*.

A causal model's token sees only the tokens before it, so where a span's label is read matters
(``SPAN_LABEL_FROM``):

- ``each_token``: IOB2 tags (``B-name``, ``I-name``, ``O``), each token's tag read from its own
  hidden state. The first token of a span must name the label having read nothing of the span
  after it.
- ``last_token``: boundaries are tagged on every token (``B``, ``I``, ``O``) but the label only on
  a span's last token (``E-name``, or ``S-name`` for a one-token span), which has read the whole
  span. A run of ``B``/``I`` that no ``E-`` closes is not a span.

Scores are entity-level, as seqeval's default: a predicted span counts only if its tokens and
label equal a gold span's; precision, recall and F1 per label and over all spans (micro).
Nothing here imports torch: the prepare step and the MLflow model share it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SPAN_LABEL_FROM = ("each_token", "last_token")
"""Where a span's label is read: every token of it (IOB2), or its last token."""
OUTSIDE = "O"
NOT_SCORED = -1
"""Tag id of a token the loss leaves out: the start token, and the tokens of a span cut by max_length."""
SPANS_FIELD = "spans"

SKIP_MALFORMED_SPANS = "spans not a list of [start, end, label]"
SKIP_SPAN_OUTSIDE_TEXT = "span outside the text"
SKIP_OVERLAPPING_SPANS = "overlapping spans"
SKIP_UNKNOWN_TAG_SCHEME = "tag not in the IOB1, IOB2, IOBES or BILOU scheme"

CONLL_PREFIXES = {"B": "B", "I": "I", "E": "E", "S": "S", "L": "E", "U": "S"}
"""CoNLL tag prefixes of IOB1/IOB2, IOBES and BILOU, each read as its IOBES equivalent."""


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    label: str

    def to_list(self) -> list[Any]:
        return [self.start, self.end, self.label]


class SpanError(ValueError):
    """A record whose spans cannot be used: ``reason`` is one of the ``SKIP_*`` reasons, ``detail``
    what is wrong, ``word`` the index of a CoNLL sentence's word whose tag it is."""

    def __init__(self, reason: str, detail: str = "", word: int | None = None) -> None:
        super().__init__(f"{reason}{f' ({detail})' if detail else ''}")
        self.reason = reason
        self.detail = detail
        self.word = word


def parse_spans(value: Any, text: str) -> list[Span]:
    """The spans of a record, sorted by start: each ``[start, end, label]`` (or ``{"start",
    "end", "label"}``) with ``0 <= start < end <= len(text)`` and no two overlapping; a
    ``SpanError`` naming the first that is not. The list may come as JSON text (a CSV cell)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise SpanError(SKIP_MALFORMED_SPANS, f"{value[:40]!r} is not JSON") from None
    if not isinstance(value, list):
        raise SpanError(SKIP_MALFORMED_SPANS)
    spans = []
    for item in value:
        if isinstance(item, dict):
            item = [item.get("start"), item.get("end"), item.get("label")]
        if not (isinstance(item, (list, tuple)) and len(item) == 3 and all(_is_int(edge) for edge in item[:2])
                and isinstance(item[2], str) and item[2].strip()):
            raise SpanError(SKIP_MALFORMED_SPANS, repr(item))
        start, end, label = item
        if not 0 <= start < end <= len(text):
            raise SpanError(SKIP_SPAN_OUTSIDE_TEXT, f"[{start}, {end}) of a text of {len(text)} characters")
        spans.append(Span(start, end, label.strip()))
    spans.sort(key=lambda span: span.start)
    for before, after in zip(spans, spans[1:]):
        if after.start < before.end:
            raise SpanError(SKIP_OVERLAPPING_SPANS, f"{before.to_list()} and {after.to_list()}")
    return spans


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def conll_spans(words: Sequence[str], tags: Sequence[str]) -> tuple[str, list[Span]]:
    """A CoNLL sentence as text (words joined by single spaces) and spans. Tags are read
    leniently, as conlleval reads them: ``I-X`` after ``O`` or another label opens a span (IOB1),
    ``E-X``/``L-X`` closes one, ``S-X``/``U-X`` is a one-word span. A tag of no known scheme
    raises ``SpanError`` naming the word."""
    starts, position = [], 0
    for word in words:
        starts.append(position)
        position += len(word) + 1
    spans: list[Span] = []
    open_label: str | None = None
    open_start = 0

    def close(end_word: int) -> None:
        nonlocal open_label
        if open_label is not None:
            spans.append(Span(starts[open_start], starts[end_word] + len(words[end_word]), open_label))
        open_label = None

    for index, tag in enumerate(tags):
        if tag == OUTSIDE:
            close(index - 1)
            continue
        prefix, _, label = tag.partition("-")
        if prefix not in CONLL_PREFIXES or not label:
            raise SpanError(SKIP_UNKNOWN_TAG_SCHEME, repr(tag), word=index)
        kind = CONLL_PREFIXES[prefix]
        continues = open_label == label and kind in ("I", "E")
        if not continues:
            close(index - 1)
            open_label, open_start = label, index
        if kind in ("E", "S"):
            close(index)
    close(len(words) - 1)
    return " ".join(words), spans


# --- tags --------------------------------------------------------------------------------------


def tag_names(labels: Sequence[str], span_label_from: str) -> list[str]:
    """The head's classes, in order, for entity ``labels``."""
    if span_label_from == "each_token":
        return [OUTSIDE, *(f"{prefix}-{label}" for label in labels for prefix in "BI")]
    return [OUTSIDE, "B", "I", *(f"{prefix}-{label}" for label in labels for prefix in "ES")]


def tags_of(token_spans: Sequence[tuple[int, int, str]], n_tokens: int, span_label_from: str) -> list[str]:
    """Tags of ``n_tokens`` tokens holding ``token_spans`` (``[first, end)`` token ranges with a label)."""
    tags = [OUTSIDE] * n_tokens
    for first, end, label in token_spans:
        if span_label_from == "each_token":
            tags[first:end] = [f"B-{label}"] + [f"I-{label}"] * (end - first - 1)
        elif end - first == 1:
            tags[first] = f"S-{label}"
        else:
            tags[first:end] = ["B"] + ["I"] * (end - first - 2) + [f"E-{label}"]
    return tags


def spans_of_tags(tags: Sequence[str], span_label_from: str) -> list[tuple[int, int, str]]:
    """The ``[first, end)`` token spans and labels that ``tags`` (a ``tag_names`` sequence) mark.
    ``each_token`` reads IOB2 as seqeval's default does (an ``I-X`` that continues no ``X`` opens
    one); ``last_token`` keeps a run only where an ``E-``/``S-`` tag gives it a label."""
    spans: list[tuple[int, int, str]] = []
    open_label: str | None = None  # each_token: the open span's label; last_token: "" for an open run
    first = 0
    for index, tag in enumerate([*tags, OUTSIDE]):
        prefix, _, label = tag.partition("-")
        if span_label_from == "each_token":
            if prefix == "I" and open_label == label:
                continue
            if open_label is not None:
                spans.append((first, index, open_label))
            open_label, first = (label, index) if prefix in ("B", "I") else (None, index)
            continue
        if prefix == "I" and open_label is not None:
            continue
        if prefix == "E" and open_label is not None:
            spans.append((first, index + 1, label))
            open_label = None
        elif prefix in ("B", "I"):
            open_label, first = "", index
        elif prefix in ("E", "S"):
            spans.append((index, index + 1, label))
            open_label = None
        else:
            open_label = None
    return spans


# --- alignment ---------------------------------------------------------------------------------


@dataclass
class Alignment:
    token_spans: list[tuple[int, int, str]]
    """Each span as the ``[first, end)`` range of the tokens it was given, with its label."""
    misaligned: int
    """Spans whose edges fall inside a token: trained and scored at the tokens' edges."""
    lost: int
    """Spans no token was given (every token overlapping them overlaps another span more)."""


def align(text: str, offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> Alignment:
    """Spans as token ranges, for tokens at character ``offsets`` of ``text``."""
    owner: list[int | None] = []
    for start, end in offsets:
        start, end = _content(text, start, end)
        overlaps = [(min(end, span.end) - max(start, span.start), -index) for index, span in enumerate(spans)
                    if start < span.end and span.start < end]
        owner.append(-max(overlaps)[1] if overlaps else None)
    token_spans, misaligned, lost = [], 0, 0
    for index, span in enumerate(spans):
        tokens = [position for position, held_by in enumerate(owner) if held_by == index]
        if not tokens:
            lost += 1
            continue
        first, end = tokens[0], tokens[-1] + 1
        token_spans.append((first, end, span.label))
        covered = (_content(text, *offsets[first])[0], offsets[end - 1][1])
        misaligned += covered != _content(text, span.start, span.end)
    return Alignment(token_spans, misaligned, lost)


def char_span(text: str, offsets: Sequence[tuple[int, int]], first: int, end: int) -> tuple[int, int]:
    """The characters of tokens ``[first, end)``, whitespace at either end left out (a BPE token
    carries the space before a word; a predicted span may run into the newline after it)."""
    start, stop = _content(text, offsets[first][0], offsets[end - 1][1])
    trailing = len(text[start:stop]) - len(text[start:stop].rstrip())
    return (start, stop - trailing) if stop - trailing > start else (start, stop)


def _content(text: str, start: int, end: int) -> tuple[int, int]:
    """``[start, end)`` without leading whitespace (a BPE token carries the space before a word);
    unchanged if all of it is whitespace."""
    stripped = len(text[start:end]) - len(text[start:end].lstrip())
    return (start + stripped, end) if start + stripped < end else (start, end)


# --- scores ------------------------------------------------------------------------------------


@dataclass
class SpanScores:
    precision: float
    recall: float
    f1: float
    """Micro-averaged over every span of every label."""
    per_label: dict[str, dict[str, float]]
    """Label → ``precision``, ``recall``, ``f1`` and ``support`` (gold spans)."""
    gold: int
    predicted: int
    correct: int


def span_scores(gold: Sequence[Sequence[tuple[int, int, str]]], predicted: Sequence[Sequence[tuple[int, int, str]]],
                labels: Sequence[str]) -> SpanScores:
    """Entity-level scores of ``predicted`` against ``gold`` spans, one list per example: a
    prediction is correct only if an identical span (edges and label) is gold."""
    if len(gold) != len(predicted):
        raise ValueError(f"need as many predicted examples as gold ones: {len(predicted)} vs {len(gold)}")
    counts = {label: [0, 0, 0] for label in labels}  # gold, predicted, correct
    for gold_spans, predicted_spans in zip(gold, predicted):
        gold_set = set(gold_spans)
        for span in gold_spans:
            counts.setdefault(span[2], [0, 0, 0])[0] += 1
        for span in set(predicted_spans):
            counts.setdefault(span[2], [0, 0, 0])[1] += 1
            counts[span[2]][2] += span in gold_set
    per_label = {label: _prf(*count) for label, count in counts.items()}
    total = [sum(count[column] for count in counts.values()) for column in range(3)]
    micro = _prf(*total)
    return SpanScores(micro["precision"], micro["recall"], micro["f1"], per_label, *total)


def _prf(gold: int, predicted: int, correct: int) -> dict[str, float]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * correct / (gold + predicted) if gold + predicted else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "support": gold}


def token_types(spans: Sequence[tuple[int, int, str]], n_tokens: int) -> list[str]:
    """Each token's label (``O`` outside every span): a token confusion matrix's axes."""
    types = [OUTSIDE] * n_tokens
    for first, end, label in spans:
        types[first:end] = [label] * (end - first)
    return types
