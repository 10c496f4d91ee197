"""What earlier runs over the same corpus left behind: the tokenizer to keep, the model to continue.

A lineage is the history of pipeline runs given the same ``--corpus`` arguments in one
workspace. When that corpus grows, a rerun keeps the lineage's tokenizer (so every unchanged
file's token shards stay valid) and continues its latest compatible model on the new data,
instead of starting over. The record is a JSON file in the store, replaced atomically at the end
of each successful run; of two concurrent runs, the last to finish is the one remembered.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gptflow.data.ingest import CorpusManifest
from gptflow.data.sources import BUILTIN_CORPUS
from gptflow.data.store import hash_json, write_json_atomic
from gptflow.data.tokenize import TokenManifest
from gptflow.tasks.workspace import Workspace

LINEAGE_DIR = "lineages"


def corpus_identity(corpus: list[str]) -> list[str]:
    """The corpus arguments with paths made absolute, so ``./texts`` means one place."""
    return sorted(spec if spec == BUILTIN_CORPUS or spec.startswith("hf:") else os.path.abspath(spec)
                  for spec in corpus)


@dataclass
class ContinuationSource:
    """The trained model a continuation starts from, and the data it had seen."""

    checkpoint: str
    weights_hash: str
    tokens_manifest: str
    tokens_fingerprint: str
    mlflow_run_id: str


@dataclass
class ModelRecord:
    stage_key: str
    compatibility: str
    """Hash of the model config and the tokenizer: only a model with the same one can continue."""
    model_config: dict[str, Any]
    tokenizer_hash: str
    tokens_fingerprint: str
    tokens_manifest: str
    trained: dict[str, Any]
    """The stage's ``TrainedModel``, as a dict."""
    continued_from: ContinuationSource | None = None

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> ModelRecord:
        source = value.get("continued_from")
        return cls(**{**value, "continued_from": ContinuationSource(**source) if source else None})


@dataclass
class Lineage:
    path: Path
    corpus: list[str]
    tokenizers: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Tokenizer config+code key → ``{"stage_key", "artifact", "mlflow_run_id"}``."""
    models: list[ModelRecord] = field(default_factory=list)
    """Every model trained in this lineage, oldest first."""
    last_corpus_manifest: str | None = None
    last_tokens_manifest: str | None = None
    last_mlflow_run_id: str | None = None

    @classmethod
    def load(cls, workspace: Workspace, corpus: list[str]) -> Lineage:
        identity = corpus_identity(corpus)
        path = workspace.store / LINEAGE_DIR / f"{hash_json(identity)}.json"
        if not path.exists():
            return cls(path=path, corpus=identity)
        value = json.loads(path.read_text())
        return cls(
            path=path,
            corpus=value["corpus"],
            tokenizers=value["tokenizers"],
            models=[ModelRecord.from_dict(record) for record in value["models"]],
            last_corpus_manifest=value["last_corpus_manifest"],
            last_tokens_manifest=value["last_tokens_manifest"],
            last_mlflow_run_id=value["last_mlflow_run_id"],
        )

    def save(self) -> None:
        value = asdict(self)
        value.pop("path")
        write_json_atomic(self.path, value)

    def previous_corpus(self) -> CorpusManifest | None:
        return _load_manifest(CorpusManifest, self.last_corpus_manifest)

    def previous_tokens(self) -> TokenManifest | None:
        return _load_manifest(TokenManifest, self.last_tokens_manifest)


def _load_manifest(manifest_type: type, path: str | None) -> Any:
    if path is None or not Path(path).exists():
        return None
    return manifest_type.from_dict(json.loads(Path(path).read_text()))


def data_delta(previous: CorpusManifest | None, current: CorpusManifest,
               previous_tokens: TokenManifest | None, tokens: TokenManifest) -> dict[str, int] | None:
    """Files added, changed and removed since the lineage's last run, and the tokens that came
    with them; None on a lineage's first run."""
    if previous is None:
        return None
    before = {unit.source: unit.content_hash for unit in previous.units}
    after = {unit.source: unit.content_hash for unit in current.units}
    known_units = {unit.key for unit in previous_tokens.units} if previous_tokens else set()
    return {
        "files_added": len(after.keys() - before.keys()),
        "files_changed": sum(1 for source in after.keys() & before.keys() if after[source] != before[source]),
        "files_removed": len(before.keys() - after.keys()),
        "tokens_added": sum(
            sum(unit.n_tokens.values()) for unit in tokens.units if unit.key not in known_units
        ),
    }
