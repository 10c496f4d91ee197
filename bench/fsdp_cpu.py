"""Step time of FSDP against DDP with two gloo processes on the CPU.

    python bench/fsdp_cpu.py                  # 4 layers × 128 wide, 40 steps per parallelism
    python bench/fsdp_cpu.py --steps 80 --n-embd 256

Each parallelism trains the same model on the same random tokens through ``model.pretraining.run_pretraining``
under ``torchrun --nproc_per_node 2`` (one thread per process), checkpointing only at the end.
The step time is the median over report intervals of ``train/tokens_per_sec``, the first
interval left out (warm-up); the pause for the final checkpoint is not in it. No Prefect, no MLflow.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from gptflow.model.config import ModelConfig, TrainConfig
from gptflow.model.pretraining import run_pretraining

VOCAB_SIZE = 512
LOG_INTERVAL = 5


class StepTimes:
    def __init__(self, tokens_per_step: int) -> None:
        self.tokens_per_step = tokens_per_step
        self.seconds: list[float] = []

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if "train/tokens_per_sec" in metrics and step > LOG_INTERVAL:
            self.seconds.append(self.tokens_per_step / metrics["train/tokens_per_sec"])

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    model_config = ModelConfig(n_layer=args.n_layer, n_head=4, n_embd=args.n_embd, block_size=args.block_size,
                               vocab_size=VOCAB_SIZE)
    train_config = TrainConfig(
        max_steps=args.steps, micro_batch_size=args.micro_batch, warmup_steps=5, log_interval=LOG_INTERVAL,
        val_interval=0, checkpoint_interval=args.steps, device="cpu", nproc=2, parallelism=args.parallelism,
    )
    times = StepTimes(args.micro_batch * 2 * args.block_size)
    run_pretraining(model_config, train_config, [args.shard], [], args.work / args.parallelism, callback=times)
    if int(os.environ["RANK"]) == 0:
        (args.work / f"{args.parallelism}.json").write_text(json.dumps(times.seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per rank and step")
    parser.add_argument("--parallelism", help=argparse.SUPPRESS)  # set in the worker processes
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shard", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.parallelism:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        shard = work / "train.arrow"
        tokens = np.random.default_rng(0).integers(0, VOCAB_SIZE, size=500_000).astype(np.uint16)
        schema = pa.schema([("tokens", pa.uint16())])
        with pa.OSFile(str(shard), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            writer.write_batch(pa.record_batch([pa.array(tokens)], schema=schema))
        medians = {}
        for parallelism in ("ddp", "fsdp"):
            forwarded = [f"--{name.replace('_', '-')}={getattr(args, name)}"
                         for name in ("steps", "n_layer", "n_embd", "block_size", "micro_batch")]
            subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
                 *forwarded, f"--parallelism={parallelism}", f"--work={work}", f"--shard={shard}"],
                env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True, capture_output=True,
            )
            medians[parallelism] = statistics.median(json.loads((work / f"{parallelism}.json").read_text()))
    print(f"model: {args.n_layer} layers × {args.n_embd} wide, block {args.block_size}, "
          f"{args.micro_batch} sequences per rank, 2 gloo processes")
    for parallelism, seconds in medians.items():
        print(f"{parallelism:5s} {seconds * 1000:8.1f} ms/step")
    print(f"fsdp/ddp {medians['fsdp'] / medians['ddp']:.2f}x")


if __name__ == "__main__":
    main()
