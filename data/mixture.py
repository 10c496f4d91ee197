"""Data mixtures: a weight per ``--corpus`` source (``web/=0.7 code/=0.3``), so training draws its
windows from each source at its share of the weights instead of in proportion to its tokens.

The weight is a suffix of the ``--corpus`` value, never part of the source: sources are resolved,
ingested, tokenized and keyed without it, so every mixture of one corpus shares those stages and
only training differs. Validation draws from every source as before.

``WeightedCorpus.parse`` takes the weights off (all sources weighted or none, each a positive
finite number, each source once); ``data.sources.SourceResolution.named_by`` maps each file to
the value that named it, and ``mixture_parts`` groups the token manifest's train shards by it
into one ``MixturePart`` per source, its probability its weight's share of the total. The
pretrain stage keys each part's unit keys and probability (another mixture retrains, the same one
is cached) and trains through ``data.loader.MixedWindows`` over one ``TokenWindows`` per part. A
mixture always trains from scratch: a model kept or continued from an earlier run would not have
these weights. The weights are logged as given (MLflow params ``data.mixture.<source label>``);
they live where the sources are named, not in the settings, since the corpus is a flow parameter.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptflow.data.errors import UserError

if TYPE_CHECKING:  # the command line parses weights before it may import pyarrow
    from gptflow.data.tokenize import TokenManifest

WEIGHT_SEPARATOR = "="


class MixtureError(UserError):
    """A ``--corpus`` weight that cannot be used; the message names the source and the fix."""


def split_weight(value: str) -> tuple[str, str | None]:
    """``"web/=0.7"`` → ``("web/", "0.7")``; ``(value, None)`` when ``value`` has no weight suffix.

    Never raises: the weight text is checked by ``WeightedCorpus.parse``. A value that names an
    existing path is that path, and text after the last ``=`` holding a ``/`` is a path's, so
    Hive-style folders (``data/year=2024/*.parquet``) stay sources.
    """
    source, separator, weight = value.rpartition(WEIGHT_SEPARATOR)
    if not separator or not source or "/" in weight or os.sep in weight or os.path.lexists(value):
        return value, None
    return source, weight


@dataclass(frozen=True)
class WeightedCorpus:
    """The ``--corpus`` values, split into sources and their weights."""

    sources: list[str]
    """The values without their weights: what is resolved, ingested, tokenized and keyed."""
    weights: dict[str, float] = field(default_factory=dict)
    """Source → weight as given, in ``--corpus`` order; empty when no source has one (no mixture)."""

    @classmethod
    def parse(cls, values: Sequence[str]) -> WeightedCorpus:
        """Raises ``MixtureError`` for a weight that is not a positive finite number, a source given
        twice, or weights on some sources and not on others."""
        sources: list[str] = []
        weights: dict[str, float] = {}
        for value in values:
            source, weight_text = split_weight(value)
            if source in sources:
                raise MixtureError(f"--corpus {source} is given twice; give each source once"
                                   + (", with one weight." if weight_text is not None else "."))
            sources.append(source)
            if weight_text is not None:
                weights[source] = _parse_weight(source, weight_text)
        if weights and len(weights) < len(sources):
            unweighted = next(source for source in sources if source not in weights)
            weighted, weight = next(iter(weights.items()))
            raise MixtureError(
                f"--corpus {unweighted} has no weight while --corpus {weighted}{WEIGHT_SEPARATOR}{weight:g} has one: "
                f"give every --corpus a weight (e.g. {unweighted}{WEIGHT_SEPARATOR}1), or none."
            )
        return cls(sources, weights)


def _parse_weight(source: str, text: str) -> float:
    example = f"e.g. --corpus {source}{WEIGHT_SEPARATOR}0.3"
    try:
        weight = float(text)
    except ValueError:
        raise MixtureError(f"--corpus {source}{WEIGHT_SEPARATOR}{text}: the weight {text!r} is not a number; "
                           f"write SOURCE{WEIGHT_SEPARATOR}WEIGHT with a positive weight ({example}), or name "
                           "an existing path.") from None
    if not (math.isfinite(weight) and weight > 0):
        raise MixtureError(f"--corpus {source}{WEIGHT_SEPARATOR}{text}: a weight must be a positive finite number "
                           f"({example}); weights are relative shares and need not sum to 1.")
    return weight


@dataclass(frozen=True)
class MixturePart:
    """One source's training shards and the share of training windows drawn from them."""

    source: str
    probability: float
    train_paths: list[Path]

    def to_json(self) -> dict[str, Any]:
        """As a training job holds it, in plain JSON (``from_json`` reads it back)."""
        return {"source": self.source, "probability": self.probability,
                "train_paths": [str(path) for path in self.train_paths]}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> MixturePart:
        return cls(value["source"], value["probability"], [Path(path) for path in value["train_paths"]])


def mixture_parts(
    weights: Mapping[str, float], named_by: Mapping[str, str], tokens: TokenManifest, min_tokens: int
) -> list[MixturePart]:
    """A part per weighted source, in ``weights`` order, holding the train shards of its files
    (``named_by``: file path → source, as ``SourceResolution`` names them) and its weight's share of
    the total. Raises ``MixtureError`` naming a source with fewer than ``min_tokens`` train tokens
    (one window), which could not be drawn from."""
    paths: dict[str, list[Path]] = {source: [] for source in weights}
    n_tokens = dict.fromkeys(weights, 0)
    for unit in tokens.units:
        if unit.n_tokens["train"]:
            source = named_by[unit.source]
            paths[source].append(Path(unit.directory) / "train.arrow")
            n_tokens[source] += unit.n_tokens["train"]
    for source, count in n_tokens.items():
        if count < min_tokens:
            raise MixtureError(
                f"--corpus {source}{WEIGHT_SEPARATOR}{weights[source]:g}: {count:,} training tokens, fewer than one "
                f"training window (model.block_size + 1 = {min_tokens:,}): its files are too small, hold only val segments or duplicates "
                "of other sources, or an earlier --corpus names them. Add text to it, or leave it out of the mixture."
            )
    total = sum(weights.values())
    return [MixturePart(source, weight / total, paths[source]) for source, weight in weights.items()]
