"""Fine-tuning records read into examples: sft prompt/response pairs or chats, labelled texts, or
texts with spans (and CoNLL sentences), each checked and split, a bad one skipped and counted.

``read_examples`` reads one file as every gptflow input is read (``data.readers.read_records``)
and gives each usable record its split: the one asked for, else by the hash of its content
(``data.hashing.split_by_hash``), so a record keeps its split as the file grows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptflow.data.chat import ROLES, Message
from gptflow.data.errors import SkipReport
from gptflow.data.finetune_inputs import FinetuneDataError, check_data_file
from gptflow.data.hashing import hash_json, split_by_hash
from gptflow.data.readers import read_records
from gptflow.data.tagging import SPANS_FIELD, Span, SpanError, conll_spans, parse_spans

SKIP_NOT_AN_OBJECT = "record not a JSON object"
SKIP_MISSING_FIELDS = "record without the expected fields"
SKIP_MALFORMED_MESSAGES = "malformed messages"
SKIP_EMPTY_RESPONSE = "empty response"
SKIP_EMPTY_TEXT = "empty text"
SKIP_BAD_LABEL = "empty or non-text label"

SFT_FORMAT = ('{"prompt": "...", "response": "..."} or {"messages": [{"role": "user", "content": "..."}, '
              '{"role": "assistant", "content": "..."}]}')


@dataclass
class Example:
    """One usable record: its chat (sft), text and label (classification) or text and spans (tagging)."""

    location: str
    split: str
    messages: list[Message] | None = None
    text: str | None = None
    label: str | None = None
    spans: list[Span] | None = None


class RecordSkip(Exception):
    """Why a record is skipped: ``reason`` counts it in the skip report."""

    def __init__(self, reason: str, detail: str = "", location: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        """What is wrong, for the skip report."""
        self.location = location
        """Where, when more precise than the record's location (a CoNLL tag's line)."""


def require_both_splits(examples: list[Example], train_file: Path, val_file: Path | None, skips: SkipReport) -> None:
    found = Counter(example.split for example in examples)
    if not found["train"]:
        raise FinetuneDataError(f"No usable training example in {train_file} ({skips.summary()}). Expected one "
                                f"record per line or row, e.g. {SFT_FORMAT} for sft.")
    if not found["val"]:
        where = str(val_file) if val_file else f"the val_fraction of {train_file} (raise data.val_fraction or pass a val file)"
        raise FinetuneDataError(f"No usable validation example in {where} ({skips.summary()}).")


def read_examples(
    objective: str, path: Path, split: str | None, val_fraction: float, text_field: str, label_field: str,
    skips: SkipReport,
) -> Iterator[Example]:
    """Examples of one file; ``split`` None splits them by record hash."""
    records = read_records(check_data_file(path), skips)
    seen_keys: set[str] = set()
    reasons: Counter[str] = Counter()
    for location, record in records:
        if not isinstance(record, dict):
            skips.add(SKIP_NOT_AN_OBJECT, location)
            continue
        seen_keys.update(key for key in record if isinstance(key, str))  # csv puts surplus cells under None
        try:
            example = (_sft_example(record, location) if objective == "sft"
                       else _tagging_example(record, location, text_field) if objective == "tagging"
                       else _classification_example(record, location, text_field, label_field))
        except RecordSkip as skip:
            skips.add(skip.reason, (skip.location or location) + (f" ({skip.detail})" if skip.detail else ""))
            reasons[skip.reason] += 1
            continue
        reasons["usable"] += 1
        example.split = split or split_by_hash(hash_json(record), val_fraction)
        yield example
    if reasons and set(reasons) == {SKIP_MISSING_FIELDS}:
        # Not bad records but the wrong fields: a setting (or file) to fix, not data to skip.
        expected = {"sft": SFT_FORMAT, "tagging": f"fields {text_field!r} and {SPANS_FIELD!r}"}.get(
            objective, f"fields {text_field!r} and {label_field!r}")
        raise FinetuneDataError(f"No record of {path} has the {objective} fields: expected {expected}; its records have "
                                f"{', '.join(repr(key) for key in sorted(seen_keys))}. For classification and "
                                "tagging, data.text_field and data.label_field name other fields.")


def _sft_example(record: dict[str, Any], location: str) -> Example:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)
            for message in messages
        ):
            raise RecordSkip(SKIP_MALFORMED_MESSAGES)
        parsed = [Message(message["role"], message["content"]) for message in messages]
        responses = [message for message in parsed if message.role == "assistant"]
        if not responses or not all(message.content.strip() for message in responses):
            raise RecordSkip(SKIP_EMPTY_RESPONSE)
        return Example(location, "", messages=parsed)
    if not isinstance(record.get("prompt"), str) or not isinstance(record.get("response"), str):
        raise RecordSkip(SKIP_MISSING_FIELDS)
    if not record["response"].strip():
        raise RecordSkip(SKIP_EMPTY_RESPONSE)
    system = record.get("system")
    messages = [Message("system", system)] if isinstance(system, str) and system.strip() else []
    messages += [Message("user", record["prompt"]), Message("assistant", record["response"])]
    return Example(location, "", messages=messages)


def _classification_example(record: dict[str, Any], location: str, text_field: str, label_field: str) -> Example:
    if text_field not in record or label_field not in record:
        raise RecordSkip(SKIP_MISSING_FIELDS)
    text, label = record[text_field], record[label_field]
    if not isinstance(text, str) or not text.strip():
        raise RecordSkip(SKIP_EMPTY_TEXT)
    if isinstance(label, int) and not isinstance(label, bool):
        label = str(label)
    if not isinstance(label, str) or not label.strip():
        raise RecordSkip(SKIP_BAD_LABEL)
    return Example(location, "", text=text.replace("\r\n", "\n"), label=label.strip())


def _tagging_example(record: dict[str, Any], location: str, text_field: str) -> Example:
    """A record of text and spans, or a CoNLL sentence (``data.readers``: words, tags, lines)."""
    try:
        if "words" in record and "tags" in record:
            text, spans = conll_spans(record["words"], record["tags"])
            return Example(location, "", text=text, spans=spans)
        if text_field not in record or SPANS_FIELD not in record:
            raise RecordSkip(SKIP_MISSING_FIELDS)
        text = record[text_field]
        if not isinstance(text, str) or not text.strip():
            raise RecordSkip(SKIP_EMPTY_TEXT)
        # Offsets count characters of the text as given: no newline normalisation here.
        return Example(location, "", text=text, spans=parse_spans(record[SPANS_FIELD], text))
    except SpanError as error:
        # A CoNLL tag is named by its own line.
        line = f"{location.rsplit(':', 1)[0]}:{record['lines'][error.word]}" if error.word is not None else None
        raise RecordSkip(error.reason, error.detail, line) from None
