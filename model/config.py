"""Typed configuration of the model, the training loop and evaluation.

Every field is documented where it is declared and validated in ``__post_init__``, so a bad
``--set`` override fails before any work starts, with the field's name in the message.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from gptflow.data.config import require

VOCAB_MULTIPLE = 128
POSITIONS = ("learned", "rotary", "sinusoidal")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "gelu_tanh", "relu2", "swiglu")
OPTIMIZERS = ("adamw", "muon")
PARALLELISMS = ("ddp", "fsdp")


def pad_vocab_size(n_tokens: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Embedding rows to allocate for a tokenizer of ``n_tokens``: a multiple of 128 keeps the
    output matmul on fast tensor-core shapes; the extra rows are never targets."""
    return ((n_tokens + multiple - 1) // multiple) * multiple


@dataclass
class ModelConfig:
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention (query) heads per block; must divide ``n_embd`` unless ``head_dim`` is set."""
    n_kv_head: int | None = None
    """Key/value heads (grouped-query attention): each serves ``n_head / n_kv_head`` query heads,
    shrinking the KV cache and the key/value projections by that factor. ``None``: ``n_head``
    (multi-head attention, GPT-2's)."""
    head_dim: int | None = None
    """Width of each attention head; ``None``: ``n_embd / n_head``. Some checkpoints (Qwen3) use
    heads whose widths add up to more than ``n_embd``."""
    n_embd: int = 256
    """Width of the residual stream."""
    block_size: int = 256
    """Context length in tokens."""
    vocab_size: int | None = None
    """Embedding rows. ``None`` in presets: the pipeline fills it from the trained tokenizer,
    padded to a multiple of 128."""
    dropout: float = 0.0
    """Dropout on attention weights and residual branches; 0 for pretraining on enough data."""
    bias: bool = False
    """Biases in linear layers and LayerNorms (GPT-2 had them; without is slightly better)."""
    qkv_bias: bool = False
    """Biases in the query, key and value projections alone (Qwen2's checkpoints have them);
    implied by ``bias``."""
    position: str = "learned"
    """``learned``: GPT-2's table of absolute position embeddings (``wpe``). ``rotary``: rotary
    embeddings (RoPE) applied to queries and keys in every layer, so attention scores depend on
    relative offsets only; no ``wpe`` table. ``sinusoidal``: the original Transformer's fixed
    sines and cosines of geometric frequencies added to the token embeddings: no parameters, and
    each position's vector is a fixed rotation of any earlier one's, a function defined for every
    position (the model still reads at most ``block_size``)."""
    norm: str = "layernorm"
    """``layernorm`` (GPT-2) or ``rmsnorm``: scale by the root mean square only, no centring and
    no bias; cheaper and as good in modern recipes."""
    qk_norm: bool = False
    """RMS-normalise each head's queries and keys (with a learned gain) before attention, which
    bounds the attention logits and lets the hidden matrices take larger steps without spikes."""
    mlp: str = "gelu"
    """MLP activation: ``gelu`` (the exact erf GELU), ``gelu_tanh`` (its tanh approximation, which
    OpenAI's GPT-2 checkpoints were trained with), ``relu2`` (relu(x)², same shape as gelu, a
    little better and cheaper) or ``swiglu`` (gated SiLU; its hidden width is ~8/3·n_embd so that
    its three matrices hold as many parameters as the 4·n_embd MLP's two)."""
    tie_embeddings: bool = True
    """Share one matrix between the token embedding and the output projection (GPT-2). Untied,
    the output projection ``lm_head`` has its own matrix: V·C more parameters, but the input and
    output roles of a token no longer compete for one vector."""
    zero_init_projections: bool = False
    """Start the attention and MLP output projections (``c_proj``) at zero, so every block begins
    as the identity and the stream is not perturbed by random branches; with untied embeddings
    the output projection starts at zero too (the first predictions are uniform). The tied matrix
    is also the input embedding, so it keeps its random initialisation."""
    logit_softcap: float = 0.0
    """Squash output logits smoothly into ``(-cap, cap)`` with ``cap·tanh(logits/cap)``, which
    stops overconfident logits early in training; 0 disables it."""
    mlp_hidden: int | None = None
    """Hidden width of the MLP; ``None``: the recipe's (4·n_embd, or SwiGLU's ~8/3·n_embd rounded
    up to a multiple of 64). Imported checkpoints bring their own."""
    rope_theta: float = 10000.0
    """Base of the rotary frequencies: pair i of a head turns by ``position · theta^(-2i / head size)``."""
    norm_eps: float = 1e-5
    """Epsilon of every LayerNorm and RMSNorm."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of storing them: far less
    activation memory for about a third more compute. Training only."""

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            require(getattr(self, name) > 0, f"model.{name} must be positive, got {getattr(self, name)}")
        require(
            self.head_dim is not None or self.n_embd % self.n_head == 0,
            f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head}), or set model.head_dim",
        )
        for name in ("n_kv_head", "head_dim", "mlp_hidden"):
            value = getattr(self, name)
            require(value is None or value > 0, f"model.{name} must be positive (or unset), got {value}")
        require(
            self.n_head % self.kv_heads == 0,
            f"model.n_kv_head ({self.n_kv_head}) must divide model.n_head ({self.n_head}): each key/value head "
            "serves the same number of query heads",
        )
        require(self.rope_theta > 0, f"model.rope_theta must be positive, got {self.rope_theta}")
        require(self.norm_eps > 0, f"model.norm_eps must be positive, got {self.norm_eps}")
        require(
            self.vocab_size is None or self.vocab_size > 0,
            f"model.vocab_size must be positive, got {self.vocab_size}",
        )
        require(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        for name, choices in (("position", POSITIONS), ("norm", NORMS), ("mlp", MLPS)):
            require(
                getattr(self, name) in choices,
                f"model.{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}",
            )
        require(
            self.position != "rotary" or self.head_size % 2 == 0,
            f"model.position=rotary rotates pairs of dimensions: the head size ({self.head_size}) must be even",
        )
        require(self.logit_softcap >= 0, f"model.logit_softcap must be >= 0 (0 disables it), got {self.logit_softcap}")


    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_head``, or ``n_head`` when unset."""
        return self.n_kv_head or self.n_head

    @property
    def head_size(self) -> int:
        """Width of each attention head: ``head_dim``, or ``n_embd / n_head`` when unset."""
        return self.head_dim or self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        """Hidden width of the MLP: ``mlp_hidden``, or the recipe's."""
        if self.mlp_hidden:
            return self.mlp_hidden
        return 64 * math.ceil(8 * self.n_embd / 3 / 64) if self.mlp == "swiglu" else 4 * self.n_embd

@dataclass
class TrainConfig:
    max_steps: int = 2000
    """Optimizer steps to train for."""
    micro_batch_size: int = 16
    """Sequences per forward/backward pass."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step; tokens/step = micro_batch * accum * nproc * block."""
    global_batch_size: int = 0
    """Sequences per optimizer step over all ranks. Set, it decides ``grad_accum_steps``
    (``global_batch_size / (micro_batch_size · nproc)``, which must be whole), so the step stays
    the same size on any number of processes; 0: ``grad_accum_steps`` as given."""
    learning_rate: float = 1e-3
    """Peak learning rate, reached after warmup."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine decay, as a fraction of the peak."""
    warmup_steps: int = 100
    """Steps of linear warmup from 0 to the peak learning rate."""
    weight_decay: float = 0.1
    """Decoupled weight decay of matrices (not norms, biases): each step shrinks them by
    ``lr · weight_decay``, with ``lr`` the AdamW learning rate of the step, also for Muon's
    matrices, whose larger steps would otherwise decay them far faster."""
    optimizer: str = "adamw"
    """``adamw`` for every parameter, or ``muon``: Muon (orthogonalised momentum) for the 2-D
    matrices inside the transformer blocks, AdamW for embeddings, the output projection, norms
    and biases."""
    muon_learning_rate: float = 0.02
    """Peak Muon learning rate, for ``optimizer=muon``. It follows the same warmup and decay as
    ``learning_rate``. Updates are orthogonalised (every singular value ≈ 1) and scaled by
    sqrt(max(1, fan_out / fan_in)), so this is roughly the spectral norm of a step."""
    muon_momentum: float = 0.95
    """Muon's Nesterov momentum coefficient."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    seed: int = 1337
    """Seeds initialisation and the data order: the same seed gives the same run."""
    device: str = "auto"
    """``auto`` (CUDA, then MPS, then CPU), or an explicit torch device string."""
    dtype: str = "auto"
    """Autocast dtype: ``auto`` (bf16 on CUDA, float32 elsewhere), ``bfloat16`` or ``float32``. A run
    is tagged with what it used (``gptflow.precision``)."""
    compile: bool = False
    """Wrap the model in ``torch.compile`` (worth it on GPU for long runs)."""
    log_interval: int = 10
    """Steps between training-metric reports (the loss is read from the device only then)."""
    val_interval: int = 250
    """Steps between validation passes (always after the last step too); 0: only after the last."""
    val_tokens: int = 65536
    """Validation tokens per validation pass of pretraining, in windows spread evenly over the val
    split as ``eval.eval_tokens`` are (fine-tuning scores its whole val split)."""
    checkpoint_interval: int = 250
    """Steps between checkpoints; the final step always writes one."""
    keep_checkpoints: int = 2
    """Most recent periodic checkpoints to keep on disk."""
    nproc: int = 1
    """Processes (one GPU each) training data-parallel, launched with torchrun; each takes
    ``micro_batch_size`` sequences per micro-step, so the global batch grows with ``nproc``."""
    parallelism: str = "ddp"
    """How ``nproc`` processes share the model. ``ddp``: every rank holds the whole model and
    optimizer state, gradients are all-reduced. ``fsdp``: FSDP2 shards parameters, gradients and
    AdamW state over the ranks, one unit per transformer block (bf16 compute with fp32 gradient
    reduction on CUDA); checkpoints are sharded (``torch.distributed.checkpoint``) and resume at
    any world size. With one process there is nothing to shard and both train the same."""

    def trained_settings(self) -> dict[str, Any]:
        """The settings that decide what is trained, for a cache key. Each micro-step trains on
        ``micro_batch_size · nproc`` sequences however many ranks share them and whether they shard
        the model (the same steps up to float rounding), so those count as their product: the
        training keeps its key, and resumes from its checkpoints, on another number of processes
        that keeps the product."""
        settings = asdict(self)
        settings["global_micro_batch"] = settings.pop("micro_batch_size") * settings.pop("nproc")
        del settings["parallelism"]
        return settings

    def __post_init__(self) -> None:
        for name in ("max_steps", "micro_batch_size", "grad_accum_steps", "log_interval", "val_tokens",
                     "checkpoint_interval", "keep_checkpoints", "nproc"):
            require(getattr(self, name) > 0, f"train.{name} must be positive, got {getattr(self, name)}")
        require(self.global_batch_size >= 0, f"train.global_batch_size must be >= 0, got {self.global_batch_size}")
        if self.global_batch_size:
            per_micro_step = self.micro_batch_size * self.nproc
            require(
                self.global_batch_size % per_micro_step == 0,
                f"train.global_batch_size={self.global_batch_size} does not split into micro-steps of "
                f"train.micro_batch_size x train.nproc = {self.micro_batch_size} x {self.nproc} = {per_micro_step} "
                "sequences: choose a global batch that is a multiple of that, or a micro_batch_size or process "
                "count that divides it",
            )
            self.grad_accum_steps = self.global_batch_size // per_micro_step
        for name in ("warmup_steps", "val_interval"):
            require(getattr(self, name) >= 0, f"train.{name} must be >= 0, got {getattr(self, name)}")
        require(self.learning_rate > 0, f"train.learning_rate must be positive, got {self.learning_rate}")
        require(
            self.optimizer in OPTIMIZERS,
            f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}",
        )
        require(
            self.parallelism in PARALLELISMS,
            f"train.parallelism must be one of {', '.join(PARALLELISMS)}, got {self.parallelism!r}",
        )
        require(
            not (self.parallelism == "fsdp" and self.optimizer == "muon"),
            "train.parallelism=fsdp shards each matrix over the ranks, but Muon orthogonalises whole matrices: "
            "use train.optimizer=adamw with fsdp, or train.parallelism=ddp with muon",
        )
        require(
            self.muon_learning_rate > 0, f"train.muon_learning_rate must be positive, got {self.muon_learning_rate}"
        )
        require(0.0 <= self.muon_momentum < 1.0, f"train.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        require(0.0 <= self.min_lr_ratio <= 1.0, f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        require(self.grad_clip >= 0, f"train.grad_clip must be >= 0, got {self.grad_clip}")
        require(self.seed >= 0, f"train.seed must be >= 0, got {self.seed}")
        require(
            self.dtype in ("auto", "bfloat16", "float32"),
            f"train.dtype must be auto, bfloat16 or float32, got {self.dtype!r}",
        )



@dataclass
class IncrementalConfig:
    extra_tokens: int = 0
    """Training tokens for continuing a model on a grown corpus; 0: enough to draw each new
    token about once at ``new_data_fraction`` (new tokens / new_data_fraction)."""
    new_data_fraction: float = 0.5
    """Share of the continuation's training windows drawn from new files; the rest replays the
    data the model already saw, so it does not forget it."""

    def __post_init__(self) -> None:
        if self.extra_tokens < 0:
            raise ValueError(f"incremental.extra_tokens must be >= 0, got {self.extra_tokens}")
        if not 0.0 < self.new_data_fraction <= 1.0:
            raise ValueError(f"incremental.new_data_fraction must be in (0, 1], got {self.new_data_fraction}")

@dataclass
class EvalConfig:
    eval_tokens: int = 262144
    """Tokens scored for the final loss, perplexity and bits per byte, in windows spread evenly
    over the split (every token when the split is no longer)."""
    prompts: list[str] = field(default_factory=lambda: ["def ", "import ", "class Parser:\n    def "])
    """Prompts for sample generations (sampled with the ``sampling`` settings)."""

    def __post_init__(self) -> None:
        require(self.eval_tokens > 0, f"eval.eval_tokens must be positive, got {self.eval_tokens}")


@dataclass
class SamplingConfig:
    """How text is sampled from a model: evaluation samples, ``gptflow generate``, a fine-tuned
    model's answers and the ``predict`` params of every logged MLflow model."""

    max_new_tokens: int = 96
    """The most tokens generated per prompt (an answer also stops at its end token)."""
    temperature: float = 0.8
    """Sampling temperature; lower is more conservative."""
    top_k: int = 50
    """Sample only among the k most likely tokens; 0 disables the cut."""
    seed: int = 0
    """Seeds sampling: the same prompt and seed give the same text."""

    def __post_init__(self) -> None:
        require(self.max_new_tokens >= 0, f"sampling.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        require(self.temperature > 0, f"sampling.temperature must be positive, got {self.temperature}")
        require(self.top_k >= 0, f"sampling.top_k must be >= 0, got {self.top_k}")
        require(self.seed >= 0, f"sampling.seed must be >= 0, got {self.seed}")

    @property
    def top_k_or_none(self) -> int | None:
        """``top_k`` as ``GPT.generate`` takes it: None for no cut."""
        return self.top_k or None


# The modern recipe, as ModelConfig and TrainConfig overrides: rotary positions, RMSNorm, QK-norm,
# ReLU² MLP (GPT-2's MLP shape, so the same FLOPs per token as the baseline), untied head,
# zero-initialised output projections, logits soft-capped at 15 (a ±15 range still allows
# p ≈ 1; the speedrun found 15 better than 30), and Muon for the hidden matrices. The presets
# that use it and the GPU benchmark read it from here.
MODERN_RECIPE: dict[str, dict[str, object]] = {
    "model": {
        "position": "rotary", "norm": "rmsnorm", "qk_norm": True, "mlp": "relu2", "tie_embeddings": False,
        "zero_init_projections": True, "logit_softcap": 15.0,
    },
    "train": {"optimizer": "muon"},
}
