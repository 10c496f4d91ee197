"""A GPT-2 style decoder-only transformer in one file.

Pre-norm blocks (LayerNorm → causal self-attention → residual, LayerNorm → MLP → residual),
learned position embeddings, and an output projection that shares its matrix with the token
embedding. Shapes in comments use B = batch, T = time, C = n_embd, nh = n_head,
hs = head size (C // nh), V = vocab_size.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig

INIT_STD = 0.02


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 × (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
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
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Tying the input and output embeddings saves V × C parameters and trains at least as
        # well at this scale (Press & Wolf, 2017).
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(_init_weights)
        # GPT-2: each residual branch adds to the stream, so scale the projections writing into it
        # by 1/sqrt(2 · n_layer) to keep the stream's variance independent of depth.
        for name, parameter in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(parameter, mean=0.0, std=INIT_STD / math.sqrt(2 * config.n_layer))

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count, tied weights counted once.

        ``exclude_embeddings`` leaves out the position embeddings, which are looked up rather
        than multiplied. The token embedding stays in: tied, it is also the output projection,
        which is the largest single matmul of a small model.
        """
        total = sum(parameter.numel() for parameter in self.parameters())
        if exclude_embeddings:
            total -= self.transformer.wpe.weight.numel()
        return total

    def flops_per_token(self) -> int:
        """Training FLOPs (forward + backward) per token, for MFU.

        ``6 · N`` for the matmuls against the weights (2 per multiply-add in the forward pass, twice
        that in the backward), with N = ``num_parameters(exclude_embeddings=True)``, plus
        ``12 · n_layer · n_embd · block_size`` for the attention scores and the weighted sum of
        values (PaLM appendix B). The causal mask's skipped half is counted, as is customary, so
        the figure is comparable with published MFU numbers.
        """
        config = self.config
        attention = 12 * config.n_layer * config.n_embd * config.block_size
        return 6 * self.num_parameters(exclude_embeddings=True) + attention

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and mean cross-entropy loss of next-token prediction.

        ``idx`` and ``targets`` are int64 ``(B, T)`` with ``T <= block_size``; target -1 is
        ignored. Without targets only the last position's logits are computed, ``(B, 1, V)``,
        which is all generation needs.
        """
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
        positions = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)  # (B, T, C)
        x = self.transformer.ln_f(x)  # (B, T, C)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # (B, 1, V)
        logits = self.lm_head(x)  # (B, T, V)
        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend ``idx`` (B, T) by ``max_new_tokens`` sampled tokens, returning (B, T + new).

        Logits are divided by ``temperature``; ``top_k`` (None or 0: no cut) keeps only the k most
        likely tokens. The context is cropped to the last ``block_size`` tokens. Call
        ``model.eval()`` first, or dropout stays active.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size :]  # (B, ≤ block_size)
            logits, _ = self(context)
            logits = logits[:, -1, :] / temperature  # (B, V)
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
