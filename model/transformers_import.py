"""Read a Hugging Face transformers checkpoint folder as a gptflow model: the inverse of
``model.export``.

Only architectures gptflow computes exactly are read, each mapped onto the ``ModelConfig``
switches that reproduce it (``model.export.ARCHITECTURES`` names the same correspondences the
other way):

- ``GPT2LMHeadModel``: learned positions, LayerNorm with biases, GELU (``gelu_new``, the tanh
  approximation OpenAI's checkpoints use, is ``model.mlp=gelu_tanh``); ``Conv1D`` weights are
  stored (in, out) and transposed into ``nn.Linear``'s (out, in).
- ``LlamaForCausalLM``, ``MistralForCausalLM`` (without a sliding window shorter than the
  context), ``Qwen2ForCausalLM`` (query/key/value biases: ``model.qkv_bias``) and
  ``Qwen3ForCausalLM`` (QK-norm): rotary positions, RMSNorm, SwiGLU, grouped-query attention;
  ``q_proj``, ``k_proj``, ``v_proj`` are stacked into ``c_attn`` and ``gate_proj``, ``up_proj``
  into ``c_fc``. transformers rotates the pairs (x[i], x[i + hs/2]) as gptflow does.

Anything else (another architecture, rope scaling, a sliding window, an activation gptflow lacks)
is a ``CheckpointImportError`` that names what is in the way. Weights are read from
``model.safetensors`` or the shards its ``model.safetensors.index.json`` lists, with safetensors
and json only: transformers is not needed to read a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from gptflow.data.errors import UserError
from gptflow.model.config import ModelConfig
from gptflow.model.gpt import GPT

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
Weights = dict[str, torch.Tensor]

ROTARY_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_ARCHITECTURES = ("GPT2LMHeadModel", *ROTARY_ARCHITECTURES)
# Families whose nearest supported architecture is worth naming in the refusal.
NEAREST = {"gpt": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
           "mixtral": "MistralForCausalLM", "qwen": "Qwen3ForCausalLM", "gemma": "LlamaForCausalLM",
           "phi": "LlamaForCausalLM", "olmo": "LlamaForCausalLM", "smollm": "LlamaForCausalLM"}
# GPT-2's Conv1D layers: their weights are stored (in, out).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_GPT2_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


class CheckpointImportError(UserError):
    """The folder is not a checkpoint gptflow can compute exactly; the message says why and what to do."""


def read_transformers_checkpoint(directory: Path, block_size: int | None = None) -> tuple[ModelConfig, Weights]:
    """The ``ModelConfig`` and gptflow state dict of the transformers checkpoint in ``directory``.
    ``block_size`` caps the context (default: the checkpoint's ``max_position_embeddings``)."""
    directory = Path(directory)
    hf_config = read_checkpoint_config(directory)
    architecture = (hf_config.get("architectures") or ["?"])[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise CheckpointImportError(_unsupported(architecture, directory))
    if architecture == "GPT2LMHeadModel":
        config = _gpt2_config(hf_config, directory, block_size)
        weights = _gpt2_weights(_read_weights(directory), config)
    else:
        config = _rotary_config(hf_config, architecture, directory, block_size)
        weights = _rotary_weights(_read_weights(directory), config, directory)
    return config, weights


def load_transformers_model(directory: Path, block_size: int | None = None) -> GPT:
    """The checkpoint in ``directory`` as a gptflow ``GPT`` in eval mode, on the CPU, float32."""
    config, weights = read_transformers_checkpoint(directory, block_size)
    model = GPT(config)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(weights), set(weights) - expected
    if missing or unexpected:
        raise CheckpointImportError(
            f"the weights in {directory} do not fit {config}: missing {sorted(missing)[:5]}, unexpected "
            f"{sorted(unexpected)[:5]} (a checkpoint whose config.json does not describe its weights)"
        )
    model.load_state_dict({name: tensor.float() for name, tensor in weights.items()})
    return model.eval()


def grow_vocabulary(config: ModelConfig, weights: Weights, rows: int, copied: dict[int, int]) -> tuple[ModelConfig, Weights]:
    """``config`` and ``weights`` with at least ``rows`` embedding (and output) rows, for ids a
    tokenizer added after the checkpoint's: new rows are zero, and ``copied[new id] = existing id``
    makes a new token's rows those of an existing one (a new end-of-text token that behaves as the
    checkpoint's own end token). The logits of the checkpoint's own ids are unchanged."""
    rows = max(rows, config.vocab_size)
    grown = dict(weights)
    for name in ("transformer.wte.weight", "lm_head.weight"):
        table = weights[name]
        extended = torch.cat([table, table.new_zeros(rows - table.size(0), table.size(1))])
        for new, existing in copied.items():
            extended[new] = table[existing]
        grown[name] = extended
    if config.tie_embeddings:
        grown["lm_head.weight"] = grown["transformer.wte.weight"]
    return dataclasses.replace(config, vocab_size=rows), grown


def read_checkpoint_config(directory: Path) -> dict[str, Any]:
    """The checkpoint's ``config.json``, or a ``CheckpointImportError`` saying what the folder lacks."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointImportError(
            f"{directory} has no {CONFIG_FILE}: point at a transformers checkpoint folder (what "
            "save_pretrained writes: config.json, model.safetensors, tokenizer.json)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointImportError(f"{path} is not JSON: {error}") from None


def _read_weights(directory: Path) -> Weights:
    if (directory / WEIGHTS_FILE).is_file():
        files = [directory / WEIGHTS_FILE]
    elif (directory / WEIGHTS_INDEX_FILE).is_file():
        index = json.loads((directory / WEIGHTS_INDEX_FILE).read_text())
        files = [directory / name for name in sorted(set(index["weight_map"].values()))]
    else:
        found = sorted(path.name for path in directory.glob("*.bin")) + sorted(path.name for path in directory.glob("*.pt"))
        hint = (f" It holds {', '.join(found)}: pickled weights, which gptflow does not unpickle; convert them "
                "with transformers (from_pretrained, then save_pretrained writes safetensors).") if found else ""
        raise CheckpointImportError(f"{directory} has no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}.{hint}")
    weights: Weights = {}
    for file in files:
        if not file.is_file():
            raise CheckpointImportError(f"{file}, listed in {directory / WEIGHTS_INDEX_FILE}, is missing")
        weights.update(safetensors.torch.load_file(file))
    return weights


def _unsupported(architecture: str, directory: Path) -> str:
    family = next((name for prefix, name in NEAREST.items() if architecture.lower().startswith(prefix)), None)
    nearest = f" The nearest supported one is {family}; a checkpoint of it imports." if family else ""
    return (f"{directory} holds a {architecture}, which gptflow cannot compute exactly: it imports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}.{nearest}")


def _require(condition: bool, directory: Path, message: str) -> None:
    if not condition:
        raise CheckpointImportError(f"{directory / CONFIG_FILE}: {message}")


# --- GPT-2 -------------------------------------------------------------------------------------


def _gpt2_config(hf: dict[str, Any], directory: Path, block_size: int | None) -> ModelConfig:
    activation = hf.get("activation_function", "gelu_new")
    _require(activation in _GPT2_ACTIVATIONS, directory,
             f"activation_function {activation!r} has no gptflow equivalent (gelu, gelu_new)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        _require(not hf.get(flag, False), directory, f"{flag}=true changes attention in a way gptflow does not compute")
    _require(hf.get("scale_attn_weights", True), directory, "scale_attn_weights=false is not computed by gptflow")
    n_embd = hf["n_embd"]
    return ModelConfig(
        n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=n_embd,
        block_size=min(block_size or hf["n_positions"], hf["n_positions"]), vocab_size=hf["vocab_size"],
        bias=True, mlp=_GPT2_ACTIVATIONS[activation], mlp_hidden=hf.get("n_inner") or 4 * n_embd,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def _gpt2_weights(weights: Weights, config: ModelConfig) -> Weights:
    state: Weights = {}
    for name, tensor in weights.items():
        # attn.bias / attn.masked_bias: causal-mask buffers older checkpoints saved.
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        ours = name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name
        state[ours] = tensor.t().contiguous() if ours.endswith(_CONV1D) else tensor
    # A shorter context keeps the first rows of the position table.
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][: config.block_size]
    if config.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


# --- Llama, Mistral, Qwen2, Qwen3 ------------------------------------------------------------


def _rotary_config(hf: dict[str, Any], architecture: str, directory: Path, block_size: int | None) -> ModelConfig:
    activation = hf.get("hidden_act", "silu")
    _require(activation == "silu", directory, f"hidden_act {activation!r}: gptflow's gated MLP is SwiGLU (silu)")
    # transformers 5 writes rope_parameters; 4.x wrote rope_theta, and rope_scaling when scaled.
    for rope in (hf.get("rope_parameters") or {}, hf.get("rope_scaling") or {}):
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        _require(rope_type == "default", directory,
                 f"rope scaling {rope_type!r} is not computed by gptflow (plain rotary embeddings only)")
    rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    context = hf["max_position_embeddings"]
    context = min(block_size or context, context)
    window = hf.get("sliding_window") if hf.get("use_sliding_window", architecture == "MistralForCausalLM") else None
    _require(window is None or window >= context, directory,
             f"a sliding window of {window} tokens, shorter than the context of {context}, is not computed by "
             f"gptflow: import with a block size of at most {window}")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    bias = bool(hf.get("attention_bias", False))
    if architecture == "LlamaForCausalLM":
        _require(bias == bool(hf.get("mlp_bias", False)), directory,
                 "attention_bias and mlp_bias differ; gptflow has biases in every linear layer or in none")
    qkv_bias = architecture == "Qwen2ForCausalLM"
    return ModelConfig(
        n_layer=hf["num_hidden_layers"], n_head=heads, n_kv_head=hf.get("num_key_value_heads") or heads,
        n_embd=hidden, head_dim=hf.get("head_dim") or hidden // heads, block_size=context,
        vocab_size=hf["vocab_size"], bias=bias and not qkv_bias, qkv_bias=qkv_bias, position="rotary",
        norm="rmsnorm", qk_norm=architecture == "Qwen3ForCausalLM", mlp="swiglu",
        mlp_hidden=hf["intermediate_size"], tie_embeddings=hf.get("tie_word_embeddings", False),
        rope_theta=float(rope_theta), norm_eps=hf.get("rms_norm_eps", 1e-6),
    )


def _rotary_weights(weights: Weights, config: ModelConfig, directory: Path) -> Weights:
    def take(name: str) -> torch.Tensor:
        try:
            return weights.pop(name)
        except KeyError:
            raise CheckpointImportError(f"the weights in {directory} lack {name}") from None

    state = {"transformer.wte.weight": take("model.embed_tokens.weight"), "transformer.ln_f.weight": take("model.norm.weight")}
    state["lm_head.weight"] = state["transformer.wte.weight"] if config.tie_embeddings else take("lm_head.weight")
    weights.pop("lm_head.weight", None)  # a tied checkpoint may store it anyway
    linear_bias = config.bias
    for layer in range(config.n_layer):
        theirs, ours = f"model.layers.{layer}.", f"transformer.h.{layer}."
        state[ours + "ln_1.weight"] = take(theirs + "input_layernorm.weight")
        state[ours + "ln_2.weight"] = take(theirs + "post_attention_layernorm.weight")
        if config.qk_norm:
            state[ours + "attn.q_norm.weight"] = take(theirs + "self_attn.q_norm.weight")
            state[ours + "attn.k_norm.weight"] = take(theirs + "self_attn.k_norm.weight")
        kinds = ("weight", "bias") if linear_bias or config.qkv_bias else ("weight",)
        for kind in kinds:
            state[f"{ours}attn.c_attn.{kind}"] = torch.cat(
                [take(f"{theirs}self_attn.{projection}.{kind}") for projection in ("q_proj", "k_proj", "v_proj")])
        for kind in ("weight", "bias") if linear_bias else ("weight",):
            state[f"{ours}attn.c_proj.{kind}"] = take(f"{theirs}self_attn.o_proj.{kind}")
            state[f"{ours}mlp.c_fc.{kind}"] = torch.cat(
                [take(f"{theirs}mlp.gate_proj.{kind}"), take(f"{theirs}mlp.up_proj.{kind}")])
            state[f"{ours}mlp.c_proj.{kind}"] = take(f"{theirs}mlp.down_proj.{kind}")
    # Rotary tables are derived, never loaded (older checkpoints saved inv_freq buffers).
    left = [name for name in weights if not name.endswith("rotary_emb.inv_freq")]
    if left:
        raise CheckpointImportError(f"the weights in {directory} hold {len(left)} tensors gptflow has no place for, "
                                    f"e.g. {', '.join(sorted(left)[:3])}")
    return state
