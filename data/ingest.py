"""Stage 1, ingest: source files → raw Arrow shards, one cached unit per file, + a corpus manifest.

Each source file becomes a unit directory ``raw/<key>/`` (``docs-*.arrow`` + ``unit.json``) whose
key covers the file's content hash, the settings that change its segments and this code, not its
path: a rerun over a grown corpus reuses every unchanged file's unit. A document longer than
``segment_chars`` is cut into segments at line ends, and each segment goes to train or val by its
own hash, so adding files, or text at the end of a file, never moves an old segment between splits.

Exact duplicate segments are dropped within a file while ingesting, and across files when the
manifest is built: a segment already seen in an earlier unit (by sorted source path) goes on that
unit's ``drop_doc_hashes`` list, which tokenize honours (hashes partitioned by value, so memory is
bounded whatever the corpus's size). Units stay independent of each other that
way, so one new file never invalidates the others. With ``data.near_dedup_threshold`` set, near
duplicates of kept segments then join the drop lists too (``near_dedup``).

A unit's key (``_unit_key``) holds the code version of this module (with the reader, shards,
sources and errors it imports), the file's content hash, format, compression, ``text_field``
(structured formats only), ``val_fraction``, ``segment_chars``, ``min_chars``,
``redact_pii``, ``languages`` (with its threshold and model, when set), ``quality`` (its filters'
thresholds and library, when set), for a WARC file ``url_blocklist``'s domains (when set) and, for
a web file, the extractor's version; a code file's key
has neither language nor quality settings, which never judge code (``SourceFile.is_code``). Not
the file's path (a moved file keeps its unit), nor ``shard_bytes`` (layout only) nor
``near_dedup_threshold`` (drop lists only). ``unit.json`` carries a ``CorpusUnit``'s counts:
documents read (each once), documents cut and the segments they became, segments and bytes per
split, duplicates dropped within the file, redactions, documents kept and dropped per language,
documents judged and dropped (and their bytes) per quality filter, skips. A web file's documents
come from its extraction unit (``data.web``), which no setting here invalidates. Which files' hashes are
known without reading them is remembered in ``file-hashes.json`` (``FILE_HASH_CACHE``, by
``data.sources.source_stamp``), so a rerun hashes only new or changed files. With ``redact_pii``,
what is written names a source as ``source_name`` does, its names' personal data redacted, and a
file whose path carries some is left out of ``file-hashes.json``. A local file whose read fails
(EIO: a failing disk, a stale mount) is a counted skip without a unit, read again next run.

Segments (``cut_into_segments``): a document longer than ``data.segment_chars`` (default 4,096)
is cut greedily from its start, each segment ending after the last non-space character of the
first line that reaches that size and is followed by more text, so the pre-tokenizer ends a
token at every cut and segments encoded apart give the whole document's tokens. Each segment's
split is ``data.hashing.split_by_hash`` of its hash, so a corpus of one large file (a book, a
log) has a val split: a 300 KB file has about 70 segments, and an empty val at ``val_fraction``
0.05 has odds of 0.95^70, about 3%. An empty split that a flow needs is a ``CorpusError`` from
``require_splits``, naming the fixes.

The ``CorpusManifest`` lists the units in source-path order, each with its ``drop_doc_hashes``
(sorted) and its counts net of them; its fingerprint hashes every unit's key and drop list, so
it names exactly the segments tokenize sees. What does not scale yet: the manifest is assembled
in the stage's process, and cross-file dedup reads every unit's hash column once per partition
of ``data.exact_dedup.DEDUP_PARTITION_SEGMENTS`` hashes (for 10^10 segments, about 40,000 passes): to be moved
onto the cluster by partition.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptflow.data.code_version import code_version
from gptflow.data.commits import write_json_atomic
from gptflow.data.config import IngestConfig
from gptflow.data.content_hashes import ContentHashes, hash_source_file
from gptflow.data.errors import CorpusError, SkipReport
from gptflow.data.exact_dedup import drop_cross_file_duplicates
from gptflow.data.hashing import hash_bytes, hash_json, split_by_hash
from gptflow.data.language import LanguageFilter, language_key_fields, language_model_version
from gptflow.data.near_dedup import datasketch_version, drop_near_duplicates
from gptflow.data.quality import (
    QualityFilters,
    add_quality_counts,
    filter_drops_summary,
    quality_key_fields,
    quality_library_version,
)
from gptflow.data.readers import SourceReadError, read_documents
from gptflow.data.redact import redact, redact_path
from gptflow.data.shards import SPLITS, RawShardWriter, read_unit_file, write_unit_file
from gptflow.data.sources import (
    HUB_FORMAT,
    SKIP_READ_ERROR,
    SourceFile,
    SourceResolution,
    source_stamp,
)
from gptflow.data.store import LOCAL_STORE, ArtifactStore, store_references
from gptflow.data.units import MapUnits, Progress, in_this_process
from gptflow.data.url_blocklist import UrlBlocklist, blocklist_for, blocklist_key_fields, load_url_blocklist
from gptflow.data.web import WEB_FORMATS, extractor_version, web_documents

FILE_HASH_CACHE = "file-hashes.json"


# Where a segment may end: after a line's last non-space character, when more text follows. The
# tokenizer's pre-tokenizer always ends a token there (what follows is whitespace) and splits the
# rest the same way whatever came before, so a document's segments encode to exactly the tokens
# of the whole, and tokenize can join consecutive segments without re-encoding them. Cutting after
# the newline instead would not do: "\n\n" or "\n    " is one token of the whole text. Python's
# \S matches only what the tokenizer too takes for non-space, and the spaces after it are ASCII.
_SEGMENT_END = re.compile(r"\S(?=[ \t]*\n\s*\S)")


@dataclass
class CorpusUnit:
    """One source file's documents in the store."""

    source: str
    content_hash: str
    key: str
    directory: str
    documents: int
    """Documents read from the file and kept by ``data.languages``, each counted once however many
    segments it became."""
    cut_documents: int
    """Documents longer than ``segment_chars``, cut into several segments."""
    cut_segments: int
    """The segments those documents were cut into."""
    segments: dict[str, int]
    """Segments per split that tokenize will read: written minus ``drop_doc_hashes``."""
    bytes: dict[str, int]
    """UTF-8 bytes of those segments, per split."""
    drop_doc_hashes: list[str]
    """Segments of this unit that an earlier unit already holds, and its near duplicates."""
    duplicates: int
    """Exact duplicate segments dropped: within the file at ingest, plus those an earlier unit holds."""
    reused: bool
    near_duplicates: int = 0
    """Segments dropped as near duplicates of earlier kept ones (``data.near_dedup_threshold``)."""
    redactions: dict[str, int] = field(default_factory=dict)
    """Replacements per kind of personal data or secret (``data.redact_pii``), kinds found only."""
    languages: dict[str, int] = field(default_factory=dict)
    language_drops: dict[str, int] = field(default_factory=dict)
    """Documents kept (``languages``) and dropped per identified language, ``data.languages`` set."""
    quality: dict[str, Any] = field(default_factory=dict)
    """What ``data.quality``'s filters judged and dropped (``data.quality.QualityFilters.counts``)."""
    text_hash: str = ""
    """Hash of the segments written, in order, with their splits: the text that tokenize reads."""


@dataclass
class CorpusManifest:
    units: list[CorpusUnit]
    skips: SkipReport
    fingerprint: str
    """Hash of every unit's key and drop list: names exactly the segments tokenize will see."""
    path: str = ""
    """Where the manifest was written (``manifests/corpus-<fingerprint>.json``)."""

    @property
    def total_documents(self) -> int:
        return sum(unit.documents for unit in self.units)

    @property
    def totals(self) -> dict[str, Any]:
        return {
            "documents": self.total_documents,
            "cut_documents": sum(unit.cut_documents for unit in self.units),
            "cut_segments": sum(unit.cut_segments for unit in self.units),
            "segments": {split: sum(unit.segments[split] for unit in self.units) for split in SPLITS},
            "bytes": {split: sum(unit.bytes[split] for unit in self.units) for split in SPLITS},
            "duplicates": sum(unit.duplicates for unit in self.units),
            "near_duplicates": sum(unit.near_duplicates for unit in self.units),
            "redactions": dict(sum((Counter(unit.redactions) for unit in self.units), Counter())),
            "languages": dict(sum((Counter(unit.languages) for unit in self.units), Counter())),
            "language_drops": dict(sum((Counter(unit.language_drops) for unit in self.units), Counter())),
            "quality": add_quality_counts(unit.quality for unit in self.units),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "units": [dict(vars(unit)) for unit in self.units],  # asdict: a slow deep copy
            "skips": self.skips.to_dict(),
            "fingerprint": self.fingerprint,
            "path": self.path,
            "totals": self.totals,
        }

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> CorpusManifest:
        return cls(
            units=[CorpusUnit(**unit) for unit in value["units"]],
            skips=SkipReport.from_dict(value["skips"]),
            fingerprint=value["fingerprint"],
            path=value["path"],
        )


def cut_into_segments(text: str, segment_chars: int) -> Iterator[str]:
    """``text`` in pieces of at least ``segment_chars`` (the last may be shorter), each ending at
    the first line end at or after that size where the text goes on (see ``_SEGMENT_END``).

    Cut greedily from the start, so text appended to a document leaves all its segments but the
    last unchanged. A text with no line end past ``segment_chars`` stays whole.
    """
    start = 0
    while end := _SEGMENT_END.search(text, start + segment_chars - 1):
        yield text[start : end.end()]
        start = end.end()
    yield text[start:]


def ingest_corpus(
    sources: SourceResolution | Sequence[SourceFile],
    config: IngestConfig,
    store_dir: Path,
    progress: Progress | None = None,
    required_splits: Collection[str] = SPLITS,
    map_units: MapUnits = in_this_process,
    map_signature_units: MapUnits = in_this_process,
    artifacts: ArtifactStore = LOCAL_STORE,
) -> CorpusManifest:
    """Ingest every source into ``store_dir/raw/`` (checked and committed through ``artifacts``),
    one unit per file (``ingest_unit``); the units
    to compute run through ``map_units``, those already in the store under a known content hash
    are read here. ``progress(done, total)`` counts source bytes. With
    ``config.near_dedup_threshold`` set, each unit's MinHash signatures are computed through
    ``map_signature_units`` (``near_dedup.segment_signatures``).

    ``sources`` is a ``SourceResolution`` (its skipped files join the manifest's report) or a
    plain list of files. Raises ``CorpusError`` when no document survives, or a split in
    ``required_splits`` is empty (see ``require_splits``).
    """
    if config.near_dedup_threshold is not None:
        datasketch_version()  # missing: said now, not after ingesting every file
    if config.languages is not None:
        language_model_version()
    if config.quality != "none":
        quality_library_version()
    blocklist = load_url_blocklist(config.url_blocklist)  # read here once: its domains travel with each call
    skips = SkipReport()
    if isinstance(sources, SourceResolution):
        skips.merge(sources.skipped.renamed(lambda location: source_name(location, config)))
        sources = sources.files
    files = sorted(sources, key=lambda source: str(source.path))
    if any(source.format in WEB_FORMATS for source in files):
        extractor_version()
    content_hashes = ContentHashes(store_dir / FILE_HASH_CACHE)
    code = code_version(__name__)
    calls = [{"source": source, "known_hash": content_hashes.known(source), "config": config, "store_dir": store_dir,
              "artifacts": artifacts, "code": code, "blocklist": blocklist_for(blocklist, source.format)}
             for source in files]
    # A unit whose file's content hash is known without reading it is looked up here: reading it
    # back is cheaper than shipping the call anywhere.
    known = [call for call in calls if call["known_hash"] is not None]
    complete = artifacts.are_complete(map(_known_unit_directory, known))
    stored = {id(call) for call, is_stored in zip(known, complete) if is_stored}
    pending = [call for call in calls if id(call) not in stored]
    computed = iter(map_units(ingest_unit, pending))  # in the calls' order, as they come
    pending_ids = {id(call) for call in pending}
    total_bytes = sum(_source_bytes(source) for source in files)
    done_bytes = 0
    units: list[CorpusUnit] = []
    for call in calls:
        unit, unit_skips = next(computed) if id(call) in pending_ids else ingest_unit(**call, found_in_store=True)
        skips.merge(unit_skips)
        if unit is not None:
            if unit.source == str(call["source"].path):  # a path that carries personal data is written nowhere
                content_hashes.remember(call["source"], unit.content_hash)
            units.append(unit)
        done_bytes += _source_bytes(call["source"])
        if progress:
            progress(done_bytes, total_bytes)
    content_hashes.save()
    drop_cross_file_duplicates(units)
    if config.near_dedup_threshold is not None:
        drop_near_duplicates(units, config.near_dedup_threshold, map_signature_units)

    manifest = CorpusManifest(
        units=units,
        skips=skips,
        fingerprint=hash_json([[unit.key, unit.drop_doc_hashes] for unit in units]),
    )
    if manifest.total_documents == 0:
        raise CorpusError(
            f"The corpus has no usable documents ({len(files)} source files; {skips.summary()}"
            f"{filter_drops_summary(manifest.totals, config)}). Fix or replace the files listed, or point --corpus at "
            f"other data."
        )
    require_splits(manifest, required_splits, config)
    manifest.path = str(store_dir / "manifests" / f"corpus-{manifest.fingerprint}.json")
    write_json_atomic(Path(manifest.path), store_references(manifest.to_dict(), store_dir))
    artifacts.share(Path(manifest.path))
    return manifest


def _known_unit_directory(call: dict[str, Any]) -> Path:
    """Where the unit of a call whose file's content hash is known lies in the store."""
    return call["store_dir"] / "raw" / _unit_key(call["source"], call["known_hash"], call["config"], call["code"],
                                                 call["blocklist"])


def ingest_unit(source: SourceFile, known_hash: str | None, config: IngestConfig, store_dir: Path,
                artifacts: ArtifactStore, code: str, found_in_store: bool = False,
                blocklist: UrlBlocklist | None = None) -> tuple[CorpusUnit | None, SkipReport]:
    """One source file's unit, reused when complete in the store, else written; with the file's
    skipped records. ``known_hash``: the file's content hash, if known without reading it;
    ``found_in_store``: the caller found the unit complete under it just now. A local file whose
    read fails in the system (an I/O error, while hashing or reading it) has no unit (None): it is
    skipped, counted, and read again next run."""
    name = source_name(str(source.path), config)
    try:
        content_hash = known_hash or hash_source_file(source)
        key = _unit_key(source, content_hash, config, code, blocklist)
        directory = store_dir / "raw" / key
        reused = found_in_store or artifacts.is_complete(directory)
        written = (read_unit_file(directory) if reused
                   else _ingest_unit(source, name, content_hash, config, directory, artifacts, blocklist))
    except SourceReadError as error:  # the unit's directory, if begun, is removed: nothing half-read is kept
        skips = SkipReport()
        skips.add(SKIP_READ_ERROR, f"{name} ({error.strerror})")
        return None, skips
    unit = CorpusUnit(
        source=name, content_hash=content_hash, key=key, directory=str(directory),
        documents=written["documents"], cut_documents=written["cut_documents"],
        cut_segments=written["cut_segments"], segments=written["segments"], bytes=written["bytes"],
        drop_doc_hashes=[], duplicates=written["duplicates"], reused=reused,
        redactions=written.get("redactions", {}), languages=written.get("languages", {}),
        language_drops=written.get("language_drops", {}), quality=written["quality"], text_hash=written["text_hash"],
    )
    return unit, SkipReport.from_dict(written["skips"]).relocated(written["source"], name)


def source_name(path: str, config: IngestConfig) -> str:
    """How everything gptflow writes or logs names the source file at ``path`` (or a location in
    it): as it is, or with the personal data in its names redacted under ``data.redact_pii``."""
    return redact_path(path) if config.redact_pii else path


def require_splits(manifest: CorpusManifest, splits: Collection[str], config: IngestConfig) -> None:
    """Raise ``CorpusError`` if a split in ``splits`` has no segments: training needs both, and
    evaluating a split needs that one; better to say so now than after training."""
    segments = manifest.totals["segments"]
    for split in splits:
        if segments[split] == 0:
            raise CorpusError(
                f"The corpus's {split} split is empty (documents: {manifest.total_documents}, segments: "
                f"{sum(segments.values())}; documents longer than data.segment_chars="
                f"{config.segment_chars} are cut at line ends, and each segment goes to val by its hash with "
                f"probability {config.val_fraction}). Add text, lower --set data.segment_chars=<chars>, or "
                f"change --set data.val_fraction=<fraction>."
            )


def _unit_key(source: SourceFile, content_hash: str, config: IngestConfig, code: str,
              blocklist: UrlBlocklist | None) -> str:
    # shard_bytes only changes how segments are laid out in files, not which, and
    # near_dedup_threshold only the drop lists given to units: left out, so changing them reuses
    # every unit.
    return hash_json({
        "stage": "ingest",
        "code": code,
        "content": content_hash,
        "format": source.format,
        "compression": source.compression,
        "text_field": None if source.format == "text" else config.text_field,
        "val_fraction": config.val_fraction,
        "segment_chars": config.segment_chars,
        "min_chars": config.min_chars,
        "redact_pii": config.redact_pii,
        **(language_key_fields(config) if not source.is_code else {"languages": None}),
        **quality_key_fields(config, applies=not source.is_code),
        **blocklist_key_fields(blocklist),
        "extractor": extractor_version() if source.format in WEB_FORMATS else None,
    })


def _ingest_unit(source: SourceFile, name: str, content_hash: str, config: IngestConfig, directory: Path,
                 artifacts: ArtifactStore, blocklist: UrlBlocklist | None) -> dict[str, Any]:
    skips = SkipReport()
    seen: set[str] = set()
    counts = {"documents": 0, "cut_documents": 0, "cut_segments": 0, "duplicates": 0}
    segments = dict.fromkeys(SPLITS, 0)
    text_bytes = dict.fromkeys(SPLITS, 0)
    redactions: Counter[str] = Counter()
    text_hash = hashlib.sha256()
    prose = not source.is_code  # code is judged by no prose heuristic
    languages = LanguageFilter(config)
    quality = QualityFilters(config, applies=prose, blocklist=blocklist)
    documents = (web_documents(source, name, content_hash, config.min_chars, directory.parent.parent, artifacts, skips)
                 if source.format in WEB_FORMATS else
                 ((text, None) for text in read_documents(source, config.text_field, skips, config.min_chars,
                                                          raise_read_errors=True)))
    with artifacts.commit(directory) as tmp:
        writer = RawShardWriter(tmp, config.shard_bytes)
        for text, url in documents:
            if quality.blocks(text, url):  # first: a blocked page costs no language identification
                continue
            language = languages.identify(text) if prose else None  # before redaction: placeholders are no language
            if not languages.keeps(language) or (text := quality.judge(text, url).text) is None:
                continue
            if config.redact_pii:  # before hashing: dedup and the split see the text as it is trained on
                text, found = redact(text)
                redactions.update(found)
            n_segments = 0
            continues = False
            for segment in cut_into_segments(text, config.segment_chars):
                n_segments += 1
                data = segment.encode()
                doc_hash = hash_bytes(data)
                # Duplicates are found per segment, the unit that splits, drop lists and the
                # tokenizer's sample name by hash: a segment repeated inside a long log is dropped
                # like a repeated document (an exact repeat of kilobytes teaches nothing new), and
                # a grown copy of another file adds only its new segments. The segment after a
                # dropped one starts a new stretch of text.
                if doc_hash in seen:
                    counts["duplicates"] += 1
                    continues = False
                    continue
                seen.add(doc_hash)
                split = split_by_hash(doc_hash, config.val_fraction)
                writer.write(segment, doc_hash, split, continues, len(data), url, language)
                text_hash.update(f"{doc_hash} {split} {continues}\n".encode())
                continues = True
                segments[split] += 1
                text_bytes[split] += len(data)
            counts["documents"] += 1
            if n_segments > 1:
                counts["cut_documents"] += 1
                counts["cut_segments"] += n_segments
        written = {
            "source": name,
            "content_hash": content_hash,
            "shards": writer.close(),
            **counts,
            "segments": segments,
            "bytes": text_bytes,
            "skips": skips.relocated(str(source.path), name).to_dict(),
            "redactions": dict(redactions),
            "languages": dict(languages.kept),
            "language_drops": dict(languages.dropped),
            "quality": quality.counts(), "quality_samples": quality.samples,  # samples: unit.json only
            "text_hash": text_hash.hexdigest(),
        }
        write_unit_file(tmp, written)
    return written


def _source_bytes(source: SourceFile) -> int:
    return 0 if source.format == HUB_FORMAT else source_stamp(source)["size"]
