"""How many parameters a configuration builds and how much GPU memory training it takes per GPU,
from the settings alone (no torch, nothing allocated): what ``gptflow presets`` prints.

The states are exact byte counts of what the trainer keeps: float32 weights and gradients (bf16
autocast computes in bf16 but keeps float32 masters), AdamW's two float32 moments, Muon's one
momentum for the matrices inside the blocks. Activations are an estimate (Korthikanti et al., 2022,
"Reducing Activation Recomputation in Large Transformer Models", with attention scores never
stored, as ``scaled_dot_product_attention`` does): about 34 bytes per token and width per block in
bf16, plus the logits and their float32 loss. The allocator's fragmentation and the CUDA context
(~1 GiB) come on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gptflow.model.config import PARALLELISMS, ModelConfig, TrainConfig

FLOAT32_BYTES = 4
BF16_BYTES = 2
ACTIVATION_BYTES_PER_TOKEN_WIDTH_BF16 = 34
"""Stored activations of one block per token and per unit of width, in bf16 (the paper's 34·s·b·h)."""
LOGIT_BYTES = BF16_BYTES + 2 * FLOAT32_BYTES
"""Per logit: the bf16 logits, their float32 copy in the loss and its gradient."""
BLOCKS_GATHERED_BY_FSDP = 2
"""Blocks whose whole weights an FSDP rank holds at once: the one computing and the next, prefetched
(in the compute dtype); one block's whole float32 gradients wait for their reduce-scatter."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one GPU holds while training."""

    parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


def block_matrix_parameters(config: ModelConfig) -> int:
    """Weights of the linear layers of one transformer block (what Muon trains)."""
    width, hidden = config.n_embd, config.mlp_width
    query, kv = config.n_head * config.head_size, config.kv_heads * config.head_size
    fc_outputs = 2 * hidden if config.mlp == "swiglu" else hidden
    return width * (query + 2 * kv) + query * width + width * fc_outputs + hidden * width


def block_parameters(config: ModelConfig) -> int:
    """Every parameter of one transformer block: matrices, biases, norms."""
    width, hidden = config.n_embd, config.mlp_width
    query, kv = config.n_head * config.head_size, config.kv_heads * config.head_size
    fc_outputs = 2 * hidden if config.mlp == "swiglu" else hidden
    biases = (query + 2 * kv + width + fc_outputs + width) if config.bias else 0
    biases += query + 2 * kv if config.qkv_bias and not config.bias else 0
    qk_norms = 2 * config.head_size if config.qk_norm else 0
    return block_matrix_parameters(config) + biases + 2 * _norm_parameters(config) + qk_norms


def parameter_count(config: ModelConfig) -> int:
    """Parameters of ``model.gpt.GPT(config)``, a tied embedding counted once; ``config.vocab_size``
    must be set (``model.config.pad_vocab_size`` of the tokenizer's)."""
    if config.vocab_size is None:
        raise ValueError("model.vocab_size is not set: pad the tokenizer's vocabulary size first")
    embeddings = config.vocab_size * config.n_embd * (1 if config.tie_embeddings else 2)
    positions = config.block_size * config.n_embd if config.position == "learned" else 0
    return embeddings + positions + config.n_layer * block_parameters(config) + _norm_parameters(config)


def training_memory(
    model: ModelConfig, train: TrainConfig, parallelism: str = "ddp", gpus: int = 1, on_gpu: bool = True
) -> MemoryEstimate:
    """Per-GPU memory of training ``model`` with ``train``'s micro batch: ``ddp`` keeps every state
    whole on each GPU; ``fsdp`` shards weights, gradients and optimizer states over ``gpus`` and
    gathers a block's weights at a time. ``on_gpu``: ``train.dtype=auto`` means bf16 autocast."""
    if parallelism not in PARALLELISMS:
        raise ValueError(f"parallelism must be one of {', '.join(PARALLELISMS)}, got {parallelism!r}")
    if gpus < 1:
        raise ValueError(f"gpus must be at least 1, got {gpus}")
    parameters = parameter_count(model)
    muon_parameters = model.n_layer * block_matrix_parameters(model) if train.optimizer == "muon" else 0
    optimizer = FLOAT32_BYTES * (muon_parameters + 2 * (parameters - muon_parameters))
    weights = gradients = FLOAT32_BYTES * parameters
    bf16 = train.dtype == "bfloat16" or (train.dtype == "auto" and on_gpu)
    if parallelism == "fsdp":
        compute_bytes = BF16_BYTES if bf16 else FLOAT32_BYTES
        weights = math.ceil(weights / gpus) + BLOCKS_GATHERED_BY_FSDP * compute_bytes * block_parameters(model)
        gradients = math.ceil(gradients / gpus) + FLOAT32_BYTES * block_parameters(model)
        optimizer = math.ceil(optimizer / gpus)
    return MemoryEstimate(parameters, weights, gradients, optimizer, _activation_bytes(model, train, bf16))


def _activation_bytes(model: ModelConfig, train: TrainConfig, bf16: bool) -> int:
    element_bytes = BF16_BYTES if bf16 else FLOAT32_BYTES
    tokens = train.micro_batch_size * model.block_size
    one_block = ACTIVATION_BYTES_PER_TOKEN_WIDTH_BF16 * element_bytes // BF16_BYTES * tokens * model.n_embd
    if model.activation_checkpointing:
        # Each block's input is kept; one block's activations live again while it is recomputed.
        blocks = model.n_layer * element_bytes * tokens * model.n_embd + one_block
    else:
        blocks = model.n_layer * one_block
    logits = (LOGIT_BYTES if bf16 else 3 * FLOAT32_BYTES) * tokens * model.vocab_size
    return blocks + logits


def _norm_parameters(config: ModelConfig) -> int:
    if config.norm == "rmsnorm":
        return config.n_embd
    return 2 * config.n_embd if config.bias else config.n_embd
