"""A model given as a registry URI, a run id or a directory resolves to the same weights, and what
it is (language model, chat model, classifier) and whether its tokenizer fits is worked out once."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from tokenizers import Tokenizer, models

from gptflow.data.chat import CHAT_TEMPLATE_FILE, ChatTemplate
from gptflow.data.errors import UserError
from gptflow.model.checkpoint import TrainerState, load_model, save_final, save_sharded_checkpoint
from gptflow.model.classifier import GPTClassifier, GPTTagger, save_head
from gptflow.model.config import ModelConfig, TrainConfig, pad_vocab_size
from gptflow.model.distributed import shard_model
from gptflow.model.gpt import GPT
from gptflow.model.optim import build_optimizer
from gptflow.tasks.model_source import ModelSourceError, resolve_model
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.tracking.run import pipeline_run

CONFIG = ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=pad_vocab_size(300))


@pytest.fixture()
def logged_model(tmp_path, monkeypatch, bpe_tokenizer_file):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    workspace = Workspace.resolve(tmp_path / "ws")
    torch.manual_seed(0)
    final = save_final(tmp_path / "run", GPT(CONFIG))
    tokenizer_file = shutil.copyfile(bpe_tokenizer_file, tmp_path / "run" / "tokenizer.json")
    with pipeline_run(workspace, "pretrain", tags={}, name="source-test") as run:
        registered = run.log_text_generator(final, tokenizer_file, "gptflow-test", "A test model.")
    return workspace, run.run_id, registered, final


def test_logging_a_model_prints_none_of_mlflow_s_info_lines(tmp_path, monkeypatch, bpe_tokenizer_file, capfd):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    final = save_final(tmp_path / "run", GPT(CONFIG))
    tokenizer_file = shutil.copyfile(bpe_tokenizer_file, tmp_path / "run" / "tokenizer.json")
    with pipeline_run(Workspace.resolve(tmp_path / "ws"), "pretrain", tags={}, name="quiet") as run:
        run.log_text_generator(final, tokenizer_file, "gptflow-test", "A test model.")
    assert "mlflow.pyfunc" not in capfd.readouterr().err


def test_uri_run_id_and_directory_name_the_same_weights(logged_model):
    workspace, run_id, registered, final = logged_model
    by_version = resolve_model(f"models:/{registered}", workspace)
    by_run = resolve_model(run_id, workspace)
    by_name = resolve_model(f"runs:/{run_id}/gptflow-test", workspace)
    by_earlier_name = resolve_model(f"runs:/{run_id}/model", workspace)  # every model's name before they had their own
    by_directory = resolve_model(str(final), workspace)
    assert (by_version.weights_hash == by_run.weights_hash == by_name.weights_hash == by_earlier_name.weights_hash
            == by_directory.weights_hash)
    assert by_directory.tokenizer_file == final.parent / "tokenizer.json"
    assert by_version.tokenizer_hash == by_directory.tokenizer_hash
    assert by_version.config == by_directory.config == CONFIG
    assert by_version.kind == by_directory.kind == "language_model"
    assert by_directory.tokenizer.eot_id == 0 and by_directory.tokenizer.vocab_size <= CONFIG.vocab_size


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


def test_a_sharded_checkpoint_resolves_to_its_model_gathered_once_into_one_file(logged_model, one_rank_group):
    workspace, _, _, final = logged_model
    torch.manual_seed(1)
    sharded = shard_model(GPT(CONFIG), torch.device("cpu"))
    optimizer = build_optimizer(sharded, TrainConfig(), torch.device("cpu"))
    checkpoint = save_sharded_checkpoint(final.parent, sharded, optimizer, TrainerState(7, 0, 0, {}), is_main=True)

    resolved = resolve_model(str(checkpoint), workspace)
    assert resolved.source == str(checkpoint) and resolved.config == CONFIG
    assert resolved.tokenizer_file == final.parent / "tokenizer.json"  # beside the run, as for a whole checkpoint
    torch.manual_seed(1)
    expected = GPT(CONFIG).state_dict()
    loaded = resolved.load().state_dict()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    again = resolve_model(str(checkpoint), workspace)
    assert again.model_dir == resolved.model_dir and again.weights_hash == resolved.weights_hash


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
    assert classifier.kind == "classifier"
    with pytest.raises(ModelSourceError, match="is a classifier: it labels texts rather than writing them, so "
                                               "gptflow generate does not apply. Score it with `gptflow evaluate"):
        classifier.require_text_model("gptflow generate")
    classifier.require_head("classification")
    with pytest.raises(ModelSourceError, match="is a language model, not a classifier: --classification scores"):
        language_model.require_head("classification")
    # A tagger's head sits in the same place; its settings say what it is.
    save_head(head, GPTTagger(load_model(final), ["name"], "last_token"), max_length=8)
    tagger = resolve_model(str(final), workspace)
    assert tagger.kind == "tagger"
    tagger.require_head("tagging")
    with pytest.raises(ModelSourceError, match="is a tagger, not a classifier: --classification scores"):
        tagger.require_head("classification")
    with pytest.raises(ModelSourceError, match="is a tagger: it labels texts .* --tagging FILE"):
        tagger.require_text_model("gptflow generate")


def test_a_chat_template_beside_the_tokenizer_makes_a_chat_model(logged_model):
    workspace, _, _, final = logged_model
    ChatTemplate(separator="\n").save(final.parent)
    chat_model = resolve_model(str(final), workspace)
    assert chat_model.kind == "chat_model" and chat_model.chat_template == ChatTemplate(separator="\n")
    chat_model.require_text_model("gptflow generate")
    (final.parent / CHAT_TEMPLATE_FILE).write_text('{"headers": {"user": "U: "}}')
    with pytest.raises(ModelSourceError, match="is not a gptflow chat template: .*no header for role"):
        resolve_model(str(final), workspace)


def test_a_tokenizer_the_model_cannot_embed_or_parse_is_refused_once_at_resolution(logged_model, tmp_path):
    workspace, _, _, final = logged_model
    small = save_final(tmp_path / "small", GPT(dataclasses.replace(CONFIG, vocab_size=128)))
    with pytest.raises(ModelSourceError, match="has [0-9]+ tokens, more than the 128 embedding rows"):
        resolve_model(str(small), workspace, tokenizer=str(final.parent / "tokenizer.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ModelSourceError, match="Cannot use the tokenizer"):
        resolve_model(str(final), workspace, tokenizer=str(broken))
    bare = tmp_path / "bare.json"
    Tokenizer(models.BPE()).save(str(bare))
    with pytest.raises(ModelSourceError, match="lacks the special tokens"):
        resolve_model(str(final), workspace, tokenizer=str(bare))


@pytest.fixture()
def trained_run(tmp_path, bpe_tokenizer_file):
    """A workspace, and a run's final/ with the tokenizer beside it, as pretraining leaves them."""
    torch.manual_seed(0)
    final = save_final(tmp_path / "run", GPT(CONFIG))
    shutil.copyfile(bpe_tokenizer_file, tmp_path / "run" / "tokenizer.json")
    return Workspace.resolve(tmp_path / "ws"), final


def _assembled(final, tokenizer_file, folder):
    """A model folder as a user puts it together: the weights, the config and the tokenizer, copied."""
    folder.mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        shutil.copyfile(final / name, folder / name)
    shutil.copyfile(tokenizer_file, folder / "tokenizer.json")
    return folder


def test_a_folder_put_together_by_hand_is_the_model_it_holds_committed_once_into_the_store(trained_run, tmp_path):
    workspace, final = trained_run
    folder = _assembled(final, final.parent / "tokenizer.json", tmp_path / "mine")
    resolved = resolve_model(str(folder), workspace)
    assert resolved.weights_hash == resolve_model(str(final), workspace).weights_hash
    assert resolved.model_dir.parent == workspace.store / "model-folders"
    assert resolved.tokenizer_file == folder / "tokenizer.json"
    assert torch.equal(resolved.load().lm_head.weight, load_model(final).lm_head.weight)
    assert resolve_model(str(folder), workspace).model_dir == resolved.model_dir  # copied once
    assert not (folder / "contents.json").exists()  # the user's folder is left as it was


def _write_weights(folder, how):
    weights = folder / "model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif how == "a pickle":
        torch.save(GPT(CONFIG).state_dict(), weights, _use_new_zipfile_serialization=False)
    elif how == "a torch.save zip":
        torch.save(GPT(CONFIG).state_dict(), weights)
    elif how == "another model size":
        save_final(folder / "other", GPT(dataclasses.replace(CONFIG, n_embd=16)))
        shutil.copyfile(folder / "other" / "final" / "model.safetensors", weights)
    elif how == "another depth":
        save_final(folder / "other", GPT(dataclasses.replace(CONFIG, n_layer=2)))
        shutil.copyfile(folder / "other" / "final" / "model.safetensors", weights)
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "a config of no model":
        (folder / "config.json").write_text('{"n_layers": 2}')


@pytest.mark.parametrize(("how", "message"), [
    ("truncated", r"model\.safetensors is truncated: its tensors end at byte [0-9,]+ of its data, which holds "
                  r"[0-9,]+\."),
    ("a pickle", r"model\.safetensors is not a safetensors file \(it is a Python pickle\): its first 8 bytes give a "
                 r"header of [0-9,]+ bytes"),
    ("a torch.save zip",
     r"model\.safetensors is not a safetensors file \(it is a zip archive, as torch\.save writes\)"),
    ("another model size", r"model\.safetensors does not fit .*config\.json \(n_layer=1, n_embd=8, vocab_size=384\): "
                           r"lm_head\.weight is \[384, 16\] in the file, \[384, 8\] for the config"),
    ("another depth", r"model\.safetensors does not fit .*: 6 tensors no such GPT has \(transformer\.h\.1\."),
    ("empty", r"model\.safetensors is not a safetensors file: it holds 0 bytes"),
    ("a config of no model", r"config\.json of .* is not a gptflow model config: .*n_layers"),
])
def test_a_folder_whose_weights_are_not_the_model_its_config_describes_is_one_line_naming_the_file(
    trained_run, tmp_path, how, message
):
    workspace, final = trained_run
    folder = _assembled(final, final.parent / "tokenizer.json", tmp_path / "mine")
    _write_weights(folder, how)
    with pytest.raises(UserError, match=message) as raised:
        resolve_model(str(folder), workspace)
    named = "config.json" if "config" in how else "model.safetensors"
    assert str(folder / named) in str(raised.value) and "\n" not in str(raised.value)
    assert not (workspace.store / "model-folders").exists()  # nothing committed from it
