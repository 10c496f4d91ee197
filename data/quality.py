"""Quality filters of prose, as Gopher, C4 and FineWeb published them (``data.quality``), run by
datatrove's own implementations with spaCy's blank English tokenizer: offline, nothing downloaded.

Why datatrove's and not gptflow's own: Gopher's filters and FineWeb's list-ratio rule count words as
spaCy's tokenizer splits them (``don't`` is two words, ``well-known`` three), so a reimplementation
agrees near the thresholds only by reproducing that tokenizer, and spaCy's word split is what
limits the speed anyway. Measured (``bench/quality_filters.py``, bench/RESULTS.md) on Python's HTML
documentation, one core: ``fineweb`` 0.33 MB/s, ``gopher`` 0.38, ``c4`` 0.57; the filters run
inside the per-file ingest units, so ``--ray`` spreads them over the cluster's cores.

A preset names the filters and their order (``FILTERS_BY_PRESET``); each filter has datatrove's
default thresholds, except FineWeb's three, which are settings (``data.quality_line_punct``,
``data.quality_char_duplicates``, ``data.quality_short_lines``), and C4's rule that drops every
line without terminal punctuation, which FineWeb's pipeline turns off (FineWeb's own
``data.quality_line_punct`` judges that at document level instead). C4 drops lines as well as
documents: a kept document's text is what C4 kept of it. Code is never judged (``QualityFilters``
is built with ``applies=False`` for code files). A WARC file's URL blocklist
(``data.url_blocklist``) is counted here as the first filter, ``url_blocklist``, so its drops read
like the others'.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from gptflow.data.config import IngestConfig
from gptflow.data.errors import UserError
from gptflow.data.language import language_drops_summary
from gptflow.data.url_blocklist import LISTED_DOMAIN, URL_BLOCKLIST, UrlBlocklist

INSTALL_HINT = "pip install 'gptflow[quality]'"
GOPHER_REPETITION = "gopher_repetition"
GOPHER_QUALITY = "gopher_quality"
C4 = "c4"
FINEWEB = "fineweb"
FILTERS_BY_PRESET: dict[str, tuple[str, ...]] = {
    "none": (),
    "gopher": (GOPHER_REPETITION, GOPHER_QUALITY),
    "c4": (C4,),
    "fineweb": (GOPHER_REPETITION, GOPHER_QUALITY, C4, FINEWEB),
}
"""``data.quality`` → the filters it runs, in order (each document stops at the first that drops it)."""
SAMPLES_PER_UNIT = 10
"""Documents a unit keeps per filter, of those the filter dropped, for the run's sample: a corpus of
one large WARC file is one unit, and a user judging a threshold needs more than a handful."""
EXCERPT_CHARS = 400


class QualityFiltersUnavailableError(UserError):
    """``data.quality`` is set but datatrove or spaCy is not installed."""


@functools.cache  # asked for every file's unit key
def quality_library_version() -> str:
    """datatrove's and spaCy's versions (their code decides what is kept, so they key the unit); a
    ``QualityFiltersUnavailableError`` naming the install when missing."""
    try:
        return f"datatrove {metadata.version('datatrove')}, spacy {metadata.version('spacy')}"
    except metadata.PackageNotFoundError:
        raise QualityFiltersUnavailableError(f"data.quality needs datatrove and spaCy: {INSTALL_HINT} "
                                             f"(or leave data.quality=none).") from None


def filters_run(config: IngestConfig) -> tuple[str, ...]:
    """The filters that ``config`` runs, in order: ``url_blocklist`` (on WARC pages), then the
    preset's; empty when neither is set."""
    return ((URL_BLOCKLIST,) if config.url_blocklist is not None else ()) + FILTERS_BY_PRESET[config.quality]


def filter_settings(config: IngestConfig) -> dict[str, dict[str, Any]]:
    """Each filter ``config.quality`` runs → the arguments its datatrove class is built with."""
    arguments = {
        GOPHER_REPETITION: {},
        GOPHER_QUALITY: {},
        # FineWeb's pipeline judges terminal punctuation per document (its own filter), not per line.
        C4: {} if config.quality == "c4" else {"filter_no_terminal_punct": False},
        FINEWEB: {"line_punct_thr": config.quality_line_punct, "char_duplicates_ratio": config.quality_char_duplicates,
                  "short_line_thr": config.quality_short_lines},
    }
    return {name: arguments[name] for name in FILTERS_BY_PRESET[config.quality]}


def quality_key_fields(config: IngestConfig, applies: bool) -> dict[str, Any]:
    """What the quality settings add to an ingest unit's key: nothing for ``none`` or a file they do
    not apply to (code), so neither is re-ingested when a threshold changes."""
    if config.quality == "none" or not applies:
        return {}
    return {"quality": filter_settings(config), "quality_library": quality_library_version()}


def datatrove_filter(name: str, arguments: dict[str, Any]) -> Any:
    """The datatrove filter ``name`` (``GOPHER_QUALITY``, ...) built with ``arguments``."""
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    classes = {GOPHER_REPETITION: GopherRepetitionFilter, GOPHER_QUALITY: GopherQualityFilter, C4: C4QualityFilter,
               FINEWEB: FineWebQualityFilter}
    return classes[name](**arguments)


@dataclass
class QualityVerdict:
    text: str | None
    """The document's text as kept (C4 drops lines), or None when a filter dropped it."""
    filter: str | None = None
    """The filter that dropped it (``GOPHER_QUALITY``, ...)."""
    reason: str | None = None
    """That filter's rule, as datatrove names it (``gopher_short_doc``, ``line_punct_ratio``, ...)."""


class QualityFilters:
    """Runs ``data.quality``'s filters on each document, and ``blocklist`` (a WARC file's) on its
    URL, counting documents judged and, per filter, the documents and UTF-8 bytes it dropped; with
    ``applies=False`` (code) it keeps everything."""

    def __init__(self, config: IngestConfig, applies: bool = True, blocklist: UrlBlocklist | None = None) -> None:
        settings = filter_settings(config) if applies else {}
        self.filters = [(name, datatrove_filter(name, arguments)) for name, arguments in settings.items()]
        self.blocklist = blocklist if applies else None
        self.judged = 0
        self.dropped: Counter[str] = Counter()
        self.dropped_bytes: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        """Documents dropped per ``filter/reason``."""
        self.samples: dict[str, list[dict[str, Any]]] = {}
        """Per filter, the first ``SAMPLES_PER_UNIT`` documents it dropped: rule, bytes, excerpt, URL."""

    def blocks(self, text: str, url: str | None) -> bool:
        """Whether the blocklist drops the page at ``url`` (counted as judged and dropped): asked
        before anything else is done with a document."""
        if self.blocklist is None or not self.blocklist.blocks(url):
            return False
        self.judged += 1
        self._drop(URL_BLOCKLIST, LISTED_DOMAIN, text, url)
        return True

    def judge(self, text: str, url: str | None = None) -> QualityVerdict:
        """The document after every filter, or the first filter that dropped it and why; counted
        (with the pages ``blocks`` let through when there is a blocklist)."""
        if self.filters or self.blocklist is not None:
            self.judged += 1
        if not self.filters:  # a blocklist alone needs no quality library
            return QualityVerdict(text)
        from datatrove.data import Document

        document = Document(text=text, id="")
        for name, datatrove_filter in self.filters:
            outcome = datatrove_filter.filter(document)
            kept, reason = outcome if isinstance(outcome, tuple) else (outcome, None)
            if not kept:
                self._drop(name, reason, text, url)
                return QualityVerdict(None, name, reason)
        return QualityVerdict(document.text)

    def _drop(self, name: str, reason: str | None, text: str, url: str | None) -> None:
        size = len(text.encode())
        self.dropped[name] += 1
        self.dropped_bytes[name] += size
        self.reasons[f"{name}/{reason or 'dropped'}"] += 1
        samples = self.samples.setdefault(name, [])
        if len(samples) < SAMPLES_PER_UNIT:
            samples.append({"rule": reason, "bytes": size, "excerpt": text[:EXCERPT_CHARS], "url": url})

    def counts(self) -> dict[str, Any]:
        """What a unit records of the filters: documents ``judged``; per filter, the documents
        (``dropped``) and UTF-8 bytes (``dropped_bytes``) it dropped; documents per ``filter/rule``."""
        return {"judged": self.judged, "dropped": dict(self.dropped), "dropped_bytes": dict(self.dropped_bytes),
                "rules": dict(self.reasons)} if self.judged else {}


def add_quality_counts(counts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The sum of several units' ``QualityFilters.counts``."""
    judged, totals = 0, {"dropped": Counter(), "dropped_bytes": Counter(), "rules": Counter()}
    for unit in counts:
        judged += unit.get("judged", 0)
        for name, total in totals.items():
            total.update(unit.get(name, {}))
    return {"judged": judged, **{name: dict(total) for name, total in totals.items()}}


def survival_summary(config: IngestConfig, totals: dict[str, Any]) -> str:
    """``data.quality=fineweb kept 219 of 1,497 prose documents judged: gopher_repetition 969 (65%) →
    ...``: how many documents survived each filter, in order (``totals``: ``add_quality_counts``);
    ``data.url_blocklist=blocked.txt, data.quality=...`` and ``url_blocklist`` first with a blocklist."""
    judged = left = totals["judged"]
    steps = []
    for name in filters_run(config):
        left -= totals["dropped"].get(name, 0)
        steps.append(f"{name} {left:,} ({left / judged:.0%})" if judged else f"{name} 0")
    settings = ([f"data.url_blocklist={config.url_blocklist}"] if config.url_blocklist is not None else []) + (
        [f"data.quality={config.quality}"] if config.quality != "none" else [])
    return f"{', '.join(settings)} kept {left:,} of {judged:,} prose documents judged: " + " → ".join(steps)


def filter_drops_summary(totals: dict[str, Any], config: IngestConfig) -> str:
    """What ``data.languages``, ``data.url_blocklist`` and ``data.quality`` dropped (``totals``: a
    manifest's), for the line saying that no document is left."""
    return language_drops_summary(totals["language_drops"], config) + (
        "; " + survival_summary(config, totals["quality"]) if filters_run(config) else "")
