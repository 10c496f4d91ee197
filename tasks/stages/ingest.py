"""Stage 1, ingest: source files → raw Arrow shards + corpus manifest, one unit per file."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_table_artifact

from gptflow.data.commits import CorruptArtifactError
from gptflow.data.config import IngestConfig
from gptflow.data.ingest import CorpusManifest, CorpusUnit, ingest_corpus, require_splits, source_name
from gptflow.data.language import language_model_version
from gptflow.data.near_dedup import datasketch_version
from gptflow.data.quality import SAMPLES_PER_UNIT, filters_run, quality_library_version, survival_summary
from gptflow.data.redact import REDACTION_KINDS
from gptflow.data.shards import SPLITS, UNIT_FILE
from gptflow.data.sources import SourceResolution
from gptflow.data.store import ArtifactStore
from gptflow.data.url_blocklist import load_url_blocklist
from gptflow.data.web import WEB_FORMATS, extractor_version
from gptflow.tasks.runtime.caching import (
    StageOutcome,
    record_unit_reuse,
    run_stage,
    stage_key,
    units_are_committed,
)
from gptflow.tasks.runtime.unit_maps import UnitRunner
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.tracking.progress import StageProgress, run_logger
from gptflow.tasks.tracking.run import PipelineRun

SAMPLES_PER_FILTER = 30
"""Dropped documents per quality filter in ``data/quality_samples.json``."""
SAMPLE_FILES_AT_ONCE = 64
"""Units whose files ``_dropped_samples`` reads side by side before it checks whether it has enough."""
TABLE_EXCERPT_CHARS = 150
"""A dropped document's excerpt in the Prefect table, short enough to read a row at a glance."""


@task(name="ingest-corpus")
def ingest_corpus_task(sources: SourceResolution, config: IngestConfig, store_dir: str, artifacts: ArtifactStore,
                       units: UnitRunner) -> CorpusManifest:
    # Which splits must be non-empty depends on the flow, not on the documents: checked outside the
    # cached task, so a manifest cached for one flow is still checked for the next.
    map_units = units.for_stage("ingest", artifacts,
                                label=lambda call: Path(source_name(str(call["source"].path), config)).name)
    # Its calls name a unit by its directory, raw/<key>, not by source file.
    map_signature_units = units.for_stage("near-dedup", artifacts, label=lambda call: Path(call["directory"]).name[:12])
    return ingest_corpus(sources, config, Path(store_dir), progress=StageProgress("ingest", "B"), required_splits=(),
                         map_units=map_units, map_signature_units=map_signature_units, artifacts=artifacts)


def ingested(sources: SourceResolution, config: IngestConfig, workspace: Workspace,
             units: UnitRunner) -> StageOutcome[CorpusManifest]:
    """The ingest stage's outcome for ``sources`` (computed, or found cached), logged nowhere."""
    # Size and mtime stand in for content here: a touched file re-runs the stage, whose per-file
    # units are then found by content hash and reused.
    inputs = {"sources": sources.fingerprint_inputs()}
    if config.near_dedup_threshold is not None:
        # Its hashing decides which segments are near duplicates. Unset, it stays out of the key:
        # a run without the setting needs no datasketch.
        inputs["datasketch"] = datasketch_version()
    if config.languages is not None:
        inputs["language_model"] = language_model_version()  # its model decides what is kept
    if config.quality != "none":
        inputs["quality_library"] = quality_library_version()  # its filters decide what is kept
    if (blocklist := load_url_blocklist(config.url_blocklist)) is not None:
        inputs["url_blocklist"] = blocklist.digest  # its domains, not its path, decide what is kept
    if any(source.format in WEB_FORMATS for source in sources.files):
        inputs["extractor"] = extractor_version()  # it decides the text of every page
    key = stage_key("ingest", config=config, modules=(__name__,), inputs=inputs)
    return run_stage(ingest_corpus_task, key=key, workspace=workspace, is_valid=units_are_committed,
                     sources=sources, config=config, store_dir=str(workspace.store), artifacts=workspace.artifacts,
                     units=units)


def ingest(
    sources: SourceResolution,
    config: IngestConfig,
    workspace: Workspace,
    run: PipelineRun,
    units: UnitRunner,
    required_splits: Collection[str] = SPLITS,
) -> CorpusManifest:
    """Ingest (or find cached) ``sources``, its per-file units run by ``units``, logged to ``run``;
    a ``CorpusError`` if a split in ``required_splits`` is empty."""
    outcome = ingested(sources, config, workspace, units)
    manifest = outcome.result
    record_unit_reuse(run, "ingest", "ingested", outcome)
    # Counts, not measurements over time: params, so the run's charts start with its loss curves.
    run.log_params({
        "dataset.documents": manifest.total_documents,
        "dataset.segments": sum(manifest.totals["segments"].values()),
        "dataset.source_files": len(manifest.units),
        "dataset.skipped": manifest.skips.total,
    })
    run.log_artifact(Path(manifest.path), "data")
    if config.near_dedup_threshold is not None:
        _log_near_duplicates(run, manifest)
    if config.redact_pii:
        _log_redactions(run, manifest)
    if config.languages is not None:
        _log_languages(run, manifest, config)
    if filters_run(config):
        _log_quality(run, manifest, config, workspace.artifacts)
    if manifest.skips.total:
        run_logger().warning(manifest.skips.summary())
    require_splits(manifest, required_splits, config)
    return manifest


def _log_near_duplicates(run: PipelineRun, manifest: CorpusManifest) -> None:
    """The total as a param, and the count per source file as ``data/near_duplicates.json``: a
    corpus can have thousands of files, too many for params."""
    total = manifest.totals["near_duplicates"]
    run.log_params({"dataset.near_duplicates": total})
    by_source = {unit.source: unit.near_duplicates for unit in manifest.units}
    run.log_text(json.dumps({"total": total, "by_source": by_source}, indent=2), "data/near_duplicates.json")


def _log_redactions(run: PipelineRun, manifest: CorpusManifest) -> None:
    """``dataset.redacted.<kind>`` for every kind (0 too: a clean corpus says so), and the counts
    per source file as ``data/redactions.json``."""
    totals = manifest.totals["redactions"]
    run.log_params({f"dataset.redacted.{kind}": totals.get(kind, 0) for kind in REDACTION_KINDS})
    by_source = {unit.source: unit.redactions for unit in manifest.units if unit.redactions}
    run.log_text(json.dumps({"total": totals, "by_source": by_source}, indent=2), "data/redactions.json")
    if totals:
        run_logger().info("ingest: redacted " + ", ".join(f"{count:,} {kind}" for kind, count in sorted(totals.items()))
                          + f" in {len(by_source):,} files")


def _log_languages(run: PipelineRun, manifest: CorpusManifest, config: IngestConfig) -> None:
    """``dataset.language_kept.<language>`` and ``dataset.language_dropped.<language>`` per
    identified language, and the counts per source file as ``data/languages.json``."""
    kept, dropped = manifest.totals["languages"], manifest.totals["language_drops"]
    run.log_params({"dataset.language_dropped": sum(dropped.values()),
                    **{f"dataset.language_kept.{language}": count for language, count in kept.items()},
                    **{f"dataset.language_dropped.{language}": count for language, count in dropped.items()}})
    by_source = {unit.source: {"kept": unit.languages, "dropped": unit.language_drops} for unit in manifest.units}
    run.log_text(json.dumps({"kept": kept, "dropped": dropped, "by_source": by_source}, indent=2),
                 "data/languages.json")
    if dropped:
        run_logger().info(f"ingest: data.languages={config.languages} dropped {sum(dropped.values()):,} documents ("
                          + ", ".join(f"{language} {count:,}" for language, count in
                                      sorted(dropped.items(), key=lambda item: -item[1]))
                          + f") below data.language_threshold={config.language_threshold} or in other languages")


def _log_quality(run: PipelineRun, manifest: CorpusManifest, config: IngestConfig, artifacts: ArtifactStore) -> None:
    """``dataset.quality_dropped.<filter>`` (documents) and ``dataset.quality_dropped_bytes.<filter>``
    for every filter run (0 too), the counts per rule and per source file as ``data/quality.json``,
    the samples of dropped documents as ``data/quality_samples.json`` and as a Prefect table, and
    how many documents survived each filter as a line."""
    totals = manifest.totals["quality"]
    filters = filters_run(config)
    run.log_params({"dataset.quality_judged": totals["judged"],
                    **{f"dataset.quality_dropped.{name}": totals["dropped"].get(name, 0) for name in filters},
                    **{f"dataset.quality_dropped_bytes.{name}": totals["dropped_bytes"].get(name, 0)
                       for name in filters}})
    by_source = {unit.source: unit.quality for unit in manifest.units if unit.quality}
    run.log_text(json.dumps({**totals, "by_source": by_source}, indent=2), "data/quality.json")
    samples = _dropped_samples(manifest, artifacts)
    run.log_text(json.dumps(samples, indent=2), "data/quality_samples.json")
    survival = survival_summary(config, totals)
    create_table_artifact(key="quality-dropped-samples", table=_samples_table(samples, filters),
                          description=f"Documents dropped, up to {SAMPLES_PER_UNIT} per file and {SAMPLES_PER_FILTER} "
                                      f"per filter: {survival}")
    run_logger().info("ingest: " + survival)


def _dropped_samples(manifest: CorpusManifest, artifacts: ArtifactStore) -> dict[str, list[dict[str, Any]]]:
    """Per filter, up to ``SAMPLES_PER_FILTER`` documents it dropped (source, rule, bytes, excerpt, URL),
    from the units' files in source order (read from ``artifacts`` a few at a time, without the
    units' shards, until every filter has its samples): a user reads what a threshold throws away."""
    samples: dict[str, list[dict[str, Any]]] = {}

    def wanted(unit: CorpusUnit) -> bool:
        return any(len(samples.get(name, [])) < SAMPLES_PER_FILTER for name in unit.quality.get("dropped", {}))

    for first in range(0, len(manifest.units), SAMPLE_FILES_AT_ONCE):
        units = [unit for unit in manifest.units[first : first + SAMPLE_FILES_AT_ONCE] if wanted(unit)]
        for unit, found in zip(units, artifacts.read_files(Path(unit.directory) / UNIT_FILE for unit in units)):
            if found is None:
                raise CorruptArtifactError(
                    f"{Path(unit.directory) / UNIT_FILE} is not in the store: the unit was altered or removed after it "
                    "was committed. Run the command again: ingest computes it again.")
            for name, documents in json.loads(found).get("quality_samples", {}).items():
                kept = samples.setdefault(name, [])
                kept.extend({"source": unit.source, **document}
                            for document in documents[:SAMPLES_PER_FILTER - len(kept)])
    return samples


def _samples_table(samples: dict[str, list[dict[str, Any]]], filters: tuple[str, ...]) -> list[dict[str, Any]]:
    """``_dropped_samples`` as the rows of a Prefect table, one per dropped document, in the order of
    ``filters``, excerpts cut to ``TABLE_EXCERPT_CHARS`` on one line."""
    return [{"filter": name, "rule": document["rule"], "bytes": document["bytes"], "source": document["source"],
             "url": document.get("url") or "",  # units written before URLs were sampled have none
             "excerpt": " ".join(document["excerpt"][:TABLE_EXCERPT_CHARS].split())}
            for name in filters for document in samples.get(name, [])]
