"""The finetune flow's settings and its default base model."""

from __future__ import annotations

import re

import pytest
import torch
from tokenizers import Tokenizer, models

from gptflow.model.checkpoint import save_final
from gptflow.model.config import ModelConfig, TrainConfig
from gptflow.model.finetune_config import FinetuneConfig
from gptflow.model.gpt import GPT
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.settings import ConfigError, FinetuneSettings, build_config
from gptflow.tasks.tracking.registry import NoPretrainedModel, default_base_model
from gptflow.tasks.tracking.run import pipeline_run


def test_settings_compose_the_training_loop_and_sampling_with_finetune_defaults(tmp_path):
    config_file = tmp_path / "finetune.toml"
    config_file.write_text("[finetune]\nlora_rank = 0\n[train]\nlearning_rate = 1e-4\n[sampling]\ntop_k = 5\n")
    settings = build_config(FinetuneSettings, None, config_file,
                            {"finetune.max_length": "96", "train.learning_rate": "3e-4"})
    assert (settings.finetune.lora_rank, settings.finetune.max_length) == (0, 96)
    assert settings.train.learning_rate == 3e-4  # override beats file
    assert settings.sampling.top_k == 5 and settings.sampling.temperature == 0.7  # file, then finetune's default
    assert settings.train.max_steps == 150 and settings.train.weight_decay == 0.0  # finetune's defaults
    assert TrainConfig().max_steps != 150  # ... not pretraining's
    assert settings.data.val_fraction == 0.1  # finetune's default, not pretraining's 0.05
    assert set(settings.data_settings("sft")) == {"max_length", "overlong", "val_fraction"}
    assert set(settings.data_settings("classification")) == {"max_length", "overlong", "val_fraction",
                                                            "text_field", "label_field"}
    assert set(settings.data_settings("tagging")) == {"max_length", "overlong", "val_fraction", "text_field",
                                                     "span_label_from"}
    assert set(settings.finetune.lora_settings()) == {"lora_rank", "lora_alpha", "lora_dropout"}
    flat = settings.flatten()
    assert flat["train.learning_rate"] == 3e-4 and flat["sampling.top_k"] == 5 and flat["finetune.lora_rank"] == 0


@pytest.mark.parametrize(("overrides", "message"), [
    ({"finetune.lr": "1"}, "finetune.lr is not a setting; finetune has: lora_rank"),
    ({"model.n_layer": "1"}, "finetune takes data.*, finetune.*, train.*, sampling.* settings, not model.*: the model's own"),
    ({"data.segment_chars": "512"}, "data.segment_chars is not a setting; data has: text_field, label_field, val_fraction"),
    ({"data.val_fraction": "0.6"}, "data.val_fraction must be in (0, 0.5)"),
    ({"finetune.text_field": "review"}, "finetune.text_field is now data.text_field"),
    ({"finetune.val_fraction": "0.2"}, "finetune.val_fraction is now data.val_fraction"),
    ({"finetune.overlong": "drop"}, "finetune.overlong must be one of truncate, skip"),
    ({"finetune.lora_dropout": "1.5"}, "finetune.lora_dropout must be in [0, 1)"),
    ({"train.optimizer": "muon"}, "train.optimizer is not a fine-tuning setting (fine-tuning trains with AdamW)"),
    ({"train.parallelism": "tp"}, "train.parallelism must be one of ddp, fsdp"),
    ({"sampling.temperature": "0"}, "sampling.temperature must be positive"),
])
def test_bad_settings_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config(FinetuneSettings, None, None, overrides)


def test_defaults_are_valid():
    assert FinetuneConfig().lora_rank > 0


@pytest.fixture()
def workspace(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return Workspace.resolve(tmp_path / "ws")


def _register(workspace: Workspace, tmp_path, name: str) -> None:
    torch.manual_seed(0)
    final = save_final(tmp_path / name, GPT(ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=16)))
    tokenizer_file = tmp_path / name / "tokenizer.json"
    Tokenizer(models.BPE()).save(str(tokenizer_file))
    with pipeline_run(workspace, "finetune", tags={}, name=f"register {name}") as run:
        run.log_text_generator(final, tokenizer_file, name, "A test model.")


def test_the_default_base_model_is_the_newest_pretrained_model_and_says_which(workspace, tmp_path):
    with pytest.raises(NoPretrainedModel, match=r"no pretrained model \(gptflow-<preset>\) is registered.*gptflow "
                       "pretrain") as error:
        default_base_model(workspace)
    assert "Models registered there" not in str(error.value)
    _register(workspace, tmp_path, "gptflow-import-other")
    with pytest.raises(NoPretrainedModel, match="Models registered there: gptflow-import-other/1"):
        default_base_model(workspace)
    _register(workspace, tmp_path, "gptflow-tiny")
    _register(workspace, tmp_path, "gptflow-cpu")
    _register(workspace, tmp_path, "gptflow-cpu")
    uri, choice = default_base_model(workspace)
    assert uri == "models:/gptflow-cpu/2"
    assert choice.startswith('no --model given: fine-tuning models:/gptflow-cpu/2, the newest pretrained model '
                             '(run "register gptflow-cpu", registered ')
    assert choice.endswith("; also registered: gptflow-tiny/1. --model picks another.")
