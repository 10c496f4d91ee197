"""A decoder-only transformer in one file: GPT-2 by default, a modern recipe by switches.

Pre-norm blocks (norm → causal self-attention → residual, norm → MLP → residual) and an output
projection. The defaults are GPT-2's: LayerNorm, learned position embeddings, GELU MLP and an
output projection that shares its matrix with the token embedding. ``ModelConfig`` switches
each to its modern counterpart (RMSNorm, rotary embeddings, QK-norm, ReLU² or SwiGLU, untied
head, zero-initialised output projections, logit soft-capping); the parameter names stay
GPT-2's, so a default model's checkpoint maps one-to-one onto GPT-2's.

Generation reads the prompt once and then feeds one token per step, attending to the keys and
values of earlier positions kept in a ``KVCache`` (one preallocated ``LayerKVCache`` of
``block_size`` positions per block, holding only the key/value heads).

``model.config.MODERN_RECIPE`` names the switches the ``*-modern`` presets use. Switches add or
remove parameters but never rename them; rotary tables and ``position=sinusoidal``'s table
(``sinusoidal_table``) are buffers that checkpoints do not hold. The shapes published checkpoints
have are settings too, each what it always was when unset: ``n_kv_head`` (grouped-query
attention: ``c_attn`` stacks ``n_head`` query heads and ``n_kv_head`` key and value heads, and
SDPA's ``enable_gqa`` shares each among ``n_head / n_kv_head`` queries), ``head_dim``,
``mlp_hidden``, ``rope_theta``, ``norm_eps``, ``qkv_bias`` and ``mlp=gelu_tanh``. The loss is
computed ``LOSS_CHUNK_TOKENS`` rows at a time, their float32 intermediates recomputed in the
backward pass, so of the (B, T, V) tensors only the logits in the compute dtype stay alive.

Shapes in comments use B = batch, T = time, C = n_embd, nh = n_head, nkv = key/value heads
(n_head unless grouped-query attention), hs = head size (C // nh unless head_dim is set),
H = MLP hidden width, V = vocab_size, S = positions cached so far.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gptflow.model.config import ModelConfig

INIT_STD = 0.02
# Rows of logits turned into loss at a time: bounds the float32 working set of the loss (upcast,
# soft-cap, log-softmax) to this many rows, e.g. 0.8 GB at V = 50304.
LOSS_CHUNK_TOKENS = 4096


class RMSNorm(nn.Module):
    """Divide by the root mean square over the last dimension, times a learned gain.

    Computed in float32 and returned in the input's dtype: autocast has no rule for
    ``rms_norm``, and bf16 queries and keys must stay bf16 for the fused attention kernels.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.size(-1),), self.weight.float(), self.eps).type_as(x)


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)


def sinusoidal_table(length: int, width: int, base: float = 10000.0) -> torch.Tensor:
    """The Transformer's position encodings for positions ``0 .. length - 1``, ``(length, width)``:
    dimension 2i holds ``sin(position / base^(2i / width))`` and 2i + 1 its cosine, scaled so that
    each dimension's root mean square is the token embeddings' initial standard deviation (the
    Transformer scaled its embeddings up by sqrt(width) instead; GPT-2's initialisation keeps
    them small, and an encoding 50x larger would drown them)."""
    frequencies = base ** (-torch.arange(0, width, 2, dtype=torch.float64) / width)  # (width/2,)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * frequencies  # (length, width/2)
    table = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)[:, :width]  # sin, cos interleaved
    return (table * INIT_STD * math.sqrt(2)).float()


def rotary_tables(head_size: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each (length, head_size / 2): pair i of a head turns by
    ``position · theta^(-2i / head_size)``, fast for the first pairs, slow for the last."""
    inverse_frequencies = theta ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inverse_frequencies)  # (length, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + hs/2]) of ``x`` (B, nh, T, hs) by the angles of its positions.

    The dot product of a query rotated to position m and a key rotated to n depends on m - n
    only. Computed in float32, returned in ``x``'s dtype.
    """
    x1, x2 = x.float().chunk(2, dim=-1)  # 2 × (B, nh, T, hs/2)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, nh, T, hs)
    return rotated.type_as(x)


class LayerKVCache:
    """One block's keys and values of the positions read so far, preallocated for ``capacity``
    positions in the dtype and device of the first keys written (e.g. bf16 under autocast)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys: torch.Tensor | None = None  # (B, nkv, capacity, hs)
        self.values: torch.Tensor | None = None  # (B, nkv, capacity, hs)
        self.length = 0

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the (B, nkv, T, hs) keys and values of the next T positions; returns the keys and
        values of every position so far, (B, nkv, S, hs)."""
        B, nkv, T, hs = k.shape
        if self.keys is None:
            self.keys = k.new_empty(B, nkv, self.capacity, hs)
            self.values = v.new_empty(B, nkv, self.capacity, hs)
        self.keys[:, :, self.length : self.length + T] = k
        self.values[:, :, self.length : self.length + T] = v
        self.length += T
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]


class KVCache:
    """The keys and values every block computed for the positions a model has read, so that the
    next forward pass reads only the new tokens. Holds at most ``block_size`` positions."""

    def __init__(self, config: ModelConfig) -> None:
        self.layers = [LayerKVCache(config.block_size) for _ in range(config.n_layer)]

    @property
    def length(self) -> int:
        """Positions read so far: the position of the next token."""
        return self.layers[0].length


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.kv_heads, config.head_size
        self.dropout = config.dropout
        query_width, kv_width = config.n_head * config.head_size, config.kv_heads * config.head_size
        self.split_sizes = (query_width, kv_width, kv_width)
        # q, k, v in one matmul
        self.c_attn = nn.Linear(config.n_embd, sum(self.split_sizes), bias=config.bias or config.qkv_bias)
        self.q_norm = RMSNorm(config.head_size, config.norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(config.head_size, config.norm_eps) if config.qk_norm else nn.Identity()
        self.c_proj = nn.Linear(query_width, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None, cache: LayerKVCache | None = None
    ) -> torch.Tensor:
        """``x`` (B, T, C) holds positions ``start .. start + T - 1``, with ``start`` the positions
        already in ``cache`` (0 without one); ``rotary`` is the cos and sin of those positions."""
        B, T, _ = x.size()
        q, k, v = self.c_attn(x).split(self.split_sizes, dim=2)  # (B, T, nh·hs), 2 × (B, T, nkv·hs)
        q = self.q_norm(q.view(B, T, self.n_head, self.head_size).transpose(1, 2))  # (B, nh, T, hs)
        k = self.k_norm(k.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2))  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)  # (B, nkv, T, hs)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        start = cache.length if cache is not None else 0
        if cache is not None:
            k, v = cache.extend(k, v)  # 2 × (B, nkv, S, hs), S = start + T
        # Query i sits at position start + i and sees keys 0 .. start + i: from position 0 that is the
        # plain causal mask, and a single new token sees every key; only T > 1 new tokens after cached
        # ones need the mask spelled out.
        mask = None
        if start > 0 and T > 1:
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)  # (T, S)
        # Grouped-query attention: each key/value head serves n_head / n_kv_head query heads.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=start == 0,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_size)  # (B, T, nh·hs)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.activation = config.mlp
        hidden = config.mlp_width
        # SwiGLU's gate and value projections share one matmul, stacked [gate; value].
        fc_outputs = 2 * hidden if config.mlp == "swiglu" else hidden
        self.c_fc = nn.Linear(config.n_embd, fc_outputs, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, H), or (B, T, 2H) for swiglu
        if self.activation == "swiglu":
            gate, value = h.chunk(2, dim=-1)  # 2 × (B, T, H)
            h = F.silu(gate) * value
        elif self.activation == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None, cache: LayerKVCache | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rotary, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ValueError(
                "model.vocab_size is not set: fill it from the trained tokenizer with "
                "model.config.pad_vocab_size(tokenizer vocabulary size) before building the model"
            )
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.position == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules.update(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config, config.n_embd),
        )
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # Saves V × C parameters and trains at least as well at GPT-2's scale (Press & Wolf, 2017).
            self.transformer.wte.weight = self.lm_head.weight
        if config.position == "rotary":
            # Not persistent: a function of the config, so checkpoints hold only learned weights.
            cos, sin = rotary_tables(config.head_size, config.block_size, config.rope_theta)
            self.register_buffer("rotary_cos", cos, persistent=False)  # (block_size, hs/2)
            self.register_buffer("rotary_sin", sin, persistent=False)  # (block_size, hs/2)
        if config.position == "sinusoidal":
            self.register_buffer("sinusoidal_positions", sinusoidal_table(config.block_size, config.n_embd),
                                 persistent=False)  # (block_size, C)
        self.apply(_init_weights)
        for name, parameter in self.named_parameters():
            if name.endswith("c_proj.weight") and config.zero_init_projections:
                nn.init.zeros_(parameter)
            elif name.endswith("c_proj.weight"):
                # GPT-2: each residual branch adds to the stream, so scale the projections writing
                # into it by 1/sqrt(2 · n_layer) to keep the stream's variance independent of depth.
                nn.init.normal_(parameter, mean=0.0, std=INIT_STD / math.sqrt(2 * config.n_layer))
        if config.zero_init_projections and not config.tie_embeddings:
            nn.init.zeros_(self.lm_head.weight)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, tied weights counted once.

        ``exclude_embeddings`` leaves out the tables that are looked up rather than multiplied:
        the position embeddings, and the token embedding when the output projection has its own
        matrix. Tied, the token embedding is also the output projection, the largest single
        matmul of a small model, so it stays in.
        """
        total = sum(parameter.numel() for parameter in self.parameters())
        if exclude_embeddings:
            if "wpe" in self.transformer:
                total -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.transformer.wte.weight.numel()
        return total

    def flops_per_token(self) -> int:
        """Training FLOPs (forward + backward) per token, for MFU.

        ``6 · N`` for the matmuls against the weights (2 per multiply-add in the forward pass, twice
        that in the backward), with N = ``num_parameters(exclude_embeddings=True)``, plus
        ``12 · n_layer · n_head · head size · block_size`` for the attention scores and the weighted sum of
        values (PaLM appendix B). The causal mask's skipped half is counted, as is customary, so
        the figure is comparable with published MFU numbers. Recomputation (activation
        checkpointing) is not counted: MFU measures useful work.
        """
        config = self.config
        attention = 12 * config.n_layer * config.n_head * config.head_size * config.block_size
        return 6 * self.num_parameters(exclude_embeddings=True) + attention

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        return_logits: bool = True,
        kv_cache: KVCache | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits and mean cross-entropy loss of next-token prediction.

        ``idx`` and ``targets`` are int64 ``(B, T)`` with ``T <= block_size``; target -1 is
        ignored. Without targets only the last position's logits are computed, ``(B, 1, V)``,
        which is all generation needs. With targets, ``return_logits=False`` returns ``None``
        for the logits: a training step needs only the loss, and under ``torch.compile`` the
        soft-capped (B, T, V) logits then never need to be written out. With ``kv_cache``, ``idx``
        continues the positions the cache holds, and the cache is extended by them.
        """
        x = self.hidden_states(idx, kv_cache)  # (B, T, C)
        if targets is None:
            return self._softcapped(self.lm_head(x[:, [-1], :])), None  # (B, 1, V)
        logits = self.lm_head(x)  # (B, T, V), in the autocast dtype
        loss = self._cross_entropy(logits, targets)
        return (self._softcapped(logits) if return_logits else None), loss

    def hidden_states(self, idx: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        """The normalised residual stream after the last block, ``(B, T, C)``: what the LM head
        reads, and what a task head (e.g. a classifier) reads instead. With ``kv_cache``, ``idx``
        holds the positions after those the cache holds."""
        B, T = idx.size()
        start = kv_cache.length if kv_cache is not None else 0  # position of idx's first token
        end = start + T
        if end > self.config.block_size:
            raise ValueError(f"sequence of length {end} exceeds block_size {self.config.block_size}")
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.position == "learned":
            x = x + self.transformer.wpe(torch.arange(start, end, dtype=torch.long, device=idx.device))  # (B, T, C)
        elif self.config.position == "sinusoidal":
            x = x + self.sinusoidal_positions[start:end]  # (B, T, C)
        x = self.transformer.drop(x)
        rotary = (self.rotary_cos[start:end], self.rotary_sin[start:end]) if self.config.position == "rotary" else None
        layer_caches = kv_cache.layers if kv_cache is not None else [None] * self.config.n_layer
        for block, cache in zip(self.transformer.h, layer_caches):
            if self.config.activation_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, rotary, use_reentrant=False)  # (B, T, C)
            else:
                x = block(x, rotary, cache)  # (B, T, C)
        return self.transformer.ln_f(x)  # (B, T, C)

    def _softcapped(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.config.logit_softcap
        if not cap:
            return logits
        return cap * torch.tanh(logits.float() / cap)  # in float32: tanh saturates coarsely in bf16

    def _cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the targets that are not -1, ``LOSS_CHUNK_TOKENS`` rows at a
        time. Each chunk's float32 intermediates are recomputed in the backward pass rather than
        kept, so of the (B, T, V) tensors only the logits in their compute dtype stay alive
        (2 bytes per entry under bf16 autocast instead of ~14)."""
        logits = logits.view(-1, logits.size(-1))  # (B·T, V)
        targets = targets.reshape(-1)  # (B·T,)
        summed = sum(
            checkpoint(self._summed_cross_entropy, logits_chunk, targets_chunk, use_reentrant=False)
            for logits_chunk, targets_chunk in zip(logits.split(LOSS_CHUNK_TOKENS), targets.split(LOSS_CHUNK_TOKENS))
        )
        return summed / (targets != -1).sum()

    def _summed_cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self._softcapped(logits).float()  # (rows, V)
        return F.cross_entropy(logits, targets, ignore_index=-1, reduction="sum")

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        vocab_limit: int | None = None,
        use_kv_cache: bool = True,
    ) -> torch.Tensor:
        """Extend ``idx`` (B, T) by ``max_new_tokens`` sampled tokens, returning (B, T + new).

        Logits are divided by ``temperature``; ``top_k`` (None or 0: no cut) keeps only the k most
        likely tokens; ``vocab_limit`` (the tokenizer's vocabulary size) never samples the padding
        rows of the embedding above it. Call ``model.eval()`` first, or dropout stays active.

        The context is the last ``block_size`` tokens. With the KV cache the prompt is read once and
        each step reads only the token sampled last, until the sequence outgrows ``block_size``;
        from then on the window slides by a token per step, every position in it changes, and each
        step reads the whole window, as without the cache. Both ways compute the same logits, up to
        float rounding.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        block_size = self.config.block_size
        kv_cache = None
        for _ in range(max_new_tokens):
            if kv_cache is not None and kv_cache.length < block_size:
                logits, _ = self(idx[:, -1:], kv_cache=kv_cache)  # (B, 1, V): the newest token only
            else:
                # The prompt, or the sliding window: read it whole, and cache it while there is room
                # for the positions after it.
                kv_cache = KVCache(self.config) if use_kv_cache and idx.size(1) < block_size else None
                logits, _ = self(idx[:, -block_size:], kv_cache=kv_cache)  # (B, 1, V)
            logits = logits[:, -1, :vocab_limit] / temperature  # (B, V), or (B, vocab_limit)
            if top_k:
                kth_largest = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
                logits = logits.masked_fill(logits < kth_largest, float("-inf"))
            probabilities = F.softmax(logits, dim=-1)  # (B, V)
            next_token = torch.multinomial(probabilities, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, next_token), dim=1)
        return idx


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
