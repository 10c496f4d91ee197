"""Fine-tuning data: files of instruction pairs, chats or labelled texts → token examples in Arrow.

Input: records of a JSONL, JSON, CSV or parquet file (``.gz`` / ``.zst`` too), read by
``data.readers.read_records`` as every gptflow input is:

- ``sft``: ``{"prompt": ..., "response": ...}`` (optionally ``"system"``), or
  ``{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}`` with at least
  one assistant message. Encoded with the chat template; only assistant tokens are trained.
- ``classification``: a text field and a label field (``text`` and ``label`` unless configured);
  labels are strings (integers are read as their decimal text).

Bad records are skipped and counted with their location (what the reader skips, and a record
without the fields, an empty response or text, a val label the train split lacks). Over-long examples are
truncated or skipped, as configured, and counted. Only input that leaves nothing to train on
(no usable record, an empty split, fewer than two labels) is a ``FinetuneDataError``.

A labelled file scored by an already trained classifier (``prepare_labelled``) becomes one
``eval`` split: records with a label the classifier does not know are skipped and counted.

Output, one directory: ``train.arrow`` and ``val.arrow``, or ``eval.arrow`` (columns ``input_ids: list<int32>``,
``location: string``, and ``loss_mask: list<bool>`` for sft or ``label: int32`` for
classification) and ``prepared.json`` (labels, counts, truncations, skips).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from gptflow.data.chat import ROLES, ChatTemplate, Message
from gptflow.data.errors import SkipReport
from gptflow.data.finetune_inputs import OBJECTIVES, FinetuneDataError, check_data_file
from gptflow.data.readers import read_records
from gptflow.data.store import atomic_directory, hash_json, read_contents_hash
from gptflow.data.tokenizer import EOT_TOKEN, load_tokenizer

PREPARED_FILE = "prepared.json"
ROWS_PER_BATCH = 1024

SKIP_NOT_AN_OBJECT = "record not a JSON object"
SKIP_MISSING_FIELDS = "record without the expected fields"
SKIP_MALFORMED_MESSAGES = "malformed messages"
SKIP_EMPTY_RESPONSE = "empty response"
SKIP_EMPTY_TEXT = "empty text"
SKIP_BAD_LABEL = "empty or non-text label"
SKIP_TOO_LONG = "longer than max_length"
SKIP_PROMPT_FILLS_MAX_LENGTH = "prompt leaves no response token within max_length"
SKIP_UNSEEN_LABEL = "val label not seen in train"
SKIP_UNKNOWN_LABEL = "label the classifier was not trained on"
EVAL_SPLIT = "eval"
"""The one split of a labelled file prepared to score a trained classifier (``prepare_labelled``)."""

SFT_FORMAT = ('{"prompt": "...", "response": "..."} or {"messages": [{"role": "user", "content": "..."}, '
              '{"role": "assistant", "content": "..."}]}')


@dataclass
class PreparedData:
    directory: str
    fingerprint: str
    """Hash of every file of ``directory``: the input key of the stages trained on it."""
    objective: str
    labels: list[str]
    """Classification labels in class-index order (sorted); empty for sft."""
    examples: dict[str, int]
    """Examples per split (``train``, ``val``) after skips."""
    tokens: dict[str, int]
    """Tokens per split."""
    trained_tokens: dict[str, int]
    """Tokens per split the loss is computed on: response tokens for sft, examples for classification."""
    truncated: dict[str, int]
    """Examples per split cut to ``max_length``."""
    max_length: int
    skips: dict[str, Any] = field(default_factory=dict)
    """``SkipReport.to_dict()`` of everything skipped, both splits."""
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """Classification: split → label → examples."""

    def skip_report(self) -> SkipReport:
        return SkipReport.from_dict(self.skips)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> PreparedData:
        return cls(**value)


@dataclass
class PreparedSplit:
    """One split read back for training: token ids per example, and its targets."""

    input_ids: list[np.ndarray]
    locations: list[str]
    loss_mask: list[np.ndarray] | None = None
    """sft: per token, whether it is trained on."""
    labels: np.ndarray | None = None
    """classification: class index per example."""


@dataclass
class _Example:
    location: str
    split: str
    messages: list[Message] | None = None
    text: str | None = None
    label: str | None = None


class _Skip(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


def prepare_examples(
    objective: str,
    train_file: Path,
    val_file: Path | None,
    tokenizer_file: Path,
    out_dir: Path,
    *,
    max_length: int,
    overlong: str,
    val_fraction: float,
    text_field: str = "text",
    label_field: str = "label",
    template: ChatTemplate | None = None,
) -> PreparedData:
    """Read, split, tokenize and write the examples of ``train_file`` (and ``val_file``, else a
    ``val_fraction`` of ``train_file`` chosen by record hash, stable as the file grows).

    ``max_length`` bounds the tokens of an example; ``overlong`` (``truncate`` or ``skip``) says
    what happens to longer ones. ``template`` encodes sft conversations (default: ``ChatTemplate()``).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    skips = SkipReport()
    examples = list(_read_examples(objective, Path(train_file), "train" if val_file else None, val_fraction,
                                   text_field, label_field, skips))
    if val_file is not None:
        examples += _read_examples(objective, Path(val_file), "val", val_fraction, text_field, label_field, skips)
    _require_both_splits(examples, train_file, val_file, skips)
    labels: list[str] = []
    if objective == "classification":
        labels = sorted({example.label for example in examples if example.split == "train"})
        if len(labels) < 2:
            raise FinetuneDataError(f"The train split of {train_file} has {len(labels)} label(s) ({', '.join(labels)}): "
                                    "classification needs at least two.")
        for example in examples:
            if example.split == "val" and example.label not in labels:
                skips.add(SKIP_UNSEEN_LABEL, f"{example.location} ({example.label!r})")
        examples = [example for example in examples if example.split == "train" or example.label in labels]
        _require_both_splits(examples, train_file, val_file, skips)

    tokenizer = load_tokenizer(tokenizer_file)
    template = template or ChatTemplate()
    prepared = PreparedData(directory=str(out_dir), fingerprint="", objective=objective, labels=labels,
                            examples={}, tokens={}, trained_tokens={}, truncated={}, max_length=max_length)
    with atomic_directory(Path(out_dir)) as tmp:
        for split in ("train", "val"):
            source = val_file if split == "val" and val_file else train_file
            _write_examples(tmp, split, [example for example in examples if example.split == split], source,
                            tokenizer, template, prepared, overlong, skips)
        prepared.skips = skips.to_dict()
        (tmp / PREPARED_FILE).write_text(json.dumps(prepared.to_dict(), indent=2))
    prepared.fingerprint = read_contents_hash(Path(out_dir))
    return prepared


def prepare_labelled(
    path: Path,
    tokenizer_file: Path,
    out_dir: Path,
    *,
    labels: list[str],
    max_length: int,
    text_field: str = "text",
    label_field: str = "label",
    field_settings: str = "text_field and label_field",
) -> PreparedData:
    """Every usable record of a labelled file as the ``eval`` split, to score a trained classifier
    whose class order is ``labels``: texts are cut to ``max_length`` tokens (as the classifier's
    own inputs are), records with a label it does not know are skipped and counted.
    ``field_settings`` names the caller's settings for the two fields, for error messages."""
    skips = SkipReport()
    examples = []
    for example in _read_examples("classification", Path(path), EVAL_SPLIT, 0.0, text_field, label_field, skips,
                                  field_settings):
        if example.label in labels:
            examples.append(example)
        else:
            skips.add(SKIP_UNKNOWN_LABEL, f"{example.location} ({example.label!r})")
    if not examples:
        raise FinetuneDataError(f"No record of {path} can be scored by the classifier, whose labels are "
                                f"{', '.join(labels)} ({skips.summary()}).")
    prepared = PreparedData(directory=str(out_dir), fingerprint="", objective="classification", labels=list(labels),
                            examples={}, tokens={}, trained_tokens={}, truncated={}, max_length=max_length)
    with atomic_directory(Path(out_dir)) as tmp:
        _write_examples(tmp, EVAL_SPLIT, examples, Path(path), load_tokenizer(tokenizer_file), ChatTemplate(),
                        prepared, "truncate", skips)
        prepared.skips = skips.to_dict()
        (tmp / PREPARED_FILE).write_text(json.dumps(prepared.to_dict(), indent=2))
    prepared.fingerprint = read_contents_hash(Path(out_dir))
    return prepared


def _write_examples(
    directory: Path, split: str, examples: list[_Example], source: Path, tokenizer: Any, template: ChatTemplate,
    prepared: PreparedData, overlong: str, skips: SkipReport,
) -> None:
    """Encode ``examples`` into ``<split>.arrow`` in ``directory`` and record the split's counts in
    ``prepared``; over-long examples are truncated or skipped as ``overlong`` says."""
    objective, max_length = prepared.objective, prepared.max_length
    start_id = ChatTemplate.token_id(tokenizer, EOT_TOKEN)
    label_index = {label: index for index, label in enumerate(prepared.labels)}
    rows = []
    truncated = 0
    for example in examples:
        if objective == "sft":
            ids, mask = template.encode(tokenizer, example.messages)
        else:
            ids, mask = encode_text(tokenizer, example.text, start_id), []
        if len(ids) > max_length:
            if overlong == "skip":
                skips.add(SKIP_TOO_LONG, example.location)
                continue
            ids, mask = ids[:max_length], mask[:max_length]
            if objective == "sft" and not any(mask[1:]):
                skips.add(SKIP_PROMPT_FILLS_MAX_LENGTH, example.location)
                continue
            truncated += 1
        rows.append((ids, mask, label_index.get(example.label), example.location))
    if not rows:
        fix = "finetune.overlong=truncate, or " if overlong == "skip" else ""
        raise FinetuneDataError(f"No {split} example of {source} fits max_length={max_length} tokens "
                                f"({skips.summary()}). Use {fix}a higher finetune.max_length (up to the "
                                "base model's block_size), or shorter prompts.")
    _write_split(directory / f"{split}.arrow", objective, rows)
    prepared.examples[split] = len(rows)
    prepared.tokens[split] = sum(len(ids) for ids, _, _, _ in rows)
    # The first token is never a target: the model reads it, it does not predict it.
    prepared.trained_tokens[split] = (sum(sum(mask[1:]) for _, mask, _, _ in rows) if objective == "sft"
                                      else len(rows))
    prepared.truncated[split] = truncated
    if objective == "classification":
        prepared.label_counts[split] = dict(sorted(Counter(prepared.labels[row[2]] for row in rows).items()))


def encode_text(tokenizer: Any, text: str, start_id: int) -> list[int]:
    """A text to classify as token ids: the start token (end-of-text, where every pretraining
    document started), then the text's tokens. Training and the MLflow model share it."""
    return [start_id, *tokenizer.encode(text, add_special_tokens=False).ids]


def read_split(directory: Path, split: str) -> PreparedSplit:
    """A split written by ``prepare_examples``, as numpy arrays per example."""
    with pa.memory_map(str(Path(directory) / f"{split}.arrow")) as source:
        table = pa.ipc.open_file(source).read_all()
    return PreparedSplit(
        input_ids=_lists(table.column("input_ids")),
        locations=table.column("location").to_pylist(),
        loss_mask=_lists(table.column("loss_mask")) if "loss_mask" in table.column_names else None,
        labels=table.column("label").to_numpy() if "label" in table.column_names else None,
    )


def _lists(column: pa.ChunkedArray) -> list[np.ndarray]:
    combined = column.combine_chunks()
    offsets = combined.offsets.to_numpy()
    values = combined.values.to_numpy(zero_copy_only=False)
    return [values[start:end] for start, end in itertools.pairwise(offsets)]


def _write_split(path: Path, objective: str, rows: list[tuple[list[int], list[bool], int | None, str]]) -> None:
    columns = [("input_ids", pa.list_(pa.int32())), ("location", pa.string())]
    columns.append(("loss_mask", pa.list_(pa.bool_())) if objective == "sft" else ("label", pa.int32()))
    schema = pa.schema(columns)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for start in range(0, len(rows), ROWS_PER_BATCH):
            batch = rows[start:start + ROWS_PER_BATCH]
            arrays = [pa.array([ids for ids, _, _, _ in batch], pa.list_(pa.int32())),
                      pa.array([location for _, _, _, location in batch], pa.string())]
            arrays.append(pa.array([mask for _, mask, _, _ in batch], pa.list_(pa.bool_())) if objective == "sft"
                          else pa.array([label for _, _, label, _ in batch], pa.int32()))
            writer.write_batch(pa.record_batch(arrays, schema=schema))


def _require_both_splits(examples: list[_Example], train_file: Path, val_file: Path | None, skips: SkipReport) -> None:
    found = Counter(example.split for example in examples)
    if not found["train"]:
        raise FinetuneDataError(f"No usable training example in {train_file} ({skips.summary()}). Expected one "
                                f"record per line or row, e.g. {SFT_FORMAT} for sft.")
    if not found["val"]:
        where = str(val_file) if val_file else f"the val_fraction of {train_file} (raise finetune.val_fraction or pass a val file)"
        raise FinetuneDataError(f"No usable validation example in {where} ({skips.summary()}).")


def _read_examples(
    objective: str, path: Path, split: str | None, val_fraction: float, text_field: str, label_field: str,
    skips: SkipReport, field_settings: str = "finetune.text_field and finetune.label_field",
) -> Iterator[_Example]:
    """Examples of one file; ``split`` None splits them by record hash. ``field_settings`` names
    the settings that choose other fields, for the error when no record has them."""
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
                       else _classification_example(record, location, text_field, label_field))
        except _Skip as skip:
            skips.add(skip.reason, location)
            reasons[skip.reason] += 1
            continue
        reasons["usable"] += 1
        example.split = split or _hash_split(record, val_fraction)
        yield example
    if reasons and set(reasons) == {SKIP_MISSING_FIELDS}:
        # Not bad records but the wrong fields: a setting (or file) to fix, not data to skip.
        expected = SFT_FORMAT if objective == "sft" else f"fields {text_field!r} and {label_field!r}"
        raise FinetuneDataError(f"No record of {path} has the {objective} fields: expected {expected}; its records have "
                                f"{', '.join(repr(key) for key in sorted(seen_keys))}. For classification, "
                                f"{field_settings} name other fields.")


def _sft_example(record: dict[str, Any], location: str) -> _Example:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)
            for message in messages
        ):
            raise _Skip(SKIP_MALFORMED_MESSAGES)
        parsed = [Message(message["role"], message["content"]) for message in messages]
        responses = [message for message in parsed if message.role == "assistant"]
        if not responses or not all(message.content.strip() for message in responses):
            raise _Skip(SKIP_EMPTY_RESPONSE)
        return _Example(location, "", messages=parsed)
    if not isinstance(record.get("prompt"), str) or not isinstance(record.get("response"), str):
        raise _Skip(SKIP_MISSING_FIELDS)
    if not record["response"].strip():
        raise _Skip(SKIP_EMPTY_RESPONSE)
    system = record.get("system")
    messages = [Message("system", system)] if isinstance(system, str) and system.strip() else []
    messages += [Message("user", record["prompt"]), Message("assistant", record["response"])]
    return _Example(location, "", messages=messages)


def _classification_example(record: dict[str, Any], location: str, text_field: str, label_field: str) -> _Example:
    if text_field not in record or label_field not in record:
        raise _Skip(SKIP_MISSING_FIELDS)
    text, label = record[text_field], record[label_field]
    if not isinstance(text, str) or not text.strip():
        raise _Skip(SKIP_EMPTY_TEXT)
    if isinstance(label, int) and not isinstance(label, bool):
        label = str(label)
    if not isinstance(label, str) or not label.strip():
        raise _Skip(SKIP_BAD_LABEL)
    return _Example(location, "", text=text.replace("\r\n", "\n"), label=label.strip())


def _hash_split(record: dict[str, Any], val_fraction: float) -> str:
    """As the corpus is split: by content hash, so a record never changes split as the file grows."""
    return "val" if int(hash_json(record)[:8], 16) / 2**32 < val_fraction else "train"
