"""The trainer's own overhead: gptflow's training loop against a bare loop, same model, optimizer
and batches, in one process (issue 28).

    python bench/trainer_overhead.py                          # cpu preset's shape; device auto
    python bench/trainer_overhead.py --pairs 5 --timed-steps 50
    python bench/trainer_overhead.py --loops gptflow --pairs 1 --timed-steps 200   # for a profiler

(a) the reference: forward, backward, clipping at ``train.grad_clip``, ``optimizer.step()``,
    ``zero_grad``, the schedule's learning rate written into the optimizer (it is what is trained),
    on batches sampled before the clock starts and already on the device; nothing else.
(b) gptflow: ``model.pretraining.run_pretraining`` (``model.train.train``: ``take_step``, the
    background prefetching of ``data.loader.prefetch_batches`` with its sampling and copies, the
    dropout seed, the meter, a report every ``log_interval`` steps with its host syncs, the
    validation and checkpoint checks) with a callback that records when each report arrives, no
    Prefect and no MLflow.

Both build the ``cpu`` preset's model and ``TrainConfig`` (``tasks.settings``, which imports no
Prefect) through ``model.optim.build_optimizer``, on a synthetic token shard (uniform random ids,
written with ``data.token_shards.TokenShardWriter`` to a temporary directory), and take the same steps
from the same seed: the first pair checks that both end with the same weights.

Timed: steps ``warmup + 1 .. warmup + timed`` of each run, between two reports of (b) (a report
waits for the device). Left out, and printed apart for (b): the model's construction, the first
``warmup`` steps, and after the window one more step with the only validation (none: no
validation shards) and checkpoint of the run, and the export. Reference and gptflow runs
alternate, ABBA; the figures are the medians of the pairs' ratios of tokens per second of wall
time, and of the process's CPU time (every thread's: steadier on a machine other jobs share).
Imports no Prefect or MLflow.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

# A bare GPU box has the repository but not the installed package (see bench/gpu_train.py).
if importlib.util.find_spec("gptflow") is None:
    sys.modules["gptflow"] = types.ModuleType("gptflow")
    sys.modules["gptflow"].__path__ = [str(Path(__file__).resolve().parent.parent)]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gptflow.data.loader import TokenWindows  # noqa: E402
from gptflow.data.shards import token_dtype  # noqa: E402
from gptflow.data.token_shards import IndexedShardWriter  # noqa: E402
from gptflow.model.checkpoint import load_model  # noqa: E402
from gptflow.model.config import ModelConfig, TrainConfig, pad_vocab_size  # noqa: E402
from gptflow.model.device import autocast, resolve_autocast_dtype, resolve_device  # noqa: E402
from gptflow.model.gpt import GPT  # noqa: E402
from gptflow.model.optim import build_optimizer, learning_rate_at  # noqa: E402
from gptflow.model.pretraining import run_pretraining  # noqa: E402
from gptflow.tasks.settings import PretrainSettings, build_config  # noqa: E402

SHARD_TOKENS = 4_000_000


@dataclasses.dataclass
class Timed:
    tokens_per_sec: float
    tokens_per_cpu_sec: float
    """Tokens per second of this process's CPU time, every thread's: on a shared machine, what the
    loop itself costs, less moved by the other jobs' share of the cores than wall time."""
    model: torch.nn.Module | None = None
    """The model after the run's last step, when asked for (to compare the two loops' weights)."""
    tail_s: float = 0.0
    """(b): the step after the window, the checkpoint and the export, as wall time."""


class ReportClock:
    """A ``TrainingCallback`` that notes when each report of the loop arrives, nothing more."""

    def __init__(self) -> None:
        self.report_times: dict[int, tuple[float, float]] = {}
        """Wall and CPU time (``time.perf_counter``, ``time.process_time``) of each report."""

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.report_times[step] = (time.perf_counter(), time.process_time())

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass

    def on_resume(self, step: int, path: Path) -> None:
        pass

    def on_unusable_checkpoint(self, path: Path, error: Exception, fallback: Path | None) -> None:
        pass


def cpu_preset(device: torch.device, warmup: int, timed: int) -> tuple[ModelConfig, TrainConfig]:
    """The cpu preset's model and training settings, shortened to ``warmup + timed + 1`` steps:
    a report closes the warmup and the window, and the last step alone validates and checkpoints."""
    settings = build_config(PretrainSettings, "cpu")
    model_config = dataclasses.replace(settings.model, vocab_size=pad_vocab_size(settings.tokenizer.vocab_size))
    interval = settings.train.log_interval
    if warmup % interval or timed % interval:
        raise SystemExit(f"--warmup-steps and --timed-steps must be multiples of the preset's log_interval, {interval}")
    max_steps = warmup + timed + 1
    train_config = dataclasses.replace(settings.train, max_steps=max_steps, val_interval=0,
                                       checkpoint_interval=max_steps, device=str(device))
    return model_config, train_config


def write_synthetic_shard(directory: Path, vocab_size: int) -> Path:
    path = directory / "train.arrow"
    writer = IndexedShardWriter(path, token_dtype(vocab_size))
    writer.write(np.random.default_rng(0).integers(0, vocab_size, SHARD_TOKENS).astype(token_dtype(vocab_size)))
    writer.close()
    return path


def wait_for(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_reference(model_config: ModelConfig, train_config: TrainConfig, shard: Path, device: torch.device,
                  warmup: int, keep_model: bool) -> Timed:
    """(a): the bare loop over the same batches, presampled and on the device before timing."""
    windows = TokenWindows([shard], model_config.block_size, model_config.vocab_size)
    batches = [
        tuple(tensor.to(device) for tensor in windows.sample_batch(train_config.seed, step, micro_step,
                                                                    train_config.micro_batch_size))
        for step in range(train_config.max_steps) for micro_step in range(train_config.grad_accum_steps)
    ]
    autocast_dtype = resolve_autocast_dtype(train_config.dtype, device)
    torch.manual_seed(train_config.seed)
    model = GPT(model_config).to(device)
    optimizer = build_optimizer(model, train_config, device)
    model.train()
    micro_batches = iter(batches)
    accum_steps = train_config.grad_accum_steps

    def steps(count: int, first: int) -> None:
        for step in range(first, first + count):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step, train_config)
            for _ in range(accum_steps):
                inputs, targets = next(micro_batches)
                with autocast(device, autocast_dtype):
                    loss = model(inputs, targets, return_logits=False)[1]
                (loss / accum_steps).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    timed = train_config.max_steps - 1 - warmup
    steps(warmup, 0)
    wait_for(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    steps(timed, warmup)
    wait_for(device)
    elapsed, cpu_elapsed = time.perf_counter() - started, time.process_time() - cpu_started
    steps(1, warmup + timed)
    tokens = timed * _tokens_per_step(model_config, train_config)
    return Timed(tokens / elapsed, tokens / cpu_elapsed, model if keep_model else None)


def run_gptflow(model_config: ModelConfig, train_config: TrainConfig, shard: Path, run_dir: Path,
                warmup: int, keep_model: bool) -> Timed:
    """(b): gptflow's trainer, timed between the reports that close the warmup and the window."""
    clock = ReportClock()
    run_pretraining(model_config, train_config, [shard], [], run_dir, callback=clock)
    finished = time.perf_counter()
    last_in_window = train_config.max_steps - 1
    timed = last_in_window - warmup
    (started, cpu_started), (ended, cpu_ended) = clock.report_times[warmup], clock.report_times[last_in_window]
    model = load_model(run_dir / "final") if keep_model else None
    tokens = timed * _tokens_per_step(model_config, train_config)
    return Timed(tokens / (ended - started), tokens / (cpu_ended - cpu_started), model, tail_s=finished - ended)


def _tokens_per_step(model_config: ModelConfig, train_config: TrainConfig) -> int:
    return model_config.block_size * train_config.micro_batch_size * train_config.grad_accum_steps


def same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    expected = {name: tensor.cpu() for name, tensor in first.state_dict().items()}
    actual = {name: tensor.cpu() for name, tensor in second.state_dict().items()}
    return expected.keys() == actual.keys() and all(torch.equal(expected[name], actual[name]) for name in expected)


def main() -> None:
    args = _parser().parse_args()
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as model.train does on CUDA, for both loops
    model_config, train_config = cpu_preset(device, args.warmup_steps, args.timed_steps)
    loops = ("reference", "gptflow") if args.loops == "both" else (args.loops,)
    print(f"device {device}; torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; "
          f"{os.cpu_count()} CPUs; load average {_load_average()}")
    print(f"cpu preset: {model_config.n_layer} layers x {model_config.n_embd}, context {model_config.block_size}, "
          f"vocab {model_config.vocab_size}, micro-batch {train_config.micro_batch_size} x "
          f"{train_config.grad_accum_steps}; each run: {args.warmup_steps} warmup steps, "
          f"{args.timed_steps} timed, 1 more (checkpoint, export)")
    results: dict[str, list[Timed]] = {loop: [] for loop in loops}
    with tempfile.TemporaryDirectory(prefix="gptflow-trainer-overhead-") as tmp:
        shard = write_synthetic_shard(Path(tmp), model_config.vocab_size)
        for pair in range(args.pairs):
            order = loops if pair % 2 == 0 else tuple(reversed(loops))
            for loop in order:
                keep_model = pair == 0 and len(loops) == 2
                if loop == "reference":
                    timed = run_reference(model_config, train_config, shard, device, args.warmup_steps, keep_model)
                else:
                    timed = run_gptflow(model_config, train_config, shard, Path(tmp) / f"run{pair}",
                                        args.warmup_steps, keep_model)
                results[loop].append(timed)
                print(f"pair {pair + 1}  {loop:<9}  {timed.tokens_per_sec:9,.0f} tokens/s  "
                      f"{timed.tokens_per_cpu_sec:9,.0f} tokens per CPU-s", flush=True)
            if keep_model:
                same = same_weights(results["reference"][0].model, results["gptflow"][0].model)
                print(f"same weights after {train_config.max_steps} steps: {'yes' if same else 'NO'}")
                for loop in loops:
                    results[loop][0].model = None
    _print_summary(results)
    print(f"load average at the end {_load_average()}")


def _print_summary(results: dict[str, list[Timed]]) -> None:
    print()
    for loop, timings in results.items():
        rates = [timed.tokens_per_sec for timed in timings]
        cpu_rates = [timed.tokens_per_cpu_sec for timed in timings]
        print(f"{loop:<9}  median {statistics.median(rates):9,.0f} tokens/s  (each: "
              f"{', '.join(f'{rate:,.0f}' for rate in rates)}); {statistics.median(cpu_rates):,.0f} per CPU-s")
    if "gptflow" in results:
        tails = [timed.tail_s for timed in results["gptflow"]]
        print(f"gptflow's last step + checkpoint + export, left out: median {statistics.median(tails):.2f} s")
    if len(results) == 2:
        for measure, per in (("tokens_per_sec", "wall time"), ("tokens_per_cpu_sec", "CPU time")):
            ratios = [getattr(ours, measure) / getattr(bare, measure)
                      for bare, ours in zip(results["reference"], results["gptflow"])]
            print(f"ratio gptflow / reference by {per}: median {statistics.median(ratios):.3f}  (each pair: "
                  f"{', '.join(f'{ratio:.3f}' for ratio in ratios)})")


def _load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "n/a"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5, help="reference and gptflow runs, alternated (default 5)")
    parser.add_argument("--warmup-steps", type=int, default=25,
                        help="untimed steps opening each run; a multiple of the preset's log_interval (default 25)")
    parser.add_argument("--timed-steps", type=int, default=50,
                        help="timed steps of each run; a multiple of the preset's log_interval (default 50)")
    parser.add_argument("--loops", choices=("both", "reference", "gptflow"), default="both")
    parser.add_argument("--device", default="auto", help="torch device (default auto: cuda, mps, else cpu)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own)")
    return parser


if __name__ == "__main__":
    main()
