from __future__ import annotations

import pytest

from tasks.config import DEFAULT_PRESET, PRESETS, ConfigError, build_config, parse_override_pairs


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_builds_a_valid_config(preset):
    config = build_config(preset)
    assert config.model.n_embd % config.model.n_head == 0
    assert config.tokenizer.vocab_size >= 512


def test_gpt2_preset_has_gpt2_small_shape():
    model = build_config("gpt2-124m").model
    assert (model.n_layer, model.n_head, model.n_embd, model.block_size) == (12, 12, 768, 1024)


def test_layers_apply_in_order_defaults_preset_file_overrides(tmp_path):
    config_file = tmp_path / "my.toml"
    config_file.write_text("[train]\nmax_steps = 77\nlearning_rate = 0.01\n[model]\nn_layer = 3\n")
    config = build_config("tiny", config_file, {"train.max_steps": "88"})
    assert config.train.max_steps == 88  # override beats file
    assert config.train.learning_rate == 0.01  # file beats preset
    assert config.model.n_layer == 3
    assert config.model.n_embd == PRESETS["tiny"]["model"]["n_embd"]  # preset beats default
    assert config.train.beta2 == 0.95  # default


def test_override_values_are_coerced_to_the_field_type():
    config = build_config(
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
        ("trian.max_steps=3", "unknown section 'trian'"),
        ("train.max_steps=abc", "train.max_steps='abc' is not a valid int"),
        ("train.compile=maybe", "is not a valid bool"),
        ("model.n_head=5", "divisible by model.n_head"),
        ("train.max_steps=0", "train.max_steps must be positive"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config(DEFAULT_PRESET, overrides=parse_override_pairs([override]))


def test_malformed_override_pair_and_unknown_preset_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="section.field=value"):
        parse_override_pairs(["max_steps"])
    with pytest.raises(ConfigError, match="Available presets: tiny"):
        build_config("huge")
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(DEFAULT_PRESET, tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        build_config(DEFAULT_PRESET, broken)


def test_flatten_names_every_field_by_section():
    flat = build_config("tiny").flatten()
    assert flat["model.n_layer"] == 2 and flat["train.max_steps"] == 30
    assert flat["data.text_field"] == "text" and "tokenizer.vocab_size" in flat
    assert all(key.count(".") == 1 for key in flat)
