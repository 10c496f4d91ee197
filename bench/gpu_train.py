"""GPU training benchmark: matmul peak, throughput against a nanoGPT-style baseline, memory per
preset shape (whole and FSDP-sharded), and learning per token of the modern recipe against
GPT-2's, on one device.

    python bench/gpu_train.py                 # one CUDA GPU: under 4 minutes on an H200
    python bench/gpu_train.py --smoke         # everything tiny, on the CPU, in under a minute
    python bench/gpu_train.py --sections learning --device cpu   # the recipe comparison alone: ~45 min on 2 cores

Prints, last, a short table of:
(a) the measured bf16 matmul peak (8192³, median of repeats), the denominator of every MFU here;
(b) tokens/s, MFU (``GPT.flops_per_token()`` × tokens/s / measured peak) and peak memory
    (``torch.cuda.max_memory_allocated``) of GPT-2 124M on synthetic tokens already on the
    device, run as nanoGPT runs it (micro-batch 16, context 1024, bf16 autocast, torch.compile,
    fused AdamW, nanoGPT's loss over the whole logits, logits returned) and along gptflow's fast
    path (micro-batch 64, gptflow's chunked loss, no logits returned, SDPA restricted to the
    faster of FlashAttention and cuDNN attention as timed here), both at 65,536 tokens per
    optimizer step; and their ratio;
(c) peak memory and tokens/s of each preset shape's training step (gpt2-124m, and gpt-1b with
    activation checkpointing), eager, with the model whole and sharded by FSDP2 over a process
    group of the one GPU: FSDP's own cost (its saving grows with the GPUs: ``gptflow presets``);
(d) learning per token on real text: the built-in corpus (the interpreter's standard library)
    is ingested, a BPE tokenizer trained and the corpus tokenized with ``data/`` into a temporary
    store (in a separate process, while (a) and (b) run). Then the GPT-2 recipe and the modern
    recipe (``model.config.MODERN_RECIPE``) train the ``cpu`` preset's model shape for one epoch
    of the training split (a quarter in the smoke run) on the same windows, and a second modern run trains on half the
    tokens with its own schedule. Reported: each final validation loss, the tokens at which the
    full modern run first reaches the baseline's final loss (interpolated between evaluations),
    as a fraction of the budget, and whether the half-budget run ends below it.

Training is gptflow's own: (b) and (c) time ``model.train.take_step``, the step every gptflow
training takes (schedule, gradient accumulation, clipping, no host syncs inside a step), on
batches already on the device; (d) trains through ``model.pretraining.run_pretraining``, the trainer of
``gptflow pretrain`` and ``gptflow finetune``, which checkpoints only at the end here.

Imports only torch, numpy, pyarrow, tokenizers and this repository's ``data/`` and ``model/``
(no Prefect, no MLflow), so it runs on a bare GPU box. Writes ``gpu_train.json`` (every figure
and setting) into ``$OUT`` when that is set, else the current directory, after each section.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import gc
import importlib.util
import itertools
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import sysconfig
import tempfile
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

# A bare GPU box has the repository but not the installed package, whose root folder holds the
# gptflow package's layers (pyproject.toml maps them so): name that folder the gptflow package.
if importlib.util.find_spec("gptflow") is None:
    sys.modules["gptflow"] = types.ModuleType("gptflow")
    sys.modules["gptflow"].__path__ = [str(Path(__file__).resolve().parent.parent)]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from gptflow.data.config import IngestConfig, TokenizeConfig, TokenizerConfig  # noqa: E402
from gptflow.data.ingest import ingest_corpus  # noqa: E402
from gptflow.data.sources import BUILTIN_CORPUS, resolve_sources  # noqa: E402
from gptflow.data.tokenize import tokenize_corpus  # noqa: E402
from gptflow.data.tokenizer import train_tokenizer  # noqa: E402
from gptflow.model.config import MODERN_RECIPE, ModelConfig, TrainConfig, pad_vocab_size  # noqa: E402
from gptflow.model.distributed import shard_model  # noqa: E402
from gptflow.model.gpt import GPT  # noqa: E402
from gptflow.model.objective import Batch  # noqa: E402
from gptflow.model.optim import build_optimizer  # noqa: E402
from gptflow.model.pretraining import run_pretraining  # noqa: E402
from gptflow.model.train import take_step  # noqa: E402

SECTIONS = ("matmul", "throughput", "presets", "learning")
LEARNING_RUNS = ("gpt2", "modern", "modern_half")
ATTENTION_BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION")
RESULTS_FILE = "gpu_train.json"
# nanoGPT's published setting for GPT-2 124M: its vocabulary padded to 50304.
GPT2_VOCAB_SIZE = 50304
# Standard-library packages making up the smoke run's corpus: real text, ~300 KB.
SMOKE_CORPUS_PACKAGES = ("json", "logging", "email", "collections", "importlib")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of one benchmark run: the GPU defaults, or the smoke run's tiny ones."""

    matmul_size: int
    matmul_repeats: int
    throughput_model: ModelConfig
    baseline_micro_batch: int
    fast_micro_batch: int
    tokens_per_step: int
    compile: bool
    warmup_steps: int
    timed_steps: int
    learning_model: ModelConfig
    learning_micro_batch: int
    learning_epochs: float
    tokenizer: TokenizerConfig
    sources: tuple[str, ...]
    baseline_learning_rate: float
    modern_learning_rate: float
    muon_learning_rate: float
    evaluations: int
    eval_tokens: int
    preset_models: tuple[tuple[str, ModelConfig, int], ...]
    """(name, model, micro-batch) of each preset shape whose memory and speed (c) measures."""


GPU = Settings(
    matmul_size=8192, matmul_repeats=5,
    throughput_model=ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=GPT2_VOCAB_SIZE),
    baseline_micro_batch=16, fast_micro_batch=64, tokens_per_step=65536, compile=True, warmup_steps=3,
    timed_steps=15,
    # The `cpu` preset's shape, so the recipes' settings are the ones tuned (and measured) on a CPU.
    # Learning rates: the best of each recipe's CPU sweep in bench/RESULTS.md (gpt2 2e-3 / 4e-3;
    # modern AdamW 2e-3 / 4e-3 / 8e-3 with Muon 0.02 / 0.04), the cpu preset uses the modern ones.
    learning_model=ModelConfig(n_layer=4, n_head=4, n_embd=192, block_size=256),
    learning_micro_batch=16, learning_epochs=1.0, tokenizer=TokenizerConfig(vocab_size=8192), sources=(BUILTIN_CORPUS,),
    baseline_learning_rate=4e-3, modern_learning_rate=8e-3, muon_learning_rate=0.02, evaluations=15,
    eval_tokens=32768,
    # The shapes of the gpt2-124m and gpt-1b presets (tasks/settings.py, which this script may not
    # import: it pulls in Prefect), gpt-1b with the activation checkpointing that preset turns on.
    preset_models=(
        ("gpt2-124m", ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=GPT2_VOCAB_SIZE), 16),
        ("gpt-1b", ModelConfig(n_layer=24, n_head=16, n_embd=2048, block_size=2048, vocab_size=GPT2_VOCAB_SIZE,
                               activation_checkpointing=True), 8),
    ),
)
SMOKE = dataclasses.replace(
    GPU,
    matmul_size=256, matmul_repeats=3,
    throughput_model=ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=512),
    baseline_micro_batch=4, fast_micro_batch=8, tokens_per_step=512, compile=False, warmup_steps=1, timed_steps=2,
    learning_model=ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=64),
    learning_micro_batch=8, learning_epochs=0.25, tokenizer=TokenizerConfig(vocab_size=512, sample_bytes=256 * 1024),
    sources=tuple(str(Path(sysconfig.get_paths()["stdlib"]) / package) for package in SMOKE_CORPUS_PACKAGES),
    evaluations=4, eval_tokens=2048,
    preset_models=(
        ("tiny", ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=512), 4),
        ("tiny-recomputed", ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=512,
                                        activation_checkpointing=True), 4),
    ),
)


def main() -> None:
    args = _parser().parse_args()
    settings = SMOKE if args.smoke else GPU
    learning_rates = {"baseline_learning_rate": args.baseline_lr, "modern_learning_rate": args.modern_lr,
                      "muon_learning_rate": args.muon_lr}
    settings = dataclasses.replace(settings, **{name: lr for name, lr in learning_rates.items() if lr is not None})
    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    if args.threads or args.smoke:
        torch.set_num_threads(args.threads or 1)  # tiny models run fastest on one thread
    sections = args.sections or SECTIONS
    results: dict[str, Any] = {"settings": _describe(settings, device, args)}
    out_dir = Path(os.environ.get("OUT") or ".")

    def save() -> None:
        (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2, default=str))

    def run_section(name: str, measure: Callable[[], dict[str, Any]]) -> None:
        # A failed section is reported and the others still run: GPU time is scarce.
        try:
            results[name] = measure()
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            results.setdefault("errors", {})[name] = f"{type(error).__name__}: {error}"
        save()

    with tempfile.TemporaryDirectory(prefix="gptflow-gpu-bench-") as scratch, \
            concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        # Tokenizing is CPU work in its own process: it overlaps the GPU sections.
        corpus = pool.submit(prepare_corpus, settings, Path(scratch)) if "learning" in sections else None
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        if "matmul" in sections:
            run_section("matmul", lambda: measure_matmul_peak(device, settings.matmul_size, settings.matmul_repeats))
        peak = results.get("matmul", {}).get("flops_per_s")
        if "throughput" in sections:
            run_section("throughput", lambda: compare_throughput(settings, device, peak))
        if "presets" in sections:
            run_section("presets", lambda: measure_presets(settings, device, peak, Path(scratch)))
        if corpus is not None:
            run_section("learning", lambda: compare_learning(settings, device, corpus.result(), args.seed,
                                                             tuple(args.runs)))
    print_table(results)
    print(f"\ndetails: {out_dir / RESULTS_FILE}")
    if "errors" in results:
        sys.exit(f"sections failed: {', '.join(results['errors'])}")


# --- (a) matmul peak -----------------------------------------------------------------------------


def measure_matmul_peak(device: torch.device, size: int, repeats: int) -> dict[str, Any]:
    """FLOP/s of ``size``³ matmuls of random data (bf16 on CUDA, float32 on a CPU): the median
    over ``repeats`` rounds of 10 back-to-back products, after a warm-up round."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 1):
        _synchronize(device)
        started = time.perf_counter()
        for _ in range(10):
            a @ b
        _synchronize(device)
        times.append((time.perf_counter() - started) / 10)
    flops = 2 * size**3 / statistics.median(times[1:])
    return {"size": size, "dtype": str(dtype), "rounds": repeats, "flops_per_s": flops}


# --- (b) throughput -------------------------------------------------------------------------------


class NanoGPTLossGPT(GPT):
    """gptflow's GPT with nanoGPT's loss: one cross-entropy call over the whole (B, T, V) logits
    (``model.py``: ``F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
    ignore_index=-1)``), so the baseline computes what nanoGPT computes."""

    def _cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


def compare_throughput(settings: Settings, device: torch.device, peak: float | None) -> dict[str, Any]:
    attention = time_attention_backends(settings, device)
    results: dict[str, Any] = {"attention_backends_ms": attention}
    # nanoGPT's train.py: logits come back from the forward pass with the loss; SDPA picks its
    # backend by its own priority (FlashAttention first).
    results["nanogpt_baseline"] = measure_throughput(
        settings, device, peak, NanoGPTLossGPT, settings.baseline_micro_batch, return_logits=True,
        attention_backend=None,
    )
    # Compiled code holds on to the baseline's model: drop it before the fast path measures its memory.
    torch.compiler.reset()
    gc.collect()
    timed = {name: ms for name, ms in attention.items() if ms is not None}
    results["gptflow_fast_path"] = measure_throughput(
        settings, device, peak, GPT, settings.fast_micro_batch, return_logits=False,
        attention_backend=min(timed, key=timed.get) if timed else None,
    )
    results["speedup"] = results["gptflow_fast_path"]["tokens_per_s"] / results["nanogpt_baseline"]["tokens_per_s"]
    return results


def time_attention_backends(settings: Settings, device: torch.device) -> dict[str, float | None]:
    """Milliseconds of one causal attention forward + backward at the fast path's shape, per SDPA
    backend (None where it cannot run). On Hopper, cuDNN's kernels are reported to beat
    FlashAttention's, which SDPA tries first; the fast path takes the faster one measured here."""
    if device.type != "cuda":
        return {}
    config = settings.throughput_model
    shape = (settings.fast_micro_batch, config.n_head, config.block_size, config.n_embd // config.n_head)
    q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device=device, dtype=torch.bfloat16)
    timings: dict[str, float | None] = {}
    for backend in ATTENTION_BACKENDS:
        try:
            with sdpa_kernel(getattr(SDPBackend, backend)):
                for _ in range(3):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)
                _synchronize(device)
                started = time.perf_counter()
                for _ in range(10):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)
                _synchronize(device)
            timings[backend] = (time.perf_counter() - started) / 10 * 1e3
        except RuntimeError:  # this backend cannot serve the shape, dtype or device
            timings[backend] = None
    return timings


def measure_throughput(
    settings: Settings,
    device: torch.device,
    peak: float | None,
    model_class: type[GPT],
    micro_batch: int,
    return_logits: bool,
    attention_backend: str | None,
) -> dict[str, Any]:
    """Tokens/s of optimizer steps on one fixed batch of random tokens already on the device, at
    ``settings.tokens_per_step`` per step; ``attention_backend`` restricts SDPA to that backend
    (None: SDPA's own choice)."""
    config = settings.throughput_model
    accum_steps = settings.tokens_per_step // (micro_batch * config.block_size)
    train_config = TrainConfig(
        micro_batch_size=micro_batch, grad_accum_steps=accum_steps, learning_rate=6e-4, warmup_steps=10,
        max_steps=1000, compile=settings.compile,
    )
    torch.manual_seed(0)
    model = model_class(config).to(device)
    optimizer = build_optimizer(model, train_config, device)
    step_model = torch.compile(model) if settings.compile else model
    inputs = torch.randint(0, config.vocab_size, (micro_batch, config.block_size), device=device)
    targets = torch.randint(0, config.vocab_size, (micro_batch, config.block_size), device=device)
    batches = itertools.repeat(Batch(inputs, targets, inputs.numel()))
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    _reset_peak_memory(device)

    def loss_of(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch.inputs, batch.targets, return_logits=return_logits)[1]

    def run_steps(steps: range) -> float:
        backend = sdpa_kernel(getattr(SDPBackend, attention_backend)) if attention_backend else contextlib.nullcontext()
        started = time.perf_counter()
        with backend:  # around compilation too: the backend is chosen when the graph is traced
            for step in steps:
                take_step(loss_of, model, step_model, model, optimizer, batches, step, train_config, device,
                          autocast_dtype)
        _synchronize(device)
        return time.perf_counter() - started

    warmup_s = run_steps(range(settings.warmup_steps))  # the first step compiles
    timed_s = run_steps(range(settings.warmup_steps, settings.warmup_steps + settings.timed_steps))
    tokens_per_s = settings.timed_steps * settings.tokens_per_step / timed_s
    result = {
        "micro_batch": micro_batch, "grad_accum_steps": accum_steps, "block_size": config.block_size,
        "loss": "nanoGPT's" if model_class is NanoGPTLossGPT else "gptflow's chunked",
        "return_logits": return_logits, "attention_backend": attention_backend or "SDPA's choice",
        "compile": settings.compile, "parameters": model.num_parameters(),
        "flops_per_token": model.flops_per_token(), "tokens_per_s": tokens_per_s,
        "mfu": model.flops_per_token() * tokens_per_s / peak if peak else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "warmup_s": warmup_s, "timed_s": timed_s,
    }
    return result


# --- (c) memory and speed per preset shape ------------------------------------------------------


def measure_presets(settings: Settings, device: torch.device, peak: float | None, scratch: Path) -> dict[str, Any]:
    """Peak memory and tokens/s of each preset shape's training step (``take_step``, eager, on
    synthetic tokens on the device), with the model whole (what each rank holds under ddp) and
    sharded by FSDP2 (``shard_model``) over a process group of this one device, which measures
    FSDP's own overhead: its memory saving grows with the ranks (``gptflow presets`` estimates it)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend, init_method=f"file://{scratch / 'rendezvous'}", rank=0, world_size=1)
    try:
        results: dict[str, Any] = {}
        for name, config, micro_batch in settings.preset_models:
            for parallelism in ("ddp", "fsdp"):
                results[f"{name}/{parallelism}"] = measure_preset_step(settings, device, peak, config, micro_batch,
                                                                       parallelism)
                gc.collect()
        return results
    finally:
        torch.distributed.destroy_process_group()


def measure_preset_step(
    settings: Settings, device: torch.device, peak: float | None, config: ModelConfig, micro_batch: int,
    parallelism: str,
) -> dict[str, Any]:
    train_config = TrainConfig(micro_batch_size=micro_batch, learning_rate=3e-4, warmup_steps=10, max_steps=1000)
    _reset_peak_memory(device)
    torch.manual_seed(0)
    model = GPT(config).to(device)
    parameters, flops_per_token = model.num_parameters(), model.flops_per_token()
    if parallelism == "fsdp":
        model = shard_model(model, device)
    optimizer = build_optimizer(model, train_config, device)
    inputs = torch.randint(0, config.vocab_size, (micro_batch, config.block_size), device=device)
    batches = itertools.repeat(Batch(inputs, torch.roll(inputs, -1, dims=1), inputs.numel()))
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None

    def loss_of(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch.inputs, batch.targets, return_logits=False)[1]

    def run_steps(steps: range) -> float:
        started = time.perf_counter()
        for step in steps:
            take_step(loss_of, model, model, model, optimizer, batches, step, train_config, device, autocast_dtype)
        _synchronize(device)
        return time.perf_counter() - started

    run_steps(range(settings.warmup_steps))
    timed_s = run_steps(range(settings.warmup_steps, settings.warmup_steps + settings.timed_steps))
    tokens_per_s = settings.timed_steps * inputs.numel() / timed_s
    return {
        "parameters": parameters, "micro_batch": micro_batch, "block_size": config.block_size,
        "activation_checkpointing": config.activation_checkpointing, "tokens_per_s": tokens_per_s,
        "mfu": flops_per_token * tokens_per_s / peak if peak else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


# --- (d) learning per token --------------------------------------------------------------------------


def prepare_corpus(settings: Settings, scratch: Path) -> dict[str, Any]:
    """Ingest, train the tokenizer and tokenize into ``scratch``; the shards and counts."""
    started = time.perf_counter()
    manifest = ingest_corpus(resolve_sources(list(settings.sources)), IngestConfig(), scratch)
    tokenizer = train_tokenizer(manifest, settings.tokenizer, scratch)
    tokens = tokenize_corpus(manifest, tokenizer, TokenizeConfig(), scratch)
    return {
        "train_paths": [str(path) for path in tokens.paths("train")],
        "val_paths": [str(path) for path in tokens.paths("val")],
        "train_tokens": tokens.total_tokens("train"),
        "val_tokens": tokens.total_tokens("val"),
        "vocab_size": tokenizer.vocab_size,
        "documents": manifest.total_documents,
        "prepare_s": time.perf_counter() - started,
    }


def learning_recipes(settings: Settings, vocab_size: int, steps: int) -> dict[str, tuple[ModelConfig, TrainConfig]]:
    model = dataclasses.replace(settings.learning_model, vocab_size=pad_vocab_size(vocab_size))
    schedule = dict(
        max_steps=steps, micro_batch_size=settings.learning_micro_batch, warmup_steps=max(1, steps // 15),
    )
    baseline = TrainConfig(**schedule, learning_rate=settings.baseline_learning_rate)
    modern = TrainConfig(
        **schedule, **MODERN_RECIPE["train"], learning_rate=settings.modern_learning_rate,
        muon_learning_rate=settings.muon_learning_rate,
    )
    half = dataclasses.replace(modern, max_steps=steps // 2, warmup_steps=max(1, steps // 30))
    modern_model = dataclasses.replace(model, **MODERN_RECIPE["model"])
    return {"gpt2": (model, baseline), "modern": (modern_model, modern), "modern_half": (modern_model, half)}


def compare_learning(
    settings: Settings, device: torch.device, corpus: dict[str, Any], seed: int, run_names: tuple[str, ...] = LEARNING_RUNS,
) -> dict[str, Any]:
    tokens_per_step = settings.learning_micro_batch * settings.learning_model.block_size
    steps = int(settings.learning_epochs * corpus["train_tokens"]) // tokens_per_step
    runs = {}
    with tempfile.TemporaryDirectory(prefix="gptflow-bench-runs-") as run_root:
        for name, (model_config, train_config) in learning_recipes(settings, corpus["vocab_size"], steps).items():
            if name not in run_names:
                continue
            train_config = dataclasses.replace(train_config, seed=seed)
            runs[name] = train_and_evaluate(name, model_config, train_config, corpus, settings, device,
                                            Path(run_root) / name)
    result: dict[str, Any] = {"corpus": corpus, "budget_tokens": steps * tokens_per_step, "runs": runs}
    if "gpt2" not in runs:
        return result
    target = runs["gpt2"]["final_val_loss"]
    result["baseline_final_val_loss"] = target
    if "modern" in runs:
        tokens_to_target = tokens_to_reach(runs["modern"]["curve"], target)
        result["modern_tokens_to_baseline_loss"] = tokens_to_target
        result["modern_fraction_of_tokens"] = tokens_to_target / (steps * tokens_per_step) if tokens_to_target else None
    if "modern_half" in runs:
        result["modern_half_budget_beats_baseline"] = runs["modern_half"]["final_val_loss"] <= target
    return result


class LearningCurve:
    """``model.pretraining.run_pretraining``'s callback here: the validation curve by tokens, and a line per evaluation."""

    def __init__(self, name: str, max_steps: int) -> None:
        self.name, self.max_steps = name, max_steps
        self.curve: list[tuple[int, float]] = []
        self.tokens_per_s: list[float] = []

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if "train/tokens_per_sec" in metrics:
            self.tokens_per_s.append(metrics["train/tokens_per_sec"])
        if "val/loss" in metrics:
            self.curve.append((int(metrics["train/tokens"]), metrics["val/loss"]))
            print(f"learning {self.name}: step {step}/{self.max_steps}, {self.curve[-1][0] / 1e6:.2f}M tokens, "
                  f"val loss {metrics['val/loss']:.4f}, {self.tokens_per_s[-1] / 1e3:.1f}K tok/s", flush=True)

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass

    def on_resume(self, step: int, path: Path) -> None:
        pass

    def on_unusable_checkpoint(self, path: Path, error: Exception, fallback: Path | None) -> None:
        pass


def train_and_evaluate(
    name: str,
    model_config: ModelConfig,
    train_config: TrainConfig,
    corpus: dict[str, Any],
    settings: Settings,
    device: torch.device,
    run_dir: Path,
) -> dict[str, Any]:
    """Train through gptflow's trainer (``model.pretraining.run_pretraining``, eager), evaluating
    ``settings.evaluations`` times; the validation curve by tokens. Prints a line per evaluation
    (on a CPU this section takes most of an hour)."""
    steps = train_config.max_steps
    interval = max(1, steps // settings.evaluations)
    # Reports (which read the loss from the device) only with evaluations; one checkpoint, the last.
    train_config = dataclasses.replace(
        train_config, device=str(device), val_interval=interval, log_interval=interval, val_tokens=settings.eval_tokens,
        checkpoint_interval=steps, keep_checkpoints=1,
    )
    recorder = LearningCurve(name, steps)
    result = run_pretraining(model_config, train_config, [Path(path) for path in corpus["train_paths"]],
                      [Path(path) for path in corpus["val_paths"]], run_dir, callback=recorder)
    return {
        "model": dataclasses.asdict(model_config),
        "train": dataclasses.asdict(train_config),
        "parameters": GPT(model_config).num_parameters(),
        "curve": recorder.curve,
        "final_val_loss": result.final_val_loss,
        "tokens_per_s": statistics.median(recorder.tokens_per_s),
    }


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Tokens at which a validation curve first reaches ``target``, linearly interpolated between
    evaluations (from the start, taken as ln V's side of the first point); None if never."""
    previous_tokens, previous_loss = 0, math.inf
    for tokens, loss in curve:
        if loss <= target:
            if math.isinf(previous_loss):
                return float(tokens)
            return previous_tokens + (tokens - previous_tokens) * (previous_loss - target) / (previous_loss - loss)
        previous_tokens, previous_loss = tokens, loss
    return None


# --- output ---------------------------------------------------------------------------------------


def print_table(results: dict[str, Any]) -> None:
    rows = []
    if "matmul" in results:
        m = results["matmul"]
        dtype = m["dtype"].removeprefix("torch.")
        rows.append(("matmul peak", f"{dtype} {m['size']}³", f"{m['flops_per_s'] / 1e12:.1f} TFLOP/s"))
    if "throughput" in results:
        t = results["throughput"]
        for backend, ms in t["attention_backends_ms"].items():
            rows.append(("attention fwd+bwd", backend.lower(), f"{ms:.2f} ms" if ms is not None else "unavailable"))
        for name in ("nanogpt_baseline", "gptflow_fast_path"):
            r = t[name]
            mfu = f"MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else "MFU n/a"
            memory = f"peak {r['peak_memory_bytes'] / 2**30:.1f} GiB" if r["peak_memory_bytes"] else "peak n/a"
            rows.append((name, f"mb {r['micro_batch']} x {r['grad_accum_steps']}",
                         f"{r['tokens_per_s'] / 1e3:,.1f}K tok/s  {mfu}  {memory}"))
        rows.append(("speedup", "fast / baseline", f"{t['speedup']:.2f}x"))
    if "presets" in results:
        for name, r in results["presets"].items():
            mfu = f"MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else "MFU n/a"
            memory = f"peak {r['peak_memory_bytes'] / 2**30:.1f} GiB" if r["peak_memory_bytes"] else "peak n/a"
            rows.append((name, f"{r['parameters'] / 1e6:,.1f}M params, mb {r['micro_batch']}",
                         f"{r['tokens_per_s'] / 1e3:,.1f}K tok/s  {mfu}  {memory}"))
    if "learning" in results:
        learning = results["learning"]
        for name, run in learning["runs"].items():
            rows.append((f"val loss {name}", f"{run['curve'][-1][0] / 1e6:.2f}M tokens",
                         f"{run['final_val_loss']:.4f}  ({run['tokens_per_s'] / 1e3:,.1f}K tok/s)"))
        if "modern_fraction_of_tokens" in learning:
            fraction = learning["modern_fraction_of_tokens"]
            rows.append(("modern reaches gpt2's", "final val loss at",
                         f"{100 * fraction:.0f}% of the tokens" if fraction else "not within the budget"))
        if "modern_half_budget_beats_baseline" in learning:
            rows.append(("modern_half ends", "below gpt2's final",
                         "yes" if learning["modern_half_budget_beats_baseline"] else "no"))
    width = max(len(row[0]) for row in rows)
    middle = max(len(row[1]) for row in rows)
    print()
    for label, detail, value in rows:
        print(f"{label:<{width}}  {detail:<{middle}}  {value}")


def _describe(settings: Settings, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "smoke": args.smoke,
        "settings": dataclasses.asdict(settings),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks that every section runs")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, help="run only these sections (default: all)")
    parser.add_argument("--device", help="torch device (default: cuda when present, else cpu)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the learning runs' weights and data order")
    parser.add_argument("--runs", nargs="+", choices=LEARNING_RUNS, default=LEARNING_RUNS,
                        help="learning runs to train (default: all three; comparisons need gpt2)")
    parser.add_argument("--baseline-lr", type=float, help="the gpt2 run's peak learning rate")
    parser.add_argument("--modern-lr", type=float, help="the modern runs' AdamW peak learning rate "
                        "(embeddings, head, norms)")
    parser.add_argument("--muon-lr", type=float, help="the modern runs' Muon peak learning rate (block matrices)")
    return parser


if __name__ == "__main__":
    main()
