"""Generation speed with and without the KV cache, at the cpu preset's model shape.

    python bench/generate_kv_cache.py [--new-tokens 255] [--device cpu] [--threads N] [--repeats 3]

Samples ``--new-tokens`` tokens after a one-token prompt from a randomly initialised model (the
speed does not depend on the weights) and prints tokens per second of each path, best of
``--repeats``. With 255 new tokens the sequence just fills the 256-token context, so every step
after the prompt reads one token; past the context, both paths read the whole window per step.
"""

from __future__ import annotations

import argparse
import time

import torch

from gptflow.model.config import ModelConfig, pad_vocab_size
from gptflow.model.gpt import GPT

# The cpu preset: tasks/settings.py (_CPU), with its 8192-token vocabulary padded.
CPU_PRESET_SHAPE = dict(n_layer=4, n_head=4, n_embd=192, block_size=256, vocab_size=pad_vocab_size(8192))


def seconds_to_generate(model: GPT, new_tokens: int, use_kv_cache: bool, device: torch.device) -> float:
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(prompt, new_tokens, top_k=50, generator=generator, use_kv_cache=use_kv_cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=255)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(ModelConfig(**CPU_PRESET_SHAPE)).to(device).eval()
    seconds_to_generate(model, 8, use_kv_cache=True, device=device)  # warm-up: allocator, kernels
    print(f"{args.new_tokens} new tokens, cpu preset shape {CPU_PRESET_SHAPE}, {torch.get_num_threads()} threads")
    best = {}
    for use_kv_cache in (False, True):
        best[use_kv_cache] = min(
            seconds_to_generate(model, args.new_tokens, use_kv_cache, device) for _ in range(args.repeats)
        )
        label = "KV cache" if use_kv_cache else "no cache"
        print(f"{label}: {best[use_kv_cache]:.2f} s, {args.new_tokens / best[use_kv_cache]:.0f} tokens/s")
    print(f"speedup: {best[False] / best[True]:.1f}x")


if __name__ == "__main__":
    main()
