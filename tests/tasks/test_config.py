from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from gptflow.model.config import MODERN_RECIPE, TrainConfig, pad_vocab_size
from gptflow.model.gpt import GPT
from gptflow.tasks.settings import (
    DEFAULT_PRESET,
    PRESETS,
    ConfigError,
    EvaluateSettings,
    FinetuneSettings,
    PretrainSettings,
    build_config,
    parse_override_pairs,
)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_builds_a_valid_config(preset):
    config = build_config(PretrainSettings, preset)
    assert config.model.n_embd % config.model.n_head == 0
    assert config.tokenizer.vocab_size >= 512


def test_gpt2_preset_has_gpt2_small_shape():
    model = build_config(PretrainSettings, "gpt2-124m").model
    assert (model.n_layer, model.n_head, model.n_embd, model.block_size) == (12, 12, 768, 1024)


def test_layers_apply_in_order_defaults_preset_file_overrides(tmp_path):
    config_file = tmp_path / "my.toml"
    config_file.write_text("[train]\nmax_steps = 77\nlearning_rate = 0.01\n[model]\nn_layer = 3\n")
    config = build_config(PretrainSettings, "tiny", config_file, {"train.max_steps": "88"})
    assert config.train.max_steps == 88  # override beats file
    assert config.train.learning_rate == 0.01  # file beats preset
    assert config.model.n_layer == 3
    assert config.model.n_embd == PRESETS["tiny"]["model"]["n_embd"]  # preset beats default
    assert config.train.beta2 == 0.95  # default


def test_override_values_are_coerced_to_the_field_type():
    config = build_config(PretrainSettings, 
        DEFAULT_PRESET,
        overrides=parse_override_pairs([
            "train.max_steps=1e3", "train.compile=true", "model.dropout=0.1",
            'eval.prompts=["a", "b"]', "model.vocab_size=none",
        ]),
    )
    assert config.train.max_steps == 1000 and config.train.compile is True
    assert config.model.dropout == 0.1 and config.eval.prompts == ["a", "b"]
    assert config.model.vocab_size is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_stepz=3", "train.max_stepz is not a setting"),
        ("trian.max_steps=3", "pretrain takes data.*, tokenizer.*, tokenize.*, model.*, train.*, eval.*, sampling.*, "
                             "incremental.* settings, not trian.*"),
        ("train.max_steps=abc", "train.max_steps='abc' is not a valid int"),
        ("train.compile=maybe", "is not a valid bool"),
        ("model.n_head=5", "divisible by model.n_head"),
        ("train.max_steps=0", "train.max_steps must be positive"),
        ("data.languages=en;fr", "data.languages must be comma-separated ISO 639 codes such as en,fr"),
        ("data.language_threshold=1.5", r"data.language_threshold must be a score in \[0, 1\)"),
        ("data.quality=fine-web", "data.quality must be one of none, gopher, c4, fineweb, got 'fine-web'"),
        ("data.quality_short_lines=67", r"data.quality_short_lines must be a share in \[0, 1\], got 67"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config(PretrainSettings, DEFAULT_PRESET, overrides=parse_override_pairs([override]))


def test_languages_are_one_comma_separated_setting():
    settings = build_config(PretrainSettings, DEFAULT_PRESET,
                            overrides=parse_override_pairs(["data.languages=en,fr", "data.language_threshold=0.8"]))
    assert (settings.data.languages, settings.data.language_threshold) == ("en,fr", 0.8)


def test_quality_is_one_preset_and_fineweb_s_thresholds_are_settings():
    settings = build_config(PretrainSettings, DEFAULT_PRESET,
                            overrides=parse_override_pairs(["data.quality=fineweb", "data.quality_line_punct=0.2"]))
    assert (settings.data.quality, settings.data.quality_line_punct, settings.data.quality_short_lines) == (
        "fineweb", 0.2, 0.67)
    assert build_config(PretrainSettings, DEFAULT_PRESET).data.quality == "none"


def test_url_blocklist_is_a_path_setting_unset_by_default():
    settings = build_config(PretrainSettings, DEFAULT_PRESET,
                            overrides=parse_override_pairs(["data.url_blocklist=lists/blocked.txt"]))
    assert settings.data.url_blocklist == "lists/blocked.txt"
    assert build_config(PretrainSettings, DEFAULT_PRESET).data.url_blocklist is None
    assert build_config(PretrainSettings, DEFAULT_PRESET,
                        overrides=parse_override_pairs(["data.url_blocklist=none"])).data.url_blocklist is None


def test_evaluate_takes_only_the_settings_it_reads():
    settings = build_config(EvaluateSettings, overrides={"eval.eval_tokens": "4096", "sampling.temperature": "0.5"})
    assert settings.eval.eval_tokens == 4096 and settings.sampling.temperature == 0.5
    with pytest.raises(ConfigError, match=re.escape("evaluate takes data.*, tokenize.*, eval.*, sampling.* settings, "
                                                    "not model.*: the model's own settings come with the model")):
        build_config(EvaluateSettings, overrides={"model.n_layer": "2"})
    with pytest.raises(ConfigError, match="finetune takes no preset"):
        build_config(FinetuneSettings, "tiny")


def test_malformed_override_pair_and_unknown_preset_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_override_pairs(["max_steps"])
    with pytest.raises(ConfigError, match="Available presets: tiny"):
        build_config(PretrainSettings, "huge")
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(PretrainSettings, DEFAULT_PRESET, tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        build_config(PretrainSettings, DEFAULT_PRESET, broken)


def test_flatten_names_every_field_by_section():
    flat = build_config(PretrainSettings, "tiny").flatten()
    assert flat["model.n_layer"] == 2 and flat["train.max_steps"] == 30
    assert flat["data.text_field"] == "text" and "tokenizer.vocab_size" in flat
    assert all(key.count(".") == 1 for key in flat)


@pytest.mark.parametrize(("modern", "twin", "kept_from_twin"),
                         [("cpu", "cpu-gpt2", {"logit_softcap": 0.0}), ("gpt2-124m-modern", "gpt2-124m", {})])
def test_modern_presets_are_their_twins_with_the_modern_recipe(modern, twin, kept_from_twin):
    modern_config, twin_config = build_config(PretrainSettings, modern), build_config(PretrainSettings, twin)
    for name, value in {**MODERN_RECIPE["model"], **kept_from_twin}.items():
        assert getattr(modern_config.model, name) == value
    for name in ("n_layer", "n_head", "n_embd", "block_size"):
        assert getattr(modern_config.model, name) == getattr(twin_config.model, name)
    assert modern_config.train.optimizer == "muon" and twin_config.train.optimizer == "adamw"
    for name in ("max_steps", "micro_batch_size", "grad_accum_steps", "warmup_steps", "seed"):
        assert getattr(modern_config.train, name) == getattr(twin_config.train, name)  # same data, same tokens
    assert modern_config.tokenizer == twin_config.tokenizer


def test_gpt2_350m_preset_has_about_350m_parameters():
    config = build_config(PretrainSettings, "gpt2-350m")
    with torch.device("meta"):  # counts without allocating 1.4 GB
        model = GPT(dataclasses.replace(config.model, vocab_size=pad_vocab_size(config.tokenizer.vocab_size)))
    assert 340e6 < model.num_parameters() < 370e6
    checkpointed = build_config(PretrainSettings, "gpt2-350m", overrides={"model.activation_checkpointing": "true"})
    assert checkpointed.model.activation_checkpointing


def test_a_training_keeps_its_key_on_another_number_of_processes_that_keeps_the_global_batch():
    two_sharded_ranks = TrainConfig(nproc=2, micro_batch_size=4, parallelism="fsdp")
    assert two_sharded_ranks.trained_settings() == TrainConfig(nproc=1, micro_batch_size=8).trained_settings()
    assert two_sharded_ranks.trained_settings() != TrainConfig(nproc=1, micro_batch_size=4).trained_settings()
    assert TrainConfig(seed=1).trained_settings() != TrainConfig(seed=2).trained_settings()


def test_a_global_batch_decides_the_accumulation_on_any_number_of_processes():
    assert TrainConfig(global_batch_size=64, micro_batch_size=8).grad_accum_steps == 8
    assert TrainConfig(global_batch_size=64, micro_batch_size=8, nproc=4).grad_accum_steps == 2
    assert TrainConfig(grad_accum_steps=3).grad_accum_steps == 3  # 0: as given
