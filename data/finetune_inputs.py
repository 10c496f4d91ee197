"""What fine-tuning takes, checked without reading the data: objectives, record formats, policies.

Kept apart from ``data.finetune_data`` (pyarrow, tokenizers) so that the command line and the
settings refuse a bad objective, policy or data path before those libraries load.
"""

from __future__ import annotations

from pathlib import Path

from gptflow.data.errors import UserError
from gptflow.data.sources import COMPRESSION_BY_SUFFIX, SourceFile, detect_format

OBJECTIVES = ("sft", "classification", "tagging")
"""What a model is fine-tuned for: following instructions, labelling texts, or labelling spans of them."""
OVERLONG_POLICIES = ("truncate", "skip")
FORMATS = ("jsonl", "json", "csv", "parquet")
CONLL_SUFFIXES = (".conll", ".iob", ".bio")
"""Tagging data as CoNLL-style columns (a word and its tag per line); ``.gz``/``.zst`` too."""


class FinetuneDataError(UserError):
    """Fine-tuning data that leaves nothing to train on; the message names the file and the fix."""


def check_data_file(path: Path) -> SourceFile:
    """A fine-tuning or labelled data file as the reader takes it; ``FinetuneDataError`` if it is
    missing or not a record format."""
    path = Path(path)
    if not path.is_file():
        raise FinetuneDataError(f"Data file {path} does not exist.")
    suffixes = [suffix.lower() for suffix in path.suffixes]
    compression = COMPRESSION_BY_SUFFIX.get(suffixes[-1]) if suffixes else None
    conll_suffix = suffixes[-2] if compression and len(suffixes) > 1 else suffixes[-1] if suffixes else ""
    if conll_suffix in CONLL_SUFFIXES:
        return SourceFile(path, "conll", compression)
    detected = detect_format(path)
    if detected is None or detected[0] not in FORMATS:
        raise FinetuneDataError(f"Data file {path} must be .jsonl, .json, .csv (each optionally .gz or .zst), "
                                f".parquet, or for tagging CoNLL columns ({', '.join(CONLL_SUFFIXES)}).")
    return SourceFile(path, *detected)
