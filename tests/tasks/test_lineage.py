"""The lineage file under concurrent runs: each run's changes land, none is lost."""

from __future__ import annotations

import threading
import time

from gptflow.tasks import lineage as lineage_module
from gptflow.tasks.lineage import Lineage, ModelRecord, TrainingAttempt
from gptflow.tasks.runtime.workspace import Workspace


def model_record(key: str) -> ModelRecord:
    return ModelRecord(stage_key=key, compatibility="same", model_config={}, tokenizer_hash="tokenizer",
                       tokens_fingerprint="tokens", tokens_manifest="tokens.json", trained={})


def test_concurrent_runs_each_add_their_model(tmp_path, monkeypatch):
    workspace = Workspace.resolve(tmp_path / "workspace")
    corpus = [str(tmp_path / "texts")]
    # A slow write widens the window in which an unlocked read-modify-write loses the others' models.
    write = lineage_module.write_json_atomic
    monkeypatch.setattr(lineage_module, "write_json_atomic", lambda *args: (time.sleep(0.2), write(*args)))
    all_loaded = threading.Barrier(3)
    errors = []

    def run(index: int) -> None:
        try:
            lineage = Lineage.load(workspace, corpus)  # each run reads the lineage as it starts: empty
            lineage.record_attempt(workspace, TrainingAttempt(f"key-{index}", f"runs/key-{index}", {}, f"run-{index}"))
            all_loaded.wait()
            lineage.keep_tokenizer("tokenizer-settings", {"stage_key": "tokenizer-key"})
            lineage.add_model(model_record(f"key-{index}"))
            lineage.commit(workspace, "corpus.json", "tokens.json", f"run-{index}")
        except Exception as error:  # a thread's exception would otherwise vanish
            errors.append(error)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    saved = Lineage.load(workspace, corpus)
    assert sorted(record.stage_key for record in saved.models) == ["key-0", "key-1", "key-2"]
    assert saved.attempts == []  # each attempt ended with its model
    assert saved.tokenizers == {"tokenizer-settings": {"stage_key": "tokenizer-key"}}
    assert saved.last_mlflow_run_id in {"run-0", "run-1", "run-2"}


def test_an_attempt_is_saved_at_once_and_a_run_that_never_commits_changes_nothing_else(tmp_path):
    workspace = Workspace.resolve(tmp_path / "workspace")
    corpus = [str(tmp_path / "texts")]
    finished = Lineage.load(workspace, corpus)
    finished.add_model(model_record("finished"))
    finished.commit(workspace, "corpus.json", "tokens.json", "run-finished")

    killed = Lineage.load(workspace, corpus)
    attempt = TrainingAttempt("killed", "runs/killed", {"train": {"max_steps": 10}}, "run-killed")
    killed.record_attempt(workspace, attempt)
    killed.add_model(model_record("killed"))  # never committed: the run was killed before its end

    saved = Lineage.load(workspace, corpus)
    assert saved.attempts == [attempt]
    assert [record.stage_key for record in saved.models] == ["finished"]
    assert saved.last_mlflow_run_id == "run-finished"
