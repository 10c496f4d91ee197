"""Prefect result records are JSON data: written by a real stage, read back only as gptflow's own
result types, and any other record refused and recomputed without running what it names."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import pkgutil
import shutil
import typing
from pathlib import Path

import pytest
from prefect import Task, flow
from prefect.results import ResultRecord, ResultRecordMetadata
from prefect.serializers import PickleSerializer

from gptflow.data.config import IngestConfig, TokenizeConfig, TokenizerConfig
from gptflow.data.errors import SkipReport
from gptflow.data.finetune_data import PreparedData
from gptflow.data.ingest import ingest_corpus
from gptflow.data.sources import resolve_sources
from gptflow.data.tokenize import tokenize_corpus
from gptflow.data.tokenizer import train_tokenizer
from gptflow.model.config import ModelConfig
from gptflow.tasks import stages
from gptflow.tasks.runtime.caching import run_stage, stage_key, units_are_committed
from gptflow.tasks.runtime.records import PLAIN_JSON, RECORD_SERIALIZER, RESULT_TYPES, RecordSerializer, read_record
from gptflow.tasks.runtime.unit_maps import UnitRunner
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.stages.classification import ClassificationReport
from gptflow.tasks.stages.evaluation import EvalReport, LossReport
from gptflow.tasks.stages.finetuning import FinetunedModel, FinetuneReport
from gptflow.tasks.stages.ingest import ingest_corpus_task
from gptflow.tasks.stages.lm_eval import HarnessReport
from gptflow.tasks.stages.multiple_choice import MultipleChoiceReport
from gptflow.tasks.stages.tagging import TaggingReport
from gptflow.tasks.stages.training_job import TrainedModel


@flow
def run_ingest(workspace_root: str, corpus: str) -> tuple[str, str, str]:
    """The ingest stage through ``run_stage``: its status, its record file and the manifest's fingerprint."""
    workspace = Workspace.resolve(workspace_root)
    sources = resolve_sources([corpus])
    config = IngestConfig()
    key = stage_key("ingest", config=config, modules=["gptflow.tasks.stages.ingest"],
                    inputs={"sources": sources.fingerprint_inputs()})
    outcome = run_stage(ingest_corpus_task, key=key, workspace=workspace, is_valid=units_are_committed,
                        sources=sources, config=config, store_dir=str(workspace.store),
                        artifacts=workspace.artifacts, units=UnitRunner())
    return outcome.status, str(workspace.prefect_results / key), outcome.result.fingerprint


class TouchesFile:
    """Unpickling it creates ``path``: what a crafted record runs when it is read as a pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def pickle_record(record: Path, marker: Path) -> bytes:
    """A record as Prefect writes one by default (cloudpickle) whose result creates ``marker``."""
    metadata = ResultRecordMetadata(serializer=PickleSerializer(), storage_key=str(record))
    return ResultRecord(metadata=metadata, result=TouchesFile(marker)).serialize()


def json_record(serializer: dict, result: dict) -> bytes:
    return json.dumps({"metadata": {"storage_key": "x", "serializer": serializer}, "result": json.dumps(result)}).encode()


@pytest.fixture()
def workspace_root(prefect_api_url, tmp_path) -> str:
    return str(tmp_path / "workspace")


def test_a_stage_record_is_json_naming_its_result_type(workspace_root, tiny_corpus_dir):
    status, record, fingerprint = run_ingest(workspace_root, str(tiny_corpus_dir))
    assert status == "executed" and Path(record).parent == Path(workspace_root) / "prefect"
    written = json.loads(Path(record).read_text())
    assert written["metadata"]["serializer"] == {"type": "gptflow-record"}
    result = json.loads(written["result"])
    assert result["type"] == "CorpusManifest" and result["data"]["fingerprint"] == fingerprint
    assert run_ingest(workspace_root, str(tiny_corpus_dir)) == ("cached", record, fingerprint)


def test_a_pickled_record_is_recomputed_never_unpickled(workspace_root, tiny_corpus_dir, tmp_path, caplog):
    _, record, fingerprint = run_ingest(workspace_root, str(tiny_corpus_dir))
    # The record is live: Prefect's own reader runs it.
    control = tmp_path / "control-marker"
    ResultRecord.deserialize(pickle_record(Path(record), control))
    assert control.exists()

    marker = tmp_path / "marker"
    Path(record).write_bytes(pickle_record(Path(record), marker))
    assert run_ingest(workspace_root, str(tiny_corpus_dir)) == ("executed", record, fingerprint)
    assert not marker.exists()
    assert any(record in message and "recomputing" in message for message in caplog.messages)
    assert json.loads(json.loads(Path(record).read_text())["result"])["type"] == "CorpusManifest"
    assert run_ingest(workspace_root, str(tiny_corpus_dir))[0] == "cached"


@pytest.mark.parametrize("untrusted", [
    lambda marker: json_record({"type": "gptflow-record"},
                               {"type": "subprocess.Popen", "data": {"args": ["touch", str(marker)]}}),
    lambda marker: json_record({"type": "json"}, {"__class__": "subprocess.Popen", "data": ["touch", str(marker)]}),
    lambda marker: json_record({"type": "gptflow-record"}, {"type": "LossReport", "data": {
        "split": "val", "loss": 1.0, "tokens": 1, "perplexity": 2.7, "bits_per_byte": 1.0, "unigram_loss": None}}),
    lambda marker: b"\x80\x04garbage",
], ids=["gptflow-record-naming-popen", "prefect-json-naming-popen", "another-stage's-type", "garbage"])
def test_a_record_outside_the_allow_list_is_refused_and_recomputed(workspace_root, tiny_corpus_dir, tmp_path,
                                                                   caplog, untrusted):
    _, record, fingerprint = run_ingest(workspace_root, str(tiny_corpus_dir))
    marker = tmp_path / "marker"
    Path(record).write_bytes(untrusted(marker))
    assert run_ingest(workspace_root, str(tiny_corpus_dir)) == ("executed", record, fingerprint)
    assert not marker.exists()
    assert any(record in message and "recomputing" in message for message in caplog.messages)


def _every_result_type(store: Path, corpus: Path) -> list:
    """One instance of each allow-listed type: the data stages' from a real run on ``corpus``, the
    rest by hand with the values their stages give (None where a field may be None, nested dicts)."""
    manifest = ingest_corpus(resolve_sources([str(corpus)]), IngestConfig(val_fraction=0.2), store)
    tokenizer = train_tokenizer(manifest, TokenizerConfig(vocab_size=512), store)
    tokens = tokenize_corpus(manifest, tokenizer, TokenizeConfig(), store)
    skips = SkipReport()
    skips.add("invalid JSON", "data.jsonl:3")
    metrics = {"eval/accuracy": 0.75, "eval/macro_f1": 0.5, "eval/f1/json": 0.8}
    classes = {"labels": ["email", "json"], "f1": {"email": 0.2, "json": 0.8}, "confusion": [[1, 2], [0, 5]],
               "majority_label": "json"}
    return [
        manifest, tokenizer, tokens,
        TrainedModel(run_dir="runs/k", final_dir="runs/k/final", report_dir="runs/k/report", weights_hash="w",
                     model_config=dataclasses.asdict(ModelConfig()), steps=10, tokens_seen=5120,
                     final_train_loss=4.5, final_val_loss=None, elapsed_s=1.5, trained_in_mlflow_run="r",
                     registered_model="gptflow-cpu/3"),
        EvalReport(directory="eval/k", val_loss=4.6, val_tokens=2048, perplexity=99.5, bits_per_byte=1.9,
                   unigram_loss=6.1, samples=["def f():\n    return 1", ""]),
        LossReport(split="train", loss=4.4, tokens=2048, perplexity=81.5, bits_per_byte=1.8, unigram_loss=None),
        MultipleChoiceReport(directory="eval/m", file_hash="h", examples=10, acc=0.3, acc_norm=0.4, acc_bytes=0.4,
                             truncated=0),
        ClassificationReport(directory="eval/c", metrics=metrics, classes=classes, skipped=skips.summary()),
        TaggingReport(directory="eval/t", metrics={"eval/f1": 0.5},
                      labels={"per_label": {"name": {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}},
                              "token_labels": ["O", "name"], "confusion": [[3, 0], [1, 1]],
                              "span_label_from": "last_token"}, skipped=skips.summary()),
        PreparedData(directory="finetune-data/k", fingerprint="f", objective="classification", labels=["email", "json"],
                     examples={"train": 7, "val": 1}, tokens={"train": 700, "val": 90},
                     trained_tokens={"train": 7, "val": 1}, truncated={"train": 1, "val": 0}, max_length=128,
                     skips=skips.to_dict(), label_counts={"train": {"email": 3, "json": 4}, "val": {"json": 1}}),
        FinetunedModel(run_dir="finetunes/k", model_dir="finetunes/k/final", classifier_dir=None,
                       tokenizer_dir="finetunes/k/tokenizer", report_dir="finetunes/k/report", weights_hash="w",
                       objective="sft", steps=4, trainable_parameters=100, total_parameters=1000,
                       initial_val_loss=5.0, final_val_loss=4.0, final_train_loss=3.9, elapsed_s=2.0,
                       trained_in_mlflow_run="r", registered_model="gptflow-finetune-sft/1"),
        FinetuneReport(directory="finetune-eval/k", metrics={"eval/val_loss": 4.0},
                       samples=[{"location": "a.jsonl:1", "prompt": "p", "reference": "r", "response": "s"}]),
        HarnessReport(directory="lm-eval/k", metrics={"lm_eval/hellaswag/acc": 0.25, "lm_eval/hellaswag/acc_norm": 0.3}),
    ]


def test_every_result_type_round_trips_through_the_record_serializer(tmp_path, tiny_corpus_dir):
    corpus = shutil.copytree(tiny_corpus_dir, tmp_path / "corpus")
    (corpus / "binary.txt").write_bytes(b"\x00" * 64)
    results = _every_result_type(tmp_path / "store", corpus)
    assert {type(result).__name__ for result in results} == set(RESULT_TYPES)
    assert results[0].units and results[0].skips.total  # nested dataclasses: units, and the binary file skipped
    diverged = LossReport(split="val", loss=math.nan, tokens=1, perplexity=math.nan, bits_per_byte=math.nan,
                          unigram_loss=None)
    record = tmp_path / "record"
    store = tmp_path / "store"

    def round_trip(result, read_in: Path = store):
        """Written as Prefect writes a stage's record, read back as run_stage reads it."""
        serializer = RecordSerializer(store=str(store))
        metadata = ResultRecordMetadata(serializer=serializer, storage_key=str(record))
        record.write_bytes(ResultRecord(metadata=metadata, result=result).serialize())
        assert str(store) not in record.read_text()  # neither in the result nor in the serializer it names
        return read_record(record, read_in)

    for result in [*results, ["a sample", "another"], "demo/sft.jsonl"]:
        back = round_trip(result)
        assert type(back) is type(result) and back == result
    assert math.isnan(round_trip(diverged).loss)
    moved = round_trip(results[0], read_in=tmp_path / "moved" / "store")  # the workspace copied elsewhere
    assert [unit.directory for unit in moved.units] == [
        unit.directory.replace(str(store), str(tmp_path / "moved" / "store")) for unit in results[0].units]


def test_every_stage_returns_an_allow_listed_type_or_plain_json():
    declared = {
        task.name: typing.get_type_hints(task.fn)["return"]
        for module in pkgutil.iter_modules(stages.__path__)
        for task in vars(importlib.import_module(f"{stages.__name__}.{module.name}")).values() if isinstance(task, Task)
    }
    assert {"ingest-corpus", "pretrain-model", "generate-samples", "finetune-model"} <= set(declared)
    for stage, returns in declared.items():
        assert returns in (str, list[str]) or RESULT_TYPES.get(returns.__name__) == returns.__module__, stage


def test_a_result_that_is_neither_allow_listed_nor_plain_json_is_not_written():
    with pytest.raises(TypeError, match="RESULT_TYPES"):
        RECORD_SERIALIZER.dumps(("a", "tuple"))
    assert json.loads(RECORD_SERIALIZER.dumps(["a"]))["type"] == PLAIN_JSON
