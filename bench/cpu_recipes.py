"""Training throughput of the `cpu` preset's shape on this machine, per recipe and precision: what
the default's settings were chosen by (issue 28; bench/RESULTS.md, "The default job in half the
time").

    python bench/cpu_recipes.py                 # eager, float32 and bf16 autocast
    python bench/cpu_recipes.py --compile       # torch.compile too (needs a C++ compiler)

Each row builds the model and optimizer of the `cpu` preset's shape (4 layers x 4 heads x 192,
context 256, vocabulary 8192, 16 x 256 tokens a step) with one recipe, and times forward,
backward and optimizer step on random tokens: the median of `--steps` steps after two untimed
ones (which also compile), in one process. The first step's time is printed apart, compilation
included. Imports no Prefect or MLflow.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from gptflow.model.config import MODERN_RECIPE, ModelConfig, TrainConfig
from gptflow.model.gpt import GPT
from gptflow.model.optim import build_optimizer

SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 192, "block_size": 256, "vocab_size": 8192}
MICRO_BATCH = 16
RECIPES: dict[str, tuple[dict[str, object], dict[str, object]]] = {
    "gpt2 (cpu-gpt2)": ({}, {}),
    "gpt2 + logit soft-cap 15": ({"logit_softcap": 15.0}, {}),
    "modern (gpt2-124m-modern's)": (MODERN_RECIPE["model"], MODERN_RECIPE["train"]),
    "modern, no soft-cap (cpu)": ({**MODERN_RECIPE["model"], "logit_softcap": 0.0}, MODERN_RECIPE["train"]),
}


def time_steps(model_settings: dict[str, object], train_settings: dict[str, object], bf16: bool, compile_model: bool,
               steps: int) -> tuple[float, float]:
    """(tokens per second over the timed steps, seconds of the first step)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SHAPE, **model_settings))
    optimizer = build_optimizer(model, TrainConfig(micro_batch_size=MICRO_BATCH, **train_settings), torch.device("cpu"))
    step_model = torch.compile(model) if compile_model else model
    inputs = torch.randint(0, SHAPE["vocab_size"], (MICRO_BATCH, SHAPE["block_size"]))
    targets = torch.randint(0, SHAPE["vocab_size"], (MICRO_BATCH, SHAPE["block_size"]))
    durations = []
    for _ in range(steps + 2):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = step_model(inputs, targets, return_logits=False)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        durations.append(time.perf_counter() - started)
    return MICRO_BATCH * SHAPE["block_size"] / statistics.median(durations[2:]), durations[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row (default 10)")
    parser.add_argument("--compile", action="store_true", help="also time each recipe under torch.compile")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; tokens/s (first step s)")
    print("| recipe | float32 | bf16 autocast |" + (" float32 compiled | bf16 compiled |" if args.compile else ""))
    print("|---|---:|---:|" + ("---:|---:|" if args.compile else ""))
    for name, (model_settings, train_settings) in RECIPES.items():
        cells = []
        for compile_model in (False, True) if args.compile else (False,):
            for bf16 in (False, True):
                tokens_per_s, first_s = time_steps(model_settings, train_settings, bf16, compile_model, args.steps)
                cells.append(f"{tokens_per_s / 1000:.1f}K ({first_s:.1f} s)")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
