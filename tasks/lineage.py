"""What earlier runs over the same corpus left behind: the tokenizer to keep, the model to continue.

A lineage is the history of pipeline runs given the same ``--corpus`` arguments in one
workspace. When that corpus grows, a rerun keeps the lineage's tokenizer (so every unchanged
file's token shards stay valid) and continues its latest compatible model on the new data,
instead of starting over. The record is a JSON file in the store. A run collects its changes and
``commit`` applies them at its end to the file as it is then, under the lineage's workspace lock,
so concurrent runs each add their model (the last to finish sets the ``last_*`` fields).

The file is ``store/lineages/<hash>.json``, the hash of ``corpus_identity`` (the ``--corpus``
arguments with paths made absolute, without mixture weights). It holds the tokenizer to keep per
tokenizer settings and code, every model trained (``ModelRecord``), the trainings begun and not
finished (``TrainingAttempt``, written as the stage is about to train, dropped when a model of
its key is recorded) and the last manifests and MLflow run. On a rerun, ingest and tokenize redo
only files whose unit key is new, the tokenizer stage reuses the key the lineage's tokenizer was
trained under whatever the corpus became (``--retrain-tokenizer`` opts out), and
``tasks.stages.training.plan_training`` decides what to train.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gptflow.data.commits import write_json_atomic
from gptflow.data.hashing import hash_json
from gptflow.data.ingest import CorpusManifest
from gptflow.data.object_sources import is_object_url
from gptflow.data.sources import BUILTIN_CORPUS
from gptflow.data.store import ArtifactStore, store_paths, store_references
from gptflow.data.tokenize import TokenManifest
from gptflow.tasks.runtime.workspace import Workspace

LINEAGE_DIR = "lineages"


def corpus_identity(corpus: list[str]) -> list[str]:
    """The corpus arguments with paths made absolute, so ``./texts`` means one place; URLs as given."""
    return sorted(spec if spec == BUILTIN_CORPUS or spec.startswith("hf:") or is_object_url(spec)
                  else os.path.abspath(spec) for spec in corpus)


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
class TrainingAttempt:
    """A pretrain stage that began training, kept until a model of its key is recorded: a later run
    under other settings says why it does not resume from the attempt's checkpoints."""

    stage_key: str
    run_dir: str
    settings: dict[str, Any]
    """What the stage key covers: ``model`` and ``train`` (dicts of fields), ``continuation``,
    ``tokens`` (fingerprint), ``tokenizer`` (hash) and ``code`` (version)."""
    mlflow_run_id: str


@dataclass
class Lineage:
    path: Path
    corpus: list[str]
    tokenizers: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Tokenizer config+code key → ``{"stage_key", "artifact", "mlflow_run_id"}``."""
    models: list[ModelRecord] = field(default_factory=list)
    """Every model trained in this lineage, oldest first."""
    attempts: list[TrainingAttempt] = field(default_factory=list)
    """Trainings begun whose key has no model in ``models`` yet, oldest first."""
    last_corpus_manifest: str | None = None
    last_tokens_manifest: str | None = None
    last_mlflow_run_id: str | None = None
    pending: list[Callable[[Lineage], None]] = field(default_factory=list, repr=False)
    """This run's changes, not saved yet: ``commit`` applies them to the file as it is then."""

    @classmethod
    def load(cls, workspace: Workspace, corpus: list[str]) -> Lineage:
        identity = corpus_identity(corpus)
        return cls._read(workspace.store / LINEAGE_DIR / f"{hash_json(identity)}.json", identity, workspace.artifacts)

    @classmethod
    def _read(cls, path: Path, identity: list[str], artifacts: ArtifactStore) -> Lineage:
        if not artifacts.pull(path):
            return cls(path=path, corpus=identity)
        value = store_paths(json.loads(path.read_text()), _store_of(path))
        return cls(
            path=path,
            corpus=value["corpus"],
            tokenizers=value["tokenizers"],
            models=[ModelRecord.from_dict(record) for record in value["models"]],
            attempts=[TrainingAttempt(**attempt) for attempt in value.get("attempts", [])],  # older files have none
            last_corpus_manifest=value["last_corpus_manifest"],
            last_tokens_manifest=value["last_tokens_manifest"],
            last_mlflow_run_id=value["last_mlflow_run_id"],
        )

    def keep_tokenizer(self, settings_key: str, entry: dict[str, Any]) -> None:
        """The tokenizer this run used under the tokenizer settings ``settings_key``."""
        self._change(lambda lineage: lineage.tokenizers.update({settings_key: entry}))

    def add_model(self, record: ModelRecord) -> None:
        """Record a trained model; it ends the attempt at its key. The latest record of a key is the
        one to continue from, so a rerun moves it to the end."""
        def add(lineage: Lineage) -> None:
            lineage.models = [model for model in lineage.models if model.stage_key != record.stage_key] + [record]
            lineage.attempts = [attempt for attempt in lineage.attempts if attempt.stage_key != record.stage_key]

        self._change(add)

    def record_attempt(self, workspace: Workspace, attempt: TrainingAttempt) -> None:
        """Save now, not at ``commit``, that ``attempt`` begins training: the run may never end."""
        def record(lineage: Lineage) -> None:
            lineage.attempts = [earlier for earlier in lineage.attempts if earlier.stage_key != attempt.stage_key]
            lineage.attempts.append(attempt)

        record(self)
        self._update_file(workspace, [record])

    def commit(self, workspace: Workspace, corpus_manifest: str, tokens_manifest: str, mlflow_run_id: str) -> None:
        """Apply this run's changes, and the manifests and MLflow run it ended with, to the lineage
        file as it is now: read, changed and replaced under the lineage's lock, so no concurrent
        run's changes are lost."""
        def finish(lineage: Lineage) -> None:
            lineage.last_corpus_manifest = corpus_manifest
            lineage.last_tokens_manifest = tokens_manifest
            lineage.last_mlflow_run_id = mlflow_run_id

        self._change(finish)
        self._update_file(workspace, self.pending)
        self.pending = []

    def _change(self, change: Callable[[Lineage], None]) -> None:
        change(self)  # later stages of this run see it at once
        self.pending.append(change)

    def _update_file(self, workspace: Workspace, changes: Sequence[Callable[[Lineage], None]]) -> None:
        with workspace.lock(f"lineage-{self.path.stem}", between_machines=True):
            latest = Lineage._read(self.path, self.corpus, workspace.artifacts)
            for change in changes:
                change(latest)
            value = asdict(latest)
            for transient in ("path", "pending"):
                del value[transient]
            write_json_atomic(self.path, store_references(value, _store_of(self.path)))
            workspace.artifacts.share(self.path)

    def previous_corpus(self, artifacts: ArtifactStore) -> CorpusManifest | None:
        path = self.last_corpus_manifest
        return None if path is None else artifacts.read_manifest(CorpusManifest, path)

    def previous_tokens(self, artifacts: ArtifactStore) -> TokenManifest | None:
        path = self.last_tokens_manifest
        return None if path is None else artifacts.read_manifest(TokenManifest, path)


def _store_of(lineage: Path) -> Path:
    """The store holding the lineage file ``lineage`` (in its ``lineages/`` folder)."""
    return lineage.parent.parent


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
