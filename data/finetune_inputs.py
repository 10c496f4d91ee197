"""What fine-tuning takes, checked without reading the data: objectives, record formats, policies.

Kept apart from ``data.finetune_data`` (pyarrow, tokenizers) so that the command line and the
settings refuse a bad objective, policy or data path before those libraries load.
"""

from __future__ import annotations

from pathlib import Path

from gptflow.data.errors import UserError
from gptflow.data.sources import SourceFile, detect_format

OBJECTIVES = ("sft", "classification")
"""What a model is fine-tuned for: following instructions, or labelling texts."""
OVERLONG_POLICIES = ("truncate", "skip")
FORMATS = ("jsonl", "json", "csv", "parquet")


class FinetuneDataError(UserError):
    """Fine-tuning data that leaves nothing to train on; the message names the file and the fix."""


def check_data_file(path: Path) -> SourceFile:
    """A fine-tuning or labelled data file as the reader takes it; ``FinetuneDataError`` if it is
    missing or not a record format."""
    path = Path(path)
    if not path.is_file():
        raise FinetuneDataError(f"Data file {path} does not exist.")
    detected = detect_format(path)
    if detected is None or detected[0] not in FORMATS:
        raise FinetuneDataError(f"Data file {path} must be .jsonl, .json, .csv (each optionally .gz or .zst) or "
                                ".parquet.")
    return SourceFile(path, *detected)
