"""Typed configuration of the data stages: ingestion, tokenizer training, tokenization."""

from __future__ import annotations

import re
from dataclasses import dataclass

_LANGUAGE_CODE = re.compile(r"[A-Za-z]{2,3}")
QUALITY_PRESETS = ("none", "gopher", "c4", "fineweb")
"""The values of ``data.quality``; which filters each runs, in order: ``data.quality.FILTERS_BY_PRESET``."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class RecordsConfig:
    """How records are read and split, for every flow that reads them: a corpus's documents,
    fine-tuning examples, labelled files to score."""

    text_field: str = "text"
    """Field (JSONL, JSON, parquet) or column (CSV) holding a record's text."""
    label_field: str = "label"
    """Field or column holding a labelled record's label (classification); corpora have none."""
    val_fraction: float = 0.05
    """Share held out for validation, chosen by each segment's or record's content hash (stable as
    data grows); fine-tuning ignores it when a separate validation file is given."""

    def __post_init__(self) -> None:
        require(bool(self.text_field), "data.text_field must be a non-empty field name")
        require(bool(self.label_field), "data.label_field must be a non-empty field name")
        require(0.0 < self.val_fraction < 0.5, f"data.val_fraction must be in (0, 0.5), got {self.val_fraction}")


@dataclass
class IngestConfig(RecordsConfig):
    """How a corpus is read, split, cut and filtered into documents (the ingest stage)."""

    segment_chars: int = 4096
    """Documents longer than this are cut into segments of about this size at line ends, so that a
    corpus of one large file still has a val split."""
    min_chars: int = 1
    """Documents shorter than this (after stripping whitespace) are skipped and counted."""
    shard_bytes: int = 64 * 1024 * 1024
    """Approximate text bytes per raw Arrow shard; bounds memory when ingesting large files."""
    near_dedup_threshold: float | None = None
    """Jaccard similarity (of word 5-gram sets, estimated by MinHash) at or above which a segment
    is a near duplicate of an earlier one and dropped, e.g. 0.8; None: exact dedup only. Needs
    ``pip install 'gptflow[near-dedup]'``."""
    redact_pii: bool = False
    """Replace e-mail addresses, phone numbers, IP addresses, payment card numbers and secrets
    (API keys, private key blocks) in every document with ``<EMAIL>``, ``<PHONE>``, ... before
    anything else reads it (``data.redact``); part of each file's unit key."""
    languages: str | None = None
    """Comma-separated ISO 639 codes, e.g. ``en,fr``: keep only documents identified as one of them
    with a score of at least ``language_threshold`` (``data.language``); None keeps every language.
    Needs ``pip install 'gptflow[web]'``."""
    language_threshold: float = 0.65
    """The language model's lowest score (a probability) for a kept document; FineWeb's 0.65."""
    quality: str = "none"
    """Quality filters run on prose files' documents (``data.quality``): ``none``, ``gopher``
    (Gopher repetition, then Gopher quality), ``c4`` (C4's line and document filters) or ``fineweb``
    (FineWeb's order: Gopher repetition, Gopher quality, C4, FineWeb's own). Needs
    ``pip install 'gptflow[quality]'``."""
    quality_line_punct: float = 0.12
    """FineWeb: a document's share of lines ending in terminal punctuation must be at least this."""
    quality_char_duplicates: float = 0.01
    """FineWeb: the share of its characters in lines seen before in it must be at most this."""
    quality_short_lines: float = 0.67
    """FineWeb: its share of lines of at most 30 characters must be at most this."""
    url_blocklist: str | None = None
    """A text file of domains, one per line (``#`` comments): a WARC file's pages whose URL's host
    is one of them or under one are dropped before any other filter (``data.url_blocklist``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.segment_chars >= 256, f"data.segment_chars must be >= 256, got {self.segment_chars}")
        require(self.min_chars >= 1, f"data.min_chars must be >= 1, got {self.min_chars}")
        require(self.shard_bytes >= 1024, f"data.shard_bytes must be >= 1024, got {self.shard_bytes}")
        require(
            self.near_dedup_threshold is None or 0.0 < self.near_dedup_threshold <= 1.0,
            f"data.near_dedup_threshold must be a Jaccard similarity in (0, 1], e.g. 0.8, or none to keep "
            f"exact dedup only; got {self.near_dedup_threshold}",
        )
        codes = self.languages.split(",") if self.languages is not None else []
        require(all(_LANGUAGE_CODE.fullmatch(code.strip()) for code in codes),
                f"data.languages must be comma-separated ISO 639 codes such as en,fr (or none), got {self.languages!r}")
        require(0.0 <= self.language_threshold < 1.0,
                f"data.language_threshold must be a score in [0, 1), e.g. 0.65, got {self.language_threshold}")
        require(self.quality in QUALITY_PRESETS,
                f"data.quality must be one of {', '.join(QUALITY_PRESETS)}, got {self.quality!r}")
        for name in ("quality_line_punct", "quality_char_duplicates", "quality_short_lines"):
            share = getattr(self, name)
            require(0.0 <= share <= 1.0, f"data.{name} must be a share in [0, 1], got {share}")


@dataclass
class TokenizerConfig:
    vocab_size: int = 8192
    """Tokens in the trained byte-level BPE vocabulary, special tokens included."""
    sample_bytes: int = 8 * 1024 * 1024
    """Bound on the training-split text the tokenizer is trained on (a deterministic sample)."""
    min_frequency: int = 2
    """Pairs seen fewer times than this are not merged."""

    def __post_init__(self) -> None:
        require(
            512 <= self.vocab_size <= 1 << 20,
            f"tokenizer.vocab_size must be between 512 and 1048576, got {self.vocab_size}",
        )
        require(self.sample_bytes >= 1024, f"tokenizer.sample_bytes must be >= 1024, got {self.sample_bytes}")
        require(self.min_frequency >= 1, f"tokenizer.min_frequency must be >= 1, got {self.min_frequency}")


@dataclass
class TokenizeConfig:
    batch_bytes: int = 4 * 1024 * 1024
    """Text bytes encoded per tokenizer call: bounds memory, big enough to keep all threads busy."""
    workers: int = 0
    """Tokenizer threads (``RAYON_NUM_THREADS``); 0 uses every core."""

    def __post_init__(self) -> None:
        require(self.batch_bytes >= 1024, f"tokenize.batch_bytes must be >= 1024, got {self.batch_bytes}")
        require(self.workers >= 0, f"tokenize.workers must be >= 0, got {self.workers}")
