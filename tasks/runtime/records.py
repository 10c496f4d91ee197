"""Prefect result records as data: JSON that can only become one of gptflow's result types.

A Prefect record names the serializer that reads it back, and Prefect's own serializers run or
import what a record names (a pickle runs its code; the JSON decoder imports the class it is told).
gptflow's records name ``RecordSerializer`` and hold ``{"type": <name>, "data": <JSON>}``, where the
name is one of ``RESULT_TYPES`` or ``PLAIN_JSON``. ``tasks.runtime.caching.run_stage`` reads a record with
``read_record`` before Prefect may, on the raw JSON: a record that names another serializer, a
type outside the allow-list or other than the one the stage's task declares (``require_type``),
data that does not fit that type (rebuilt by pydantic, field types checked), or that is not JSON,
is refused with a warning naming the file, and the stage is recomputed as if the record were
stale; nothing the record names is imported or run. Prefect reads a record that passed once more,
for its ``Cached`` state, under the same stage lock: the check cannot sit inside that read, since
a task's ``result_storage`` must be a block saved on the Prefect server or a plain path.
``run_stage`` takes the cached result from its own read, whose store paths are this workspace's
(``RecordSerializer.store`` is left out of the record, so the serializer Prefect rebuilds from it
does not know the store).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
from pathlib import Path
from typing import Any

from prefect.serializers import Serializer
from pydantic import Field, TypeAdapter, ValidationError

from gptflow.data.store import store_paths, store_references

RESULT_TYPES: dict[str, str] = {
    "CorpusManifest": "gptflow.data.ingest",
    "TokenizerArtifact": "gptflow.data.tokenizer",
    "TokenManifest": "gptflow.data.tokenize",
    "TrainedModel": "gptflow.tasks.stages.training_job",
    "EvalReport": "gptflow.tasks.stages.evaluation",
    "LossReport": "gptflow.tasks.stages.evaluation",
    "MultipleChoiceReport": "gptflow.tasks.stages.multiple_choice",
    "ClassificationReport": "gptflow.tasks.stages.classification",
    "TaggingReport": "gptflow.tasks.stages.tagging",
    "PreparedData": "gptflow.data.finetune_data",
    "FinetunedModel": "gptflow.tasks.stages.finetuning",
    "FinetuneReport": "gptflow.tasks.stages.finetuning",
    "HarnessReport": "gptflow.tasks.stages.lm_eval",
}
"""The allow-list: the dataclasses a stage may return, by name, and the module defining each.
Named rather than imported, since the stage modules import this one (through ``tasks.runtime.caching``):
importing them here would be circular."""

PLAIN_JSON = "json"
"""The record type of a result that is plain JSON: a string, a list of strings, numbers."""


class UntrustedRecord(ValueError):
    """A record gptflow did not write: another serializer, another type, or not JSON at all."""


def result_type(name: str) -> type:
    """The allow-listed class called ``name``; ``UntrustedRecord`` for any other name."""
    if name not in RESULT_TYPES:
        raise UntrustedRecord(f"names the type {name!r:.100}, which is not one of gptflow's result types")
    return getattr(importlib.import_module(RESULT_TYPES[name]), name)


@functools.cache
def _adapter(declared: Any) -> TypeAdapter:
    return TypeAdapter(declared)


def _is_plain_json(value: Any) -> bool:
    """JSON reads ``value`` back equal: no tuples, no keys other than strings."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, list):
        return all(map(_is_plain_json, value))
    if isinstance(value, dict):
        return all(isinstance(key, str) and _is_plain_json(item) for key, item in value.items())
    return False


class RecordSerializer(Serializer):
    """Writes a stage's result as ``{"type": ..., "data": ...}``; reads back only allow-listed types,
    rebuilt from the data with their fields' types checked (pydantic, nested dataclasses included).
    Paths inside ``store`` are written as store references (``data.store.store_references``), so a
    copied workspace reads its own artifacts; reading makes them paths inside ``store`` again."""

    type: str = Field(default="gptflow-record", frozen=True)
    store: str | None = Field(default=None, exclude=True)
    """The workspace's store. Left out of the record: a record names its serializer, and must not
    name the folder it was written in."""

    def dumps(self, obj: Any) -> bytes:
        cls = type(obj)
        if dataclasses.is_dataclass(obj) and RESULT_TYPES.get(cls.__name__) == cls.__module__:
            record = {"type": cls.__name__, "data": obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)}
        elif _is_plain_json(obj):
            record = {"type": PLAIN_JSON, "data": obj}
        else:
            raise TypeError(f"a stage returned a {cls.__qualname__}, which is neither plain JSON nor one of "
                            "gptflow's result types (gptflow.tasks.runtime.records.RESULT_TYPES)")
        return json.dumps(self._stored(record)).encode()

    def loads(self, blob: bytes) -> Any:
        try:
            record = json.loads(blob)
        except ValueError as error:
            raise UntrustedRecord("holds a result that is not JSON") from error
        if not isinstance(record, dict) or set(record) != {"type", "data"}:
            raise UntrustedRecord('holds a result that is not {"type": ..., "data": ...}')
        data = store_paths(record["data"], Path(self.store)) if self.store else record["data"]
        if record["type"] == PLAIN_JSON:
            return data
        try:
            return _adapter(result_type(record["type"])).validate_python(data)
        except ValidationError as error:
            raise UntrustedRecord(f"holds a {record['type']} whose fields do not fit it: {error.error_count()} "
                                  "errors") from error

    def _stored(self, record: dict[str, Any]) -> dict[str, Any]:
        return store_references(record, Path(self.store)) if self.store else record


RECORD_SERIALIZER = RecordSerializer()
"""How a record names the serializer that wrote it; ``RecordSerializer(store=...)`` writes them."""


def require_type(result: Any, declared: Any) -> None:
    """``UntrustedRecord`` unless ``result`` is a ``declared`` (a stage's return annotation, such as
    ``CorpusManifest`` or ``list[str]``): an allow-listed type, but another stage's, is refused too."""
    try:
        _adapter(declared).validate_python(result, strict=True)
    except ValidationError as error:
        raise UntrustedRecord(f"holds a {type(result).__name__}, not the {getattr(declared, '__name__', declared)} "
                              "its stage returns") from error


def read_record(path: Path, store: Path) -> Any:
    """The result in the Prefect record at ``path`` (its paths inside ``store``), if a
    ``RecordSerializer`` wrote it; else ``UntrustedRecord``. Checked on the raw JSON, never through Prefect: building the serializer a
    record names imports the module it gives, and reading with it runs a pickle."""
    try:
        record = json.loads(path.read_bytes())
    except ValueError as error:
        raise UntrustedRecord("is not JSON") from error
    metadata = record.get("metadata") if isinstance(record, dict) else None
    serializer = metadata.get("serializer") if isinstance(metadata, dict) else None
    if serializer != RECORD_SERIALIZER.model_dump():
        raise UntrustedRecord(f"names the serializer {serializer!r:.100}, not gptflow's")
    if not isinstance(record.get("result"), str):
        raise UntrustedRecord("holds no result")
    return RecordSerializer(store=str(store)).loads(record["result"].encode())
