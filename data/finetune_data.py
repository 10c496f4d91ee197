"""Fine-tuning data: files of instruction pairs, chats or labelled texts → token examples in Arrow.

Input: records of a JSONL, JSON, CSV or parquet file (``.gz`` / ``.zst`` too), read by
``data.readers.read_records`` as every gptflow input is:

- ``sft``: ``{"prompt": ..., "response": ...}`` (optionally ``"system"``), or
  ``{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}`` with at least
  one assistant message. Encoded with the chat template; only assistant tokens are trained.
- ``classification``: a text field and a label field (``text`` and ``label`` unless configured);
  labels are strings (integers are read as their decimal text).
- ``tagging``: a text field and ``spans`` (``[[start, end, label], ...]``, character offsets), or
  a CoNLL file (``.conll``, ``.iob``, ``.bio``): see ``data.tagging``.

Bad records are skipped and counted with their location (what the reader skips, and a record
without the fields, an empty response or text, a val label the train split lacks, spans outside
the text or overlapping, a CoNLL tag of no known scheme). Over-long examples are truncated or
skipped, as configured, and counted. Only input that leaves nothing to train on (no usable
record, an empty split, fewer than two labels, or no span label for tagging) is a
``FinetuneDataError``.

A labelled file scored by an already trained classifier (``prepare_labelled``) becomes one
``eval`` split: records with a label the classifier does not know are skipped and counted.

Output, one directory: ``train.arrow`` and ``val.arrow``, or ``eval.arrow`` (columns ``input_ids: list<int32>``,
``location: string``, and ``loss_mask: list<bool>`` for sft, ``label: int32`` for
classification, or ``tags: list<int16>``, ``text: string`` and ``offsets: list<int32>`` (each
token's start and end character) for tagging) and ``prepared.json`` (labels, counts,
truncations, skips).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from gptflow.data.chat import ChatTemplate
from gptflow.data.commits import atomic_directory, read_contents_hash
from gptflow.data.errors import SkipReport
from gptflow.data.finetune_inputs import OBJECTIVES, FinetuneDataError
from gptflow.data.finetune_records import Example, read_examples, require_both_splits
from gptflow.data.store import LOCAL_STORE, ArtifactStore
from gptflow.data.tagging import (
    NOT_SCORED,
    align,
    tag_names,
    tags_of,
)
from gptflow.data.tokenizer import EOT_TOKEN, load_tokenizer

PREPARED_FILE = "prepared.json"
ROWS_PER_BATCH = 1024

SKIP_TOO_LONG = "longer than max_length"
SKIP_PROMPT_FILLS_MAX_LENGTH = "prompt leaves no response token within max_length"
SKIP_UNSEEN_LABEL = "val label not seen in train"
SKIP_UNKNOWN_LABEL = "label the classifier was not trained on"
SKIP_UNSEEN_SPAN_LABEL = "val span label not seen in train"
SKIP_UNKNOWN_SPAN_LABEL = "span label the tagger was not trained on"
EVAL_SPLIT = "eval"
"""The one split of a labelled file prepared to score a trained classifier (``prepare_labelled``)."""

@dataclass
class PreparedData:
    directory: str
    fingerprint: str
    """Hash of every file of ``directory``: the input key of the stages trained on it."""
    objective: str
    labels: list[str]
    """Classification labels in class-index order, or tagging's span labels (sorted); empty for sft."""
    examples: dict[str, int]
    """Examples per split (``train``, ``val``) after skips."""
    tokens: dict[str, int]
    """Tokens per split."""
    trained_tokens: dict[str, int]
    """Tokens per split the loss is computed on: response tokens for sft, examples for
    classification, tagged tokens for tagging."""
    truncated: dict[str, int]
    """Examples per split cut to ``max_length``."""
    max_length: int
    skips: dict[str, Any] = field(default_factory=dict)
    """``SkipReport.to_dict()`` of everything skipped, both splits."""
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """Classification: split → label → examples; tagging: split → label → spans."""
    span_label_from: str = ""
    """Tagging: where a span's label is read (``data.tagging.SPAN_LABEL_FROM``); the head's tags follow from it."""
    spans: dict[str, dict[str, int]] = field(default_factory=dict)
    """Tagging: split → ``total`` spans, and of them ``misaligned`` (edges inside a token),
    ``lost`` (no token of their own) and ``truncated`` (cut by max_length, left out)."""

    @property
    def tags(self) -> list[str]:
        """Tagging: the head's classes, in order."""
        return tag_names(self.labels, self.span_label_from)

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
    tags: list[np.ndarray] | None = None
    """tagging: per token, its tag's index (``NOT_SCORED`` where the loss leaves it out)."""
    texts: list[str] | None = None
    """tagging: the example's text."""
    offsets: list[np.ndarray] | None = None
    """tagging: per token, ``(start, end)`` characters of its text (``(0, 0)`` for the start token)."""


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
    span_label_from: str = "each_token",
    template: ChatTemplate | None = None,
    artifacts: ArtifactStore = LOCAL_STORE,
) -> PreparedData:
    """Read, split, tokenize and write the examples of ``train_file`` (and ``val_file``, else a
    ``val_fraction`` of ``train_file`` chosen by record hash, stable as the file grows) into the
    store directory ``out_dir``, committed through ``artifacts``.

    ``max_length`` bounds the tokens of an example; ``overlong`` (``truncate`` or ``skip``) says
    what happens to longer ones. ``template`` encodes sft conversations (default: ``ChatTemplate()``);
    ``span_label_from`` chooses tagging's tags (``data.tagging``).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    skips = SkipReport()
    examples = list(read_examples(objective, Path(train_file), "train" if val_file else None, val_fraction,
                                   text_field, label_field, skips))
    if val_file is not None:
        examples += read_examples(objective, Path(val_file), "val", val_fraction, text_field, label_field, skips)
    require_both_splits(examples, train_file, val_file, skips)
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
        require_both_splits(examples, train_file, val_file, skips)
    elif objective == "tagging":
        labels = sorted({span.label for example in examples if example.split == "train" for span in example.spans})
        if not labels:
            raise FinetuneDataError(f"The train split of {train_file} has no span: tagging needs texts with labelled "
                                    'spans, e.g. {"text": "def f(): pass", "spans": [[0, 3, "keyword"]]}.')
        examples = [example for example in examples if example.split == "train"
                    or _spans_known(example, labels, SKIP_UNSEEN_SPAN_LABEL, skips)]
        require_both_splits(examples, train_file, val_file, skips)

    tokenizer = load_tokenizer(tokenizer_file)
    template = template or ChatTemplate()
    prepared = PreparedData(directory=str(out_dir), fingerprint="", objective=objective, labels=labels,
                            examples={}, tokens={}, trained_tokens={}, truncated={}, max_length=max_length,
                            span_label_from=span_label_from if objective == "tagging" else "")
    with artifacts.commit(Path(out_dir)) as tmp:
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
    objective: str = "classification",
    text_field: str = "text",
    label_field: str = "label",
    span_label_from: str = "",
) -> PreparedData:
    """Every usable record of a labelled file as the ``eval`` split, to score a trained classifier
    (or, ``objective="tagging"``, a tagger reading spans as ``span_label_from`` says) whose labels
    are ``labels``: texts are cut to ``max_length`` tokens (as the model's own inputs are), records
    with a label it does not know are skipped and counted."""
    skips = SkipReport()
    examples = []
    for example in read_examples(objective, Path(path), EVAL_SPLIT, 0.0, text_field, label_field, skips):
        if objective == "tagging":
            if _spans_known(example, labels, SKIP_UNKNOWN_SPAN_LABEL, skips):
                examples.append(example)
        elif example.label in labels:
            examples.append(example)
        else:
            skips.add(SKIP_UNKNOWN_LABEL, f"{example.location} ({example.label!r})")
    if not examples:
        raise FinetuneDataError(f"No record of {path} can be scored by the {'tagger' if objective == 'tagging' else 'classifier'}, "
                                f"whose labels are {', '.join(labels)} ({skips.summary()}).")
    prepared = PreparedData(directory=str(out_dir), fingerprint="", objective=objective, labels=list(labels),
                            examples={}, tokens={}, trained_tokens={}, truncated={}, max_length=max_length,
                            span_label_from=span_label_from)
    with atomic_directory(Path(out_dir)) as tmp:
        _write_examples(tmp, EVAL_SPLIT, examples, Path(path), load_tokenizer(tokenizer_file), ChatTemplate(),
                        prepared, "truncate", skips)
        prepared.skips = skips.to_dict()
        (tmp / PREPARED_FILE).write_text(json.dumps(prepared.to_dict(), indent=2))
    prepared.fingerprint = read_contents_hash(Path(out_dir))
    return prepared


def _write_examples(
    directory: Path, split: str, examples: list[Example], source: Path, tokenizer: Any, template: ChatTemplate,
    prepared: PreparedData, overlong: str, skips: SkipReport,
) -> None:
    """Encode ``examples`` into ``<split>.arrow`` in ``directory`` and record the split's counts in
    ``prepared``; over-long examples are truncated or skipped as ``overlong`` says."""
    objective, max_length = prepared.objective, prepared.max_length
    start_id = ChatTemplate.token_id(tokenizer, EOT_TOKEN)
    label_index = {label: index for index, label in enumerate(prepared.labels)}
    tag_index = {tag: index for index, tag in enumerate(prepared.tags)} if objective == "tagging" else {}
    rows: list[dict[str, Any]] = []
    truncated = 0
    span_counts: Counter[str] = Counter()
    for example in examples:
        if objective == "sft":
            ids, mask = template.encode(tokenizer, example.messages)
            row = {"loss_mask": mask}
        elif objective == "tagging":
            encoding = tokenizer.encode(example.text, add_special_tokens=False)
            ids = [start_id, *encoding.ids]
            aligned = align(example.text, encoding.offsets, example.spans)
            tags = [NOT_SCORED] + [tag_index[tag] for tag in tags_of(aligned.token_spans, len(encoding.ids),
                                                                      prepared.span_label_from)]
            row = {"tags": tags, "text": example.text, "offsets": [0, 0, *itertools.chain(*encoding.offsets)]}
            span_counts.update(total=len(example.spans), misaligned=aligned.misaligned, lost=aligned.lost)
        else:
            ids, row = encode_text(tokenizer, example.text, start_id), {"label": label_index[example.label]}
        if len(ids) > max_length:
            if overlong == "skip":
                skips.add(SKIP_TOO_LONG, example.location)
                continue
            ids = ids[:max_length]
            if objective == "sft":
                row["loss_mask"] = row["loss_mask"][:max_length]
                if not any(row["loss_mask"][1:]):
                    skips.add(SKIP_PROMPT_FILLS_MAX_LENGTH, example.location)
                    continue
            if objective == "tagging":
                row["tags"] = _cut_spans(row["tags"], max_length, aligned.token_spans, span_counts)
                row["offsets"] = row["offsets"][: 2 * max_length]
            truncated += 1
        rows.append({"input_ids": ids, "location": example.location, **row})
    if not rows:
        fix = "finetune.overlong=truncate, or " if overlong == "skip" else ""
        raise FinetuneDataError(f"No {split} example of {source} fits max_length={max_length} tokens "
                                f"({skips.summary()}). Use {fix}a higher finetune.max_length (up to the "
                                "base model's block_size), or shorter prompts.")
    _write_split(directory / f"{split}.arrow", objective, rows)
    prepared.examples[split] = len(rows)
    prepared.tokens[split] = sum(len(row["input_ids"]) for row in rows)
    # The first token is never a target: the model reads it, it does not predict it.
    prepared.trained_tokens[split] = (
        sum(sum(row["loss_mask"][1:]) for row in rows) if objective == "sft"
        else sum(tag != NOT_SCORED for row in rows for tag in row["tags"]) if objective == "tagging"
        else len(rows)
    )
    prepared.truncated[split] = truncated
    if objective == "classification":
        prepared.label_counts[split] = dict(sorted(Counter(prepared.labels[row["label"]] for row in rows).items()))
    if objective == "tagging":
        kept = {row["location"] for row in rows}
        prepared.label_counts[split] = dict(sorted(Counter(
            span.label for example in examples if example.location in kept for span in example.spans).items()))
        prepared.spans[split] = {name: span_counts[name] for name in ("total", "misaligned", "lost", "truncated")}


def _cut_spans(tags: list[int], max_length: int, token_spans: list[tuple[int, int, str]],
               counts: Counter[str]) -> list[int]:
    """``tags`` of an example cut to ``max_length`` tokens: the tokens of a span the cut splits are
    left out of the loss (half a span is no span); spans past or across the cut are counted."""
    tags = tags[:max_length]
    for first, end, _ in token_spans:
        first, end = first + 1, end + 1  # after the start token
        if end > max_length:
            counts["truncated"] += 1
            tags[first:max_length] = [NOT_SCORED] * max(0, max_length - first)
    return tags


def _spans_known(example: Example, labels: list[str], reason: str, skips: SkipReport) -> bool:
    """Whether every span label of ``example`` is one of ``labels``; if not, the skip is counted."""
    unknown = sorted({span.label for span in example.spans} - set(labels))
    if unknown:
        skips.add(reason, f"{example.location} ({', '.join(map(repr, unknown))})")
    return not unknown


def encode_text(tokenizer: Any, text: str, start_id: int) -> list[int]:
    """A text to classify as token ids: the start token (end-of-text, where every pretraining
    document started), then the text's tokens. Training and the MLflow model share it."""
    return [start_id, *tokenizer.encode(text, add_special_tokens=False).ids]


def read_split(directory: Path, split: str) -> PreparedSplit:
    """A split written by ``prepare_examples``, as numpy arrays per example."""
    with pa.memory_map(str(Path(directory) / f"{split}.arrow")) as source:
        table = pa.ipc.open_file(source).read_all()
    names = table.column_names
    return PreparedSplit(
        input_ids=_lists(table.column("input_ids")),
        locations=table.column("location").to_pylist(),
        loss_mask=_lists(table.column("loss_mask")) if "loss_mask" in names else None,
        labels=table.column("label").to_numpy() if "label" in names else None,
        tags=_lists(table.column("tags")) if "tags" in names else None,
        texts=table.column("text").to_pylist() if "text" in names else None,
        offsets=[pairs.reshape(-1, 2) for pairs in _lists(table.column("offsets"))] if "offsets" in names else None,
    )


def _lists(column: pa.ChunkedArray) -> list[np.ndarray]:
    combined = column.combine_chunks()
    offsets = combined.offsets.to_numpy()
    values = combined.values.to_numpy(zero_copy_only=False)
    return [values[start:end] for start, end in itertools.pairwise(offsets)]


_COLUMNS = {
    "sft": [("loss_mask", pa.list_(pa.bool_()))],
    "classification": [("label", pa.int32())],
    "tagging": [("tags", pa.list_(pa.int16())), ("text", pa.string()), ("offsets", pa.list_(pa.int32()))],
}
"""Each objective's columns beside ``input_ids`` and ``location``."""


def _write_split(path: Path, objective: str, rows: list[dict[str, Any]]) -> None:
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("location", pa.string()), *_COLUMNS[objective]])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for start in range(0, len(rows), ROWS_PER_BATCH):
            batch = rows[start:start + ROWS_PER_BATCH]
            arrays = [pa.array([row[column.name] for row in batch], column.type) for column in schema]
            writer.write_batch(pa.record_batch(arrays, schema=schema))
