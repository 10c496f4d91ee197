"""Each flow's settings (sections of typed configs), its presets, and the one builder that layers
defaults, a preset, a config file and ``--set`` overrides into them. Validation happens in the
dataclasses, so a typo fails before any stage runs, naming the key (docs/ARCHITECTURE.md, "Settings")."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import tomllib

from gptflow.data.config import IngestConfig, RecordsConfig, TokenizeConfig, TokenizerConfig
from gptflow.data.errors import UserError
from gptflow.model.config import MODERN_RECIPE, EvalConfig, IncrementalConfig, ModelConfig, SamplingConfig, TrainConfig
from gptflow.model.finetune_config import FinetuneConfig

DEFAULT_PRESET = "cpu"


class Settings:
    """What every flow's settings share: a name for messages, its own defaults, a flat view."""

    FLOW: ClassVar[str]
    DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {}
    """The flow's own defaults, over the dataclasses' (and under presets, files and overrides)."""

    def flatten(self) -> dict[str, Any]:
        """``{"model.n_layer": 4, ...}``: one entry per field, as MLflow params are logged."""
        return {
            f"{section}.{name}": value
            for section, fields in dataclasses.asdict(self).items()
            for name, value in fields.items()
        }


@dataclass
class PretrainSettings(Settings):
    FLOW: ClassVar[str] = "pretrain"
    data: IngestConfig = field(default_factory=IngestConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    incremental: IncrementalConfig = field(default_factory=IncrementalConfig)


@dataclass
class FinetuneSettings(Settings):
    """The base model brings its own ``model`` settings; ``train`` drives the fine-tuning loop."""

    FLOW: ClassVar[str] = "finetune"
    # A short run at a higher rate than pretraining's, without weight decay: a LoRA update or a
    # short fine-tune should stay close to the base model, and decay pulls weights to 0, not to it.
    # Answers sample cooler than pretraining's samples.
    DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {
        "data": {"val_fraction": 0.1},
        "train": {"max_steps": 150, "micro_batch_size": 8, "learning_rate": 3e-3, "warmup_steps": 10,
                  "weight_decay": 0.0, "seed": 0, "log_interval": 10, "val_interval": 50, "checkpoint_interval": 50},
        "sampling": {"max_new_tokens": 128, "temperature": 0.7, "top_k": 20},
    }
    UNSUPPORTED_TRAIN: ClassVar[dict[str, str]] = {
        "optimizer": "fine-tuning trains with AdamW", "val_tokens": "fine-tuning validates on its whole val split",
    }
    """``train`` fields the fine-tuning loop does not read yet, and why: set, they are refused."""
    data: RecordsConfig = field(default_factory=RecordsConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        for name, reason in self.UNSUPPORTED_TRAIN.items():
            if getattr(self.train, name) != getattr(TrainConfig(), name):
                raise ConfigError(f"train.{name} is not a fine-tuning setting ({reason}); leave it unset.")

    def data_settings(self, objective: str) -> dict[str, Any]:
        """The settings that shape ``objective``'s prepared examples (and the prepare stage's key):
        their length and split, the fields a labelled or tagged record is read from, and for
        tagging where a span's label is read."""
        settings = {"max_length": self.finetune.max_length, "overlong": self.finetune.overlong,
                    "val_fraction": self.data.val_fraction}
        if objective in ("classification", "tagging"):
            settings["text_field"] = self.data.text_field
        if objective == "classification":
            settings["label_field"] = self.data.label_field
        if objective == "tagging":
            settings["span_label_from"] = self.finetune.span_label_from
        return settings


@dataclass
class EvaluateSettings(Settings):
    """How to read and tokenize the corpus, what to score and how to sample; the model brings its
    own model settings, and nothing is trained."""

    FLOW: ClassVar[str] = "evaluate"
    data: IngestConfig = field(default_factory=IngestConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


SettingsType = TypeVar("SettingsType", bound=Settings)


def _with_modern_recipe(preset: dict[str, dict[str, Any]], model: dict[str, Any] | None = None,
                        **train: Any) -> dict[str, dict[str, Any]]:
    """``preset`` switched to ``model.config.MODERN_RECIPE``, with ``model`` and ``train`` settings on top."""
    return {
        **preset,
        "model": {**preset["model"], **MODERN_RECIPE["model"], **(model or {})},
        "train": {**preset["train"], **MODERN_RECIPE["train"], **train},
    }


# The shape of the cpu presets: 4 layers x 4 heads x 192, context 256, 16 x 256 tokens a step,
# warmup over the first 1/15 of the steps.
_CPU_SHAPE = {
    "tokenizer": {"vocab_size": 8192},
    "model": {"n_layer": 4, "n_head": 4, "n_embd": 192, "block_size": 256},
    "train": {
        "max_steps": 250, "micro_batch_size": 16, "warmup_steps": 17, "log_interval": 25, "val_interval": 100,
        "val_tokens": 32768, "checkpoint_interval": 100,
    },
    "eval": {"eval_tokens": 131072},
}
# The default: the modern recipe without the logit soft-cap, whose tanh over 16 x 256 x 8192 logits
# costs a CPU 40% of each step for 0.02 nats at this size. 250 steps (1.0M tokens, a third of the
# built-in corpus) end at a lower val loss than GPT-2's recipe did in 700, in less than half the
# time (bench/default_job.py). AdamW (embeddings, untied head, norms) at 8e-3 and Muon at 0.02:
# the best of the CPU sweep in bench/RESULTS.md.
_CPU = _with_modern_recipe(_CPU_SHAPE, model={"logit_softcap": 0.0}, learning_rate=8e-3, muon_learning_rate=0.02)
# GPT-2 small (124M) for one GPU: 12 layers x 12 heads x 768, context 1024, GPT-2's vocab size
# (the model pads it to 50304), ~0.5M tokens per optimizer step.
_GPT2_124M = {
    "tokenizer": {"vocab_size": 50257, "sample_bytes": 256 * 1024 * 1024},
    "model": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024},
    "train": {
        "max_steps": 5000, "micro_batch_size": 32, "grad_accum_steps": 16, "learning_rate": 6e-4,
        "warmup_steps": 500, "compile": True, "log_interval": 10, "val_interval": 500,
        "val_tokens": 1 << 20, "checkpoint_interval": 1000,
    },
    "eval": {"eval_tokens": 1 << 22},
    "sampling": {"max_new_tokens": 128},
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # Seconds on a laptop: exercises every stage; for tests and smoke runs, learns little.
    "tiny": {
        "tokenizer": {"vocab_size": 512, "sample_bytes": 256 * 1024},
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64},
        "train": {
            "max_steps": 30, "micro_batch_size": 8, "learning_rate": 3e-3, "warmup_steps": 5,
            "log_interval": 5, "val_interval": 15, "val_tokens": 2048, "checkpoint_interval": 15,
        },
        "eval": {"eval_tokens": 4096},
        "sampling": {"max_new_tokens": 16},
    },
    "cpu": _CPU,
    # GPT-2's recipe (learned positions, LayerNorm, GELU, tied head, AdamW) on the cpu preset's
    # shape and tokens, to compare recipes on a CPU; at 4e-3, its best rate in the CPU sweep. The
    # cpu preset trained it until issue 28, for 700 steps at 2e-3.
    "cpu-gpt2": {**_CPU_SHAPE, "train": {**_CPU_SHAPE["train"], "learning_rate": 4e-3}},
    "gpt2-124m": _GPT2_124M,
    # GPT-2 small's shape and token budget with the modern recipe. Muon at 0.02 (spectral-norm
    # scale, the speedrun's value at this width); AdamW keeps 6e-4 for embeddings and the head.
    "gpt2-124m-modern": _with_modern_recipe(_GPT2_124M, muon_learning_rate=0.02),
    # GPT-2 medium (~355M: 24 layers x 16 heads x 1024, context 1024), ~0.5M tokens per step at
    # GPT-3's learning rate for this size, ~7B tokens (~20 per parameter, like gpt2-124m's 2.6B).
    # On a GPU with less memory, --set model.activation_checkpointing=true trades about a third
    # more compute for most of the activation memory.
    "gpt2-350m": {
        **_GPT2_124M,
        "model": {"n_layer": 24, "n_head": 16, "n_embd": 1024, "block_size": 1024},
        "train": {**_GPT2_124M["train"], "max_steps": 13500, "micro_batch_size": 16, "grad_accum_steps": 32,
                  "learning_rate": 3e-4, "warmup_steps": 700},
    },
    # ~1.3B (24 layers x 16 heads x 2048, context 2048; GPT-3 XL's shape): its float32 weights,
    # gradients and AdamW state (16 bytes a parameter, ~21 GB) outgrow one GPU beside its
    # activations, so FSDP shards them over the ranks and each block's activations are recomputed
    # in the backward pass. ~1M tokens per step on 8 GPUs (8 x 2048 x 8 per rank), GPT-3 XL's
    # learning rate, 25,000 steps: ~26B tokens, ~20 per parameter.
    "gpt-1b": {
        **_GPT2_124M,
        "model": {"n_layer": 24, "n_head": 16, "n_embd": 2048, "block_size": 2048, "activation_checkpointing": True},
        "train": {**_GPT2_124M["train"], "parallelism": "fsdp", "max_steps": 25000, "micro_batch_size": 8,
                  "grad_accum_steps": 8, "learning_rate": 2e-4, "warmup_steps": 500, "val_interval": 1000,
                  "checkpoint_interval": 1000},
    },
}


# The preset names as a type, so a deployment's `preset` parameter is validated and offered as a
# choice in the Prefect UI.
PresetName = Literal[tuple(PRESETS)]


class ConfigError(UserError):
    """A preset, config file or override that cannot be applied; the message says which."""


def build_config(
    settings_type: type[SettingsType],
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> SettingsType:
    """``settings_type`` built from its defaults, the flow's own defaults, ``preset`` (pretraining
    only), ``config_file`` and ``overrides``, in that order."""
    flow = settings_type.FLOW
    layers: list[tuple[str, dict[str, dict[str, Any]]]] = [(f"{flow} defaults", settings_type.DEFAULTS)]
    if preset is not None:
        if settings_type is not PretrainSettings:
            raise ConfigError(f"Presets configure pretraining; {flow} takes no preset.")
        if preset not in PRESETS:
            raise ConfigError(f"Unknown preset {preset!r}. Available presets: {', '.join(PRESETS)}.")
        layers.append((f"preset {preset!r}", PRESETS[preset]))
    if config_file is not None:
        layers.append((f"config file {config_file}", _read_config_file(Path(config_file))))
    if overrides:
        layers.append(("--set overrides", _nest_overrides(overrides)))

    hints = typing.get_type_hints(settings_type)
    section_types = {section.name: hints[section.name] for section in dataclasses.fields(settings_type)}
    sections = {name: dataclasses.asdict(section_type()) for name, section_type in section_types.items()}
    for origin, layer in layers:
        for section, values in layer.items():
            for name in values if isinstance(values, dict) else ():
                if (renamed := RENAMED_SETTINGS.get(f"{section}.{name}")) is not None:
                    raise ConfigError(f"{origin}: {section}.{name} is now {renamed}, the one name every flow uses.")
            if section not in sections:
                model_note = ": the model's own settings come with the model" if section == "model" else ""
                raise ConfigError(f"{origin}: {flow} takes {', '.join(f'{name}.*' for name in sections)} settings, "
                                  f"not {section}.*{model_note}.")
            if not isinstance(values, dict):
                raise ConfigError(f"{origin}: section {section!r} must be a table of fields.")
            for name, value in values.items():
                sections[section][name] = _coerce(section_types[section], section, name, value, origin)
    try:
        return settings_type(**{name: section_types[name](**values) for name, values in sections.items()})
    except ValueError as error:
        raise ConfigError(str(error)) from None


RENAMED_SETTINGS = {
    "finetune.text_field": "data.text_field",
    "finetune.label_field": "data.label_field",
    "finetune.val_fraction": "data.val_fraction",
    "eval.label_field": "data.label_field",
}
"""Settings that became another's: refused with a message naming the new one."""

EvalSplit = Literal["train", "val", "all"]
"""Which documents of a corpus the evaluate flow scores: its train split, its val split, or both."""


def parse_override_pairs(pairs: list[str]) -> dict[str, str]:
    """``["train.max_steps=100"]`` → ``{"train.max_steps": "100"}`` (values are coerced later)."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"Override {pair!r} must look like section.field=value, e.g. train.max_steps=200.")
        parsed[key.strip()] = value.strip()
    return parsed


def _read_config_file(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(path.read_text())
        if path.suffix == ".json":
            return json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"Config file {path} is not valid {path.suffix[1:].upper()}: {error}") from None
    raise ConfigError(f"Config file {path} must be .toml or .json.")


def _nest_overrides(overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    nested: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if not name:
            raise ConfigError(f"Override key {key!r} must look like section.field, e.g. train.max_steps.")
        nested.setdefault(section, {})[name] = value
    return nested


def _coerce(section_type: type, section: str, name: str, value: Any, origin: str) -> Any:
    hints = typing.get_type_hints(section_type)
    if name not in hints:
        raise ConfigError(
            f"{origin}: {section}.{name} is not a setting; {section} has: {', '.join(hints)}."
        )
    target = hints[name]
    try:
        return _coerce_value(target, value)
    except (TypeError, ValueError):
        raise ConfigError(f"{origin}: {section}.{name}={value!r} is not a valid {_type_name(target)}.") from None


def _coerce_value(target: Any, value: Any) -> Any:
    origin = typing.get_origin(target)
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(target) if arg is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce_value(options[0], value)
    if origin is list:
        items = json.loads(value) if isinstance(value, str) else value
        if not isinstance(items, list):
            raise TypeError
        return [_coerce_value(typing.get_args(target)[0], item) for item in items]
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError
    if target is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
    if target is float:
        return float(value)
    if target is str:
        return str(value)
    raise TypeError


def _type_name(target: Any) -> str:
    return getattr(target, "__name__", str(target))
