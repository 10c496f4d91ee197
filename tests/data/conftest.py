"""Fixtures for the data stages: corpora written as real files, a real ingested corpus and a real
(small-vocabulary) tokenizer shared by the whole session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gptflow.data.config import IngestConfig, TokenizerConfig
from gptflow.data.errors import SkipReport
from gptflow.data.ingest import CorpusManifest, ingest_corpus
from gptflow.data.readers import read_documents
from gptflow.data.sources import SourceFile, detect_format, resolve_sources
from gptflow.data.streaming import ShardCache
from gptflow.data.tokenizer import TokenizerArtifact, train_tokenizer

TEST_VOCAB_SIZE = 512

WriteCorpus = Callable[[dict[str, str | bytes]], Path]
ReadFile = Callable[..., tuple[list[str], SkipReport]]


@pytest.fixture
def make_documents() -> Callable[..., list[str]]:
    """``make_documents(count, prefix)``: texts that differ from each other and across prefixes."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()

    def make(count: int, prefix: str = "doc") -> list[str]:
        return [f"{prefix} {index}: " + " ".join(words[(index + k) % len(words)] for k in range(12))
                for index in range(count)]

    return make


@pytest.fixture
def store_dir(tmp_path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def write_corpus(tmp_path) -> WriteCorpus:
    """Write ``{relative path: text or bytes}`` under ``tmp_path/corpus``; returns that folder."""
    root = tmp_path / "corpus"

    def write(files: dict[str, str | bytes]) -> Path:
        for name, content in files.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content, encoding="utf-8", newline="")
        return root

    return write


@pytest.fixture
def read_file() -> ReadFile:
    """Read one file the way ingest does; returns (documents, skip report)."""

    def read(path: Path, text_field: str = "text", min_chars: int = 1) -> tuple[list[str], SkipReport]:
        skips = SkipReport()
        source = SourceFile(path, *detect_format(path))
        return list(read_documents(source, text_field, skips, min_chars)), skips

    return read


@pytest.fixture(scope="session")
def tiny_manifest(tmp_path_factory, tiny_corpus_dir) -> CorpusManifest:
    """Real Python sources (39 files, ~800 KB, several over 64 KB) ingested once for the session."""
    store = tmp_path_factory.mktemp("session-store")
    return ingest_corpus(resolve_sources([str(tiny_corpus_dir)]), IngestConfig(val_fraction=0.2), store)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_manifest) -> TokenizerArtifact:
    store = Path(tiny_manifest.path).parent.parent
    return train_tokenizer(tiny_manifest, TokenizerConfig(vocab_size=TEST_VOCAB_SIZE), store)


@pytest.fixture
def caches() -> Iterator[list[ShardCache]]:
    """The caches a test makes, closed before its bucket goes (they fetch ahead)."""
    made: list[ShardCache] = []
    yield made
    for cache in made:
        cache.close()
