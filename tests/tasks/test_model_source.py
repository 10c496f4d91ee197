"""A model given as a registry URI, a run id or a directory resolves to the same weights."""

from __future__ import annotations

import shutil

import pytest
import torch
from tokenizers import Tokenizer, models

from gptflow.model.checkpoint import load_model, save_final
from gptflow.model.classifier import GPTClassifier, save_head
from gptflow.model.config import ModelConfig
from gptflow.model.gpt import GPT
from gptflow.tasks.model_source import ModelSourceError, resolve_model
from gptflow.tasks.tracking import pipeline_run
from gptflow.tasks.workspace import Workspace


@pytest.fixture()
def logged_model(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    workspace = Workspace.resolve(tmp_path / "ws")
    torch.manual_seed(0)
    final = save_final(tmp_path / "run", GPT(ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=16)))
    tokenizer_file = tmp_path / "run" / "tokenizer.json"
    Tokenizer(models.BPE()).save(str(tokenizer_file))
    with pipeline_run(workspace, "source-test", tags={}) as run:
        version = run.log_text_generator(final, tokenizer_file, "gptflow-test")
    return workspace, run.run_id, version, final


def test_uri_run_id_and_directory_name_the_same_weights(logged_model):
    workspace, run_id, version, final = logged_model
    by_version = resolve_model(f"models:/gptflow-test/{version}", workspace)
    by_run = resolve_model(run_id, workspace)
    by_run_uri = resolve_model(f"runs:/{run_id}/model", workspace)
    by_directory = resolve_model(str(final), workspace)
    assert by_version.weights_hash == by_run.weights_hash == by_run_uri.weights_hash == by_directory.weights_hash
    assert by_directory.tokenizer_file == final.parent / "tokenizer.json"
    assert by_version.tokenizer_hash == by_directory.tokenizer_hash


@pytest.mark.parametrize(
    ("source", "message"),
    [("not-a-model", "neither an MLflow model URI"), ("models:/missing/3", "Cannot fetch"),
     ("0" * 32, "No MLflow run")],
)
def test_unknown_sources_say_what_to_pass(logged_model, source, message):
    with pytest.raises(ModelSourceError, match=message):
        resolve_model(source, logged_model[0])


def test_a_directory_without_tokenizer_asks_for_one(logged_model, tmp_path):
    lonely = shutil.copytree(logged_model[3], tmp_path / "elsewhere" / "a" / "final")
    with pytest.raises(ModelSourceError, match="--tokenizer"):
        resolve_model(str(lonely), logged_model[0])
    assert resolve_model(str(lonely), logged_model[0], tokenizer=str(logged_model[3].parent / "tokenizer.json"))


def test_a_head_beside_the_trunk_makes_a_classifier_with_its_own_hash(logged_model):
    workspace, _, _, final = logged_model
    language_model = resolve_model(str(final), workspace)
    assert language_model.classifier_dir is None
    head = save_head(final.parent / "classifier", GPTClassifier(load_model(final), ["a", "b"]), max_length=8)
    classifier = resolve_model(str(final), workspace)
    assert classifier.classifier_dir == head and classifier.model_dir == final
    # Trunk and head together: a retrained head is a different model to every cached stage.
    assert classifier.weights_hash != language_model.weights_hash
    save_head(head, GPTClassifier(load_model(final), ["a", "b", "c"]), max_length=8)
    assert resolve_model(str(final), workspace).weights_hash not in {classifier.weights_hash,
                                                                      language_model.weights_hash}
