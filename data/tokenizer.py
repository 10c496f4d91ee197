"""Stage 2, tokenizer: a byte-level BPE trained on a bounded, deterministic sample of the train split.

Byte-level means every string encodes and decodes back to itself exactly, with no unknown token.
The sample is the train segments with the smallest hashes up to ``sample_bytes``: a
uniform draw over the whole corpus (not its first files), the same on every run, and never
touching the validation split.

The sample is drawn by per-file units run through the caller's ``MapUnits``: each file's
``sample_candidates`` (its smallest-hash train segments covering the budget, a superset of its
share of the corpus's choice), then ``segment_texts`` of the chosen ones; the BPE itself trains
in the stage's process. The result is ``tokenizers/<key>/``: ``tokenizer.json`` (byte-level, no
prefix space, so ``decode(encode(x)) == x``; ``<|endoftext|>`` is id 0 and ``<|pad|>`` id 1, and
decoding drops them unless ``skip_special_tokens=False``) and ``tokenizer_meta.json`` (the
settings, the corpus fingerprint, the sample's size). Key: the settings, this code, the corpus
fingerprint.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gptflow.data.code_version import code_version
from gptflow.data.commits import write_json_atomic
from gptflow.data.config import TokenizerConfig
from gptflow.data.hashing import hash_file, hash_json
from gptflow.data.ingest import CorpusManifest, CorpusUnit
from gptflow.data.shards import iter_raw_batches
from gptflow.data.store import LOCAL_STORE, ArtifactStore
from gptflow.data.units import MapUnits, Progress, in_this_process

EOT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOT_TOKEN, PAD_TOKEN)
"""Added first, so their ids are 0 and 1 in every gptflow tokenizer."""
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"



@dataclass
class TokenizerArtifact:
    path: str
    """The ``tokenizer.json`` file; when the tokenizer stage trained it, its directory holds
    ``tokenizer_meta.json`` too."""
    hash: str
    """Content hash of ``tokenizer.json``: part of every downstream cache key."""
    vocab_size: int
    """Ids in use, special tokens included (may fall short of the configured size on tiny corpora)."""
    eot_id: int
    pad_id: int
    reused: bool
    """Found in the store (or described from an existing file) rather than trained by this call."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> TokenizerArtifact:
        return cls(**value)


def train_tokenizer(manifest: CorpusManifest, config: TokenizerConfig, store_dir: Path,
                    progress: Progress | None = None, map_units: MapUnits = in_this_process,
                    artifacts: ArtifactStore = LOCAL_STORE) -> TokenizerArtifact:
    """Train (or reuse, when ``artifacts`` holds it) the tokenizer for ``manifest``, its sample
    drawn by per-file units run through ``map_units`` (``sample_candidates``, then
    ``segment_texts``); ``progress(done, total)`` counts sample bytes."""
    key = hash_json({
        "stage": "tokenizer",
        "code": code_version(__name__),
        "config": asdict(config),
        "corpus": manifest.fingerprint,
    })
    directory = store_dir / "tokenizers" / key
    reused = artifacts.is_complete(directory)
    if not reused:
        sample = _training_sample(manifest, config.sample_bytes, map_units, artifacts)
        tokenizer = _untrained_tokenizer()
        trainer = trainers.BpeTrainer(
            vocab_size=config.vocab_size,
            min_frequency=config.min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        with artifacts.commit(directory) as tmp:
            tokenizer.train_from_iterator(_reporting(sample, progress), trainer=trainer, length=len(sample))
            tokenizer.save(str(tmp / TOKENIZER_FILE))
            write_json_atomic(tmp / META_FILE, {
                "config": asdict(config),
                "corpus_fingerprint": manifest.fingerprint,
                "sample_segments": len(sample),
                "sample_bytes": sum(len(text.encode()) for text in sample),
            })
    return describe_tokenizer(directory / TOKENIZER_FILE, reused)


def load_tokenizer(artifact_or_path: TokenizerArtifact | Path | str) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` of an artifact, a ``tokenizer.json``, or its directory."""
    path = Path(artifact_or_path.path if isinstance(artifact_or_path, TokenizerArtifact) else artifact_or_path)
    return Tokenizer.from_file(str(path / TOKENIZER_FILE if path.is_dir() else path))


def add_special_tokens(tokenizer: Tokenizer) -> list[str]:
    """Give ``tokenizer`` (another project's, e.g. an imported checkpoint's) gptflow's special
    tokens it lacks, as special tokens after its own ids; returns the ones added."""
    missing = [token for token in SPECIAL_TOKENS if tokenizer.token_to_id(token) is None]
    tokenizer.add_special_tokens(missing)
    return missing


def _untrained_tokenizer() -> Tokenizer:
    # No prefix space: it would change the text, and decode(encode(x)) must give x back.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def describe_tokenizer(path: Path, reused: bool = True) -> TokenizerArtifact:
    """The artifact of an existing gptflow ``tokenizer.json`` (e.g. the one a trained model carries),
    so the stages that take a ``TokenizerArtifact`` can tokenize with it; nothing is trained."""
    tokenizer = load_tokenizer(path)
    eot_id, pad_id = (tokenizer.token_to_id(token) for token in SPECIAL_TOKENS)
    if eot_id is None or pad_id is None:
        raise ValueError(f"{path} is not a gptflow tokenizer: it lacks the special tokens {', '.join(SPECIAL_TOKENS)}.")
    return TokenizerArtifact(
        path=str(path), hash=hash_file(path), vocab_size=tokenizer.get_vocab_size(),
        eot_id=eot_id, pad_id=pad_id, reused=reused,
    )


def _training_sample(manifest: CorpusManifest, sample_bytes: int, map_units: MapUnits,
                     artifacts: ArtifactStore) -> list[str]:
    """The train segments with the smallest hashes, ``sample_bytes`` of them in all (the last one
    cut short), in hash order. Each unit offers its own smallest ones covering ``sample_bytes``
    (those hold every segment of the corpus's choice: a segment chosen overall is chosen within its
    file, where fewer bytes precede it); the smallest of the offers are chosen, and their texts
    read by the units that hold them. Memory scales with the sample, not the corpus."""
    calls = [{"unit": unit, "unit_index": index, "sample_bytes": sample_bytes, "artifacts": artifacts}
             for index, unit in enumerate(manifest.units)]
    chosen = _smallest_covering(
        (candidate for offered in map_units(sample_candidates, calls) for candidate in offered), sample_bytes)
    by_unit: dict[int, list[str]] = {}
    for doc_hash, _, unit_index in chosen:
        by_unit.setdefault(unit_index, []).append(doc_hash)
    texts: dict[str, str] = {}
    for found in map_units(segment_texts, [{"unit": manifest.units[index], "doc_hashes": sorted(hashes),
                                            "artifacts": artifacts} for index, hashes in sorted(by_unit.items())]):
        texts.update(found)
    sample = []
    remaining = sample_bytes
    for doc_hash in sorted(texts):
        data = texts[doc_hash].encode()
        sample.append(data[:remaining].decode(errors="ignore") if len(data) > remaining else texts[doc_hash])
        remaining -= min(len(data), remaining)
    return sample


def sample_candidates(unit: CorpusUnit, unit_index: int, sample_bytes: int,
                      artifacts: ArtifactStore) -> list[tuple[str, int, int]]:
    """``(doc_hash, bytes, unit_index)`` of the unit's kept train segments with the smallest hashes,
    as many as first reach ``sample_bytes``; the unit fetched from ``artifacts`` first."""
    artifacts.fetch_whole([Path(unit.directory)], "the tokenizer's sample")
    dropped = set(unit.drop_doc_hashes)

    def train_segments() -> Iterator[tuple[str, int, int]]:
        for batch in iter_raw_batches(Path(unit.directory), ["text", "doc_hash", "split"]):
            lengths = pc.binary_length(batch.column("text")).to_pylist()
            for doc_hash, split, n_bytes in zip(batch.column("doc_hash").to_pylist(),
                                                batch.column("split").to_pylist(), lengths):
                if split == "train" and doc_hash not in dropped:
                    yield doc_hash, n_bytes, unit_index

    return _smallest_covering(train_segments(), sample_bytes)


def segment_texts(unit: CorpusUnit, doc_hashes: list[str], artifacts: ArtifactStore) -> dict[str, str]:
    """doc_hash → text of the unit's segments among ``doc_hashes``; the unit fetched from ``artifacts`` first."""
    artifacts.fetch_whole([Path(unit.directory)], "the tokenizer's sample")
    wanted = set(doc_hashes)
    return {doc_hash: text
            for batch in iter_raw_batches(Path(unit.directory), ["text", "doc_hash"])
            for text, doc_hash in zip(batch.column("text").to_pylist(), batch.column("doc_hash").to_pylist())
            if doc_hash in wanted}


def _smallest_covering(segments: Iterable[tuple[str, int, int]], sample_bytes: int) -> list[tuple[str, int, int]]:
    """Of ``(doc_hash, bytes, unit_index)`` triples, those with the smallest hashes whose bytes first
    reach ``sample_bytes``. A heap keeps only those, so memory scales with the sample."""
    largest_first: list[tuple[int, str, int, int]] = []  # (-hash, doc_hash, bytes, unit index)
    held_bytes = 0
    for doc_hash, n_bytes, unit_index in segments:
        heapq.heappush(largest_first, (-int(doc_hash, 16), doc_hash, n_bytes, unit_index))
        held_bytes += n_bytes
        while held_bytes - largest_first[0][2] >= sample_bytes:
            held_bytes -= heapq.heappop(largest_first)[2]
    return [(doc_hash, n_bytes, unit_index) for _, doc_hash, n_bytes, unit_index in largest_first]


def _reporting(sample: list[str], progress: Progress | None) -> Iterator[str]:
    sizes = [len(text.encode()) for text in sample]
    total = sum(sizes)
    done = 0
    for text, size in zip(sample, sizes):
        yield text
        done += size
        if progress:
            progress(done, total)
