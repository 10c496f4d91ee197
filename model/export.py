"""Export a gptflow model as a Hugging Face transformers folder.

The folder loads with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``
and computes the same logits as the gptflow model. It is written with torch, safetensors and json
only: transformers is needed to load it, not to write it.

Each recipe maps to the transformers architecture that computes exactly the same function:

- GPT-2's recipe (learned positions, LayerNorm, GELU, no QK-norm, no soft-cap) → ``GPT2LMHeadModel``.
  The parameter names are already GPT-2's. GPT-2 multiplies by ``Conv1D`` matrices stored
  (in, out), the transpose of ``nn.Linear``'s (out, in); it always has biases, written as zeros
  for a ``bias=False`` model; and its activation is set to ``gelu`` (the exact erf GELU of
  ``F.gelu``), not GPT-2's default ``gelu_new`` (the tanh approximation).
- Rotary positions, RMSNorm and SwiGLU → ``LlamaForCausalLM``, ``Qwen2ForCausalLM`` with biases on
  the query, key and value projections alone (``qkv_bias``), or ``Qwen3ForCausalLM`` with QK-norm
  (Qwen3 RMS-normalises each head's queries and keys before the rotation, as gptflow does). The
  fused projections are split: ``c_attn`` rows [q; k; v] into ``q_proj``, ``k_proj``, ``v_proj``,
  ``c_fc`` rows [gate; value] into ``gate_proj``, ``up_proj``. gptflow rotates the pairs
  (x[i], x[i + hs/2]), which is transformers' ``rotate_half`` convention, with the same
  frequencies, so queries and keys need no permutation.

Other recipes (ReLU², logit soft-capping, ...) have no equivalent architecture yet and raise an
``ExportError`` naming the switches in the way. Dropout is carried over where the architecture has
it (Llama and Qwen3 have attention dropout only); it does not change inference.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from gptflow.data.errors import UserError
from gptflow.data.tokenizer import EOT_TOKEN, PAD_TOKEN, load_tokenizer
from gptflow.model.config import ModelConfig, SamplingConfig
from gptflow.model.gpt import GPT, INIT_STD

WEIGHTS_FILE = "model.safetensors"
Weights = dict[str, torch.Tensor]


class ExportError(UserError):
    """The model cannot be exported as asked; the message says which switches or paths are in the way."""


@dataclass(frozen=True)
class Architecture:
    """A transformers architecture and the ``ModelConfig`` switch values it computes exactly."""

    name: str
    switches: dict[str, Any]
    config: Callable[[ModelConfig], dict[str, Any]]
    weights: Callable[[Weights, ModelConfig], Weights]
    """Our state dict (consumed: every entry is popped) → the architecture's."""


def export_to_transformers(model: GPT, tokenizer_file: Path, out_dir: Path) -> str:
    """Write ``model`` and its tokenizer as a transformers folder at ``out_dir``; returns the
    architecture's class name.

    ``out_dir`` must not exist or be empty: the folder is filled under a temporary name beside it
    and renamed into place, so a failed export leaves nothing behind, and nothing is overwritten.
    """
    architecture = architecture_for(model.config)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} already exists and is not empty: export to a new directory, or delete it first.")
    tokenizer = load_tokenizer(tokenizer_file)
    eot_id, pad_id = tokenizer.token_to_id(EOT_TOKEN), tokenizer.token_to_id(PAD_TOKEN)
    if eot_id is None or pad_id is None:
        raise ExportError(f"{tokenizer_file} is not a gptflow tokenizer: it lacks {EOT_TOKEN} and {PAD_TOKEN}.")

    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    weights = architecture.weights(state, model.config)
    if state:
        raise ExportError(f"parameters {', '.join(sorted(state))} have no place in {architecture.name}: "
                          "export a plain gptflow model (merge any adapters into it first).")
    config = {
        "architectures": [architecture.name],
        **architecture.config(model.config),
        "tie_word_embeddings": model.config.tie_embeddings,
        "initializer_range": INIT_STD,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": pad_id,
        "dtype": dtype,
    }
    sampling = SamplingConfig()
    # Documents start after an end-of-text token in training, so generation should too; the
    # tokenizer does not add it (ids stay gptflow's): prompts start with tokenizer.bos_token.
    generation = {"bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": pad_id, "do_sample": True,
                  "temperature": sampling.temperature, "top_k": sampling.top_k}
    special_tokens = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "pad_token": PAD_TOKEN}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_tokens,
        "model_max_length": model.config.block_size,
        # Byte-level BPE gives back the exact text; the clean-up would drop spaces before punctuation.
        "clean_up_tokenization_spaces": False,
    }

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    try:
        safetensors.torch.save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        for name, content in (("config.json", config), ("generation_config.json", generation),
                              ("tokenizer_config.json", tokenizer_config), ("special_tokens_map.json", special_tokens)):
            (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        os.rename(tmp, out_dir)  # replaces an empty directory; fails rather than overwrite a full one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return architecture.name


def architecture_for(config: ModelConfig) -> Architecture:
    """The architecture that computes exactly what ``config``'s model computes, or an
    ``ExportError`` naming the switches that keep it from the nearest one."""
    def mismatches(architecture: Architecture) -> list[str]:
        return [name for name, value in architecture.switches.items() if getattr(config, name) != value]

    candidates = [(architecture, mismatches(architecture)) for architecture in ARCHITECTURES]
    fewest = min(len(differing) for _, differing in candidates)
    nearest = []
    for architecture, differing in candidates:
        if not differing:
            return architecture
        if len(differing) == fewest:
            need = _settings({name: architecture.switches[name] for name in differing}, prefix="model.")
            have = _settings({name: getattr(config, name) for name in differing}, prefix="model.")
            nearest.append(f"{architecture.name} needs {need} (the model has {have}).")
    supported = "; ".join(f"{architecture.name} ({_settings(architecture.switches)})" for architecture in ARCHITECTURES)
    raise ExportError(
        "This model is not exportable yet: no transformers architecture computes its recipe. "
        f"Nearest: {' Or '.join(nearest)} Exportable recipes: {supported}."
    )


def _settings(switches: dict[str, Any], prefix: str = "") -> str:
    """Switch values as they are written on the command line: ``model.qk_norm=false, ...``."""
    return ", ".join(
        f"{prefix}{name}={str(value).lower() if isinstance(value, bool) else value}" for name, value in switches.items()
    )


# --- GPT-2 -----------------------------------------------------------------------------------

# GPT-2's Conv1D layers: their weights are stored transposed.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _gpt2_config(config: ModelConfig) -> dict[str, Any]:
    return {
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.mlp_width,
        # "gelu" is the exact erf GELU of F.gelu, "gelu_new" the tanh approximation.
        "activation_function": "gelu_new" if config.mlp == "gelu_tanh" else "gelu",
        "layer_norm_epsilon": config.norm_eps,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "resid_pdrop": config.dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
    }


def _gpt2_weights(state: Weights, config: ModelConfig) -> Weights:
    if config.tie_embeddings:
        state.pop("lm_head.weight")  # the same tensor as transformer.wte.weight
    weights = {}
    for name in list(state):
        tensor = state.pop(name)
        weights[name] = tensor.t().contiguous() if name.endswith(_CONV1D) else tensor
        # Every GPT-2 linear layer and LayerNorm has a bias: zero when this model has none.
        has_bias = name.startswith(("transformer.h.", "transformer.ln_f.")) and name.endswith(".weight")
        if has_bias and not config.bias:
            weights[name.removesuffix("weight") + "bias"] = torch.zeros(weights[name].shape[-1], dtype=tensor.dtype)
    return weights


# --- Llama and Qwen3 -------------------------------------------------------------------------

def _llama_config(config: ModelConfig) -> dict[str, Any]:
    return {
        "model_type": "llama",
        **_rotary_decoder_config(config),
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
    }


def _qwen3_config(config: ModelConfig) -> dict[str, Any]:
    return {
        "model_type": "qwen3",
        **_rotary_decoder_config(config),
        "attention_bias": False,
        "use_sliding_window": False,
        "layer_types": ["full_attention"] * config.n_layer,
    }


def _qwen2_config(config: ModelConfig) -> dict[str, Any]:
    return {
        "model_type": "qwen2",
        **_rotary_decoder_config(config),
        "use_sliding_window": False,
        "layer_types": ["full_attention"] * config.n_layer,
    }


def _rotary_decoder_config(config: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_width,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        # rope_parameters for transformers 5, rope_theta for 4.x.
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_theta": config.rope_theta,
        "attention_dropout": config.dropout,
    }


def _rotary_decoder_weights(state: Weights, config: ModelConfig) -> Weights:
    """Llama's names (Qwen3's are the same plus ``q_norm`` / ``k_norm``), fused matrices split."""
    weights = {
        "model.embed_tokens.weight": state.pop("transformer.wte.weight"),
        "model.norm.weight": state.pop("transformer.ln_f.weight"),
    }
    head = state.pop("lm_head.weight")  # tied: the same tensor as the embedding
    if not config.tie_embeddings:
        weights["lm_head.weight"] = head
    query_rows, kv_rows = config.n_head * config.head_size, config.kv_heads * config.head_size
    attention_rows = (query_rows, kv_rows, kv_rows)
    for layer in range(config.n_layer):
        ours, theirs = f"transformer.h.{layer}.", f"model.layers.{layer}."
        weights[theirs + "input_layernorm.weight"] = state.pop(ours + "ln_1.weight")
        weights[theirs + "post_attention_layernorm.weight"] = state.pop(ours + "ln_2.weight")
        if config.qk_norm:
            weights[theirs + "self_attn.q_norm.weight"] = state.pop(ours + "attn.q_norm.weight")
            weights[theirs + "self_attn.k_norm.weight"] = state.pop(ours + "attn.k_norm.weight")
        for kind in ("weight", "bias") if config.bias else ("weight",):
            q, k, v = state.pop(f"{ours}attn.c_attn.{kind}").split(attention_rows)
            gate, up = state.pop(f"{ours}mlp.c_fc.{kind}").chunk(2)
            split = {
                "self_attn.q_proj": q, "self_attn.k_proj": k, "self_attn.v_proj": v,
                "self_attn.o_proj": state.pop(f"{ours}attn.c_proj.{kind}"),
                "mlp.gate_proj": gate, "mlp.up_proj": up, "mlp.down_proj": state.pop(f"{ours}mlp.c_proj.{kind}"),
            }
            # clone: safetensors refuses views that share one storage.
            weights.update({f"{theirs}{module}.{kind}": tensor.clone() for module, tensor in split.items()})
        if config.qkv_bias and not config.bias:
            for module, tensor in zip(("q_proj", "k_proj", "v_proj"),
                                      state.pop(f"{ours}attn.c_attn.bias").split(attention_rows)):
                weights[f"{theirs}self_attn.{module}.bias"] = tensor.clone()
    return weights


def _rotary_swiglu(qk_norm: bool, qkv_bias: bool = False) -> dict[str, Any]:
    return {"position": "rotary", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": qk_norm, "logit_softcap": 0.0,
            "qkv_bias": qkv_bias}


def _gpt2(mlp: str) -> Architecture:
    # GPT-2's heads are n_embd / n_head wide, one key/value head per query head.
    switches = {"position": "learned", "norm": "layernorm", "mlp": mlp, "qk_norm": False, "logit_softcap": 0.0,
                "n_kv_head": None, "head_dim": None, "qkv_bias": False}
    return Architecture("GPT2LMHeadModel", switches, _gpt2_config, _gpt2_weights)


ARCHITECTURES = (
    _gpt2("gelu"),
    _gpt2("gelu_tanh"),
    Architecture("LlamaForCausalLM", _rotary_swiglu(qk_norm=False), _llama_config, _rotary_decoder_weights),
    # Qwen2: biases on the query, key and value projections only.
    Architecture("Qwen2ForCausalLM", {**_rotary_swiglu(qk_norm=False, qkv_bias=True), "bias": False}, _qwen2_config,
                 _rotary_decoder_weights),
    # Qwen3's MLP has no biases.
    Architecture("Qwen3ForCausalLM", {**_rotary_swiglu(qk_norm=True), "bias": False}, _qwen3_config,
                 _rotary_decoder_weights),
)
