"""Multiple-choice benchmarks in HellaSwag's format, read and tokenized for zero-shot scoring.

One record per example, ``{"ctx": "...", "endings": ["...", ...], "label": 2}``, in any record
format gptflow reads (JSONL as HellaSwag ships, JSON, parquet; ``.gz`` / ``.zst`` too), through
``data.readers.read_records``. Records with
HellaSwag's own field names (``activity_label``, ``ctx_a``, ``ctx_b``, as in its released files
and the Hugging Face copy, whose labels are strings) build their context and endings exactly as
lm-evaluation-harness's ``hellaswag`` task does, so accuracies compare with published ones.

The reader skips and counts bad input as it does everywhere, but a benchmark's accuracy is only
comparable over all of its examples: so a file with any skipped input or unusable record is
refused with a ``MultipleChoiceError`` that lists the bad records (``file:line``) and what each
lacks, before anything is scored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from gptflow.data.errors import SkipReport, UserError
from gptflow.data.readers import read_records
from gptflow.data.sources import SourceFile, detect_format

TARGET_DELIMITER = " "
"""Put between the context and each ending, as lm-evaluation-harness's default
``target_delimiter``: an ending is scored as the continuation ``" " + ending``."""
HELLASWAG_FIELDS = ("activity_label", "ctx_a", "ctx_b")
EXPECTED_FORMAT = (
    'one record per example, e.g. a JSONL line {"ctx": "...", "endings": ["...", "..."], "label": <index of the right ending>} '
    '(or HellaSwag\'s own fields "activity_label", "ctx_a", "ctx_b", "endings", "label")'
)
MAX_LISTED_PROBLEMS = 5


class MultipleChoiceError(UserError):
    """A multiple-choice file that cannot be scored as given; the message names the bad lines."""


@dataclass(frozen=True)
class MultipleChoiceExample:
    location: str
    """``file:line``, for messages and the per-example predictions."""
    context: str
    endings: tuple[str, ...]
    label: int
    """Index of the right ending."""


@dataclass(frozen=True)
class EncodedExample:
    context_ids: list[int]
    """The start token, then the context's tokens."""
    ending_ids: list[list[int]]
    """Each ending's continuation tokens (delimiter included), as the model must predict them."""


def read_multiple_choice(path: Path) -> list[MultipleChoiceExample]:
    """Every example of the file at ``path``, in file order."""
    if not path.is_file():
        raise MultipleChoiceError(f"Multiple-choice file {path} does not exist.")
    detected = detect_format(path)
    if detected is None or detected[0] == "text":
        raise MultipleChoiceError(f"Multiple-choice file {path} must be .jsonl, .json (each optionally .gz or .zst) "
                                  "or .parquet.")
    examples: list[MultipleChoiceExample] = []
    problems: list[str] = []
    skips = SkipReport()
    for location, record in read_records(SourceFile(path, *detected), skips):
        try:
            examples.append(_parse_record(record, location))
        except MultipleChoiceError as error:
            problems.append(str(error))
    unusable = len(problems) + skips.total
    problems += [f"{location}: {reason}" for reason, locations in skips.examples.items() for location in locations]
    if problems:
        listed = "; ".join(problems[:MAX_LISTED_PROBLEMS]) + ("; ..." if len(problems) > MAX_LISTED_PROBLEMS else "")
        raise MultipleChoiceError(
            f"{unusable} of the records in {path} cannot be scored: {listed}. Expected {EXPECTED_FORMAT}."
        )
    if not examples:
        raise MultipleChoiceError(f"Multiple-choice file {path} holds no records. Expected {EXPECTED_FORMAT}.")
    return examples


def encode_example(tokenizer: Tokenizer, example: MultipleChoiceExample, start_id: int) -> EncodedExample:
    """Tokens of the context and of each ending, split as lm-evaluation-harness splits them:
    whitespace ending the context moves to the continuation, the whole text is encoded at once and
    the continuation is what follows the context's own tokens (so a merge across the boundary
    cannot hide a token). ``start_id`` (the end-of-text id, which precedes every document in
    training) goes first, so even an empty context leaves a token to predict the ending from."""
    context = example.context.rstrip()
    moved_whitespace = example.context[len(context):]
    context_ids = tokenizer.encode(context, add_special_tokens=False).ids
    ending_ids = []
    for ending in example.endings:
        whole = tokenizer.encode(context + moved_whitespace + TARGET_DELIMITER + ending, add_special_tokens=False).ids
        ending_ids.append(whole[len(context_ids):])
    return EncodedExample(context_ids=[start_id, *context_ids], ending_ids=ending_ids)


def _parse_record(record: Any, location: str) -> MultipleChoiceExample:
    if not isinstance(record, dict):
        raise MultipleChoiceError(f"{location}: a {type(record).__name__}, not a JSON object")
    hellaswag = all(name in record for name in HELLASWAG_FIELDS)
    required = (*HELLASWAG_FIELDS, "endings", "label") if hellaswag else ("ctx", "endings", "label")
    missing = [name for name in required if name not in record]
    if missing:
        raise MultipleChoiceError(f"{location}: no {', '.join(repr(name) for name in missing)} field "
                                  f"(it has {', '.join(repr(name) for name in record) or 'none'})")
    texts = [record[name] for name in required[:-2]]
    endings = record["endings"]
    if not all(isinstance(text, str) for text in texts):
        raise MultipleChoiceError(f"{location}: the context fields must be strings")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) and e.strip() for e in endings):
        raise MultipleChoiceError(f"{location}: 'endings' must be a list of at least two non-empty strings")
    label = _label(record["label"], len(endings), location)
    if hellaswag:
        activity, ctx_a, ctx_b = texts
        # lm-evaluation-harness's hellaswag doc_to_text, capitalize() (which lower-cases the rest) included.
        context = _preprocess_hellaswag(f"{activity}: {ctx_a} {ctx_b.capitalize()}")
        endings = [_preprocess_hellaswag(ending) for ending in endings]
    else:
        context = texts[0]
    return MultipleChoiceExample(location=location, context=context, endings=tuple(endings), label=label)


def _label(value: Any, n_endings: int, location: str) -> int:
    # Hugging Face's copy of HellaSwag stores labels as strings ("0".."3"), and "" in its test split.
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise MultipleChoiceError(f"{location}: 'label' must be the index of the right ending, got {value!r} "
                                  "(HellaSwag's test split has no labels: score its validation split)")
    if not 0 <= value < n_endings:
        raise MultipleChoiceError(f"{location}: label {value} is out of range for {n_endings} endings "
                                  f"(labels count from 0, so 0..{n_endings - 1})")
    return value


def _preprocess_hellaswag(text: str) -> str:
    """lm-evaluation-harness's hellaswag ``preprocess``: drops WikiHow's bracketed markup."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")
