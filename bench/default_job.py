"""The default job before and after issue 28: `gptflow pretrain` with every default (what `make
pretrain` runs), side by side with the same command given the settings the `cpu` preset had before.

    python bench/default_job.py                  # both, before first; ~15 minutes on 2 cores
    python bench/default_job.py --runs now       # the current defaults alone
    python bench/default_job.py --keep DIR       # keep each run's workspace under DIR

Each run is a fresh process on a new workspace, as a newcomer runs it: every stage executes
(ingest, tokenizer, tokenize, pretrain, evaluate), on the built-in default corpus, through the
temporary Prefect server a run without `gptflow up` starts. Both runs read the same corpus with the
same data and tokenizer settings, so they train the same tokenizer and score the same val split;
the final evaluation (`eval/val_loss`, `eval/bits_per_byte` on `eval.eval_tokens` of it) is the
figure compared.

Printed: the load average at the start and end; per run, the flow's wall time (its MLflow run,
which spans the flow), the command's, steps, tokens, the final val loss and bits per byte; the
ratio of the flow times; and the curve of val bits/byte against seconds since the flow started.
A curve point is a validation during training (`val/loss` on `train.val_tokens` of the val split,
at its MLflow timestamp) in bits per byte, converted with the val split's bytes per token that the
final evaluation measured; its last point is the final evaluation itself.

The Prefect home is a scratch folder and the calling shell's `PREFECT_API_URL`,
`MLFLOW_TRACKING_URI` and `GPTFLOW_HOME` are ignored, as in bench/startup.py.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

CLI = [sys.executable, "-m", "gptflow.flows.cli", "pretrain"]
OUTSIDE_SETTINGS = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "GPTFLOW_HOME")

BEFORE_ISSUE_28 = {
    "model.position": "learned", "model.norm": "layernorm", "model.qk_norm": "false", "model.mlp": "gelu",
    "model.tie_embeddings": "true", "model.zero_init_projections": "false", "model.logit_softcap": "0",
    "train.optimizer": "adamw", "train.learning_rate": "2e-3", "train.max_steps": "700", "train.warmup_steps": "50",
    "train.val_interval": "250", "train.checkpoint_interval": "250", "train.dtype": "float32",
}
"""Every setting in which the `cpu` preset (the default) differed before issue 28 (GPT-2's recipe,
700 steps, float32), as `--set` pairs; the shape, batch and evaluation settings did not change."""

RUNS = {"before": BEFORE_ISSUE_28, "now": {}}


@dataclass
class JobResult:
    name: str
    flow_s: float
    command_s: float
    steps: int
    tokens: float
    val_loss: float
    bits_per_byte: float
    curve: list[tuple[float, float]]
    """(seconds since the flow started, val bits/byte)."""


def main() -> None:
    args = _parser().parse_args()
    with tempfile.TemporaryDirectory(prefix="gptflow-default-job-") as scratch:
        root = Path(args.keep) if args.keep else Path(scratch)
        env = {name: value for name, value in os.environ.items() if name not in OUTSIDE_SETTINGS}
        env |= {"PREFECT_HOME": str(Path(scratch) / "prefect-home"), "PYTHONUNBUFFERED": "1"}
        print(f"load average at the start: {_load()}", flush=True)
        results = [_run(name, RUNS[name], root / name, env) for name in args.runs]
        print(f"load average at the end:   {_load()}\n")
    _report(results)


def _run(name: str, overrides: dict[str, str], workspace: Path, env: dict[str, str]) -> JobResult:
    if workspace.exists():
        raise SystemExit(f"{workspace} exists: each run needs a new workspace (remove it or pick another --keep)")
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    log = workspace.parent / f"{name}.log"
    workspace.parent.mkdir(parents=True, exist_ok=True)
    print(f"{name}: gptflow pretrain {' '.join(sets)} (log: {log})", flush=True)
    started = time.perf_counter()
    with open(log, "w") as output:
        finished = subprocess.run([*CLI, "--workspace", str(workspace), *sets], env=env, stdout=output,
                                  stderr=subprocess.STDOUT, check=False)
    command_s = time.perf_counter() - started
    if finished.returncode != 0:
        raise SystemExit(f"{name}: gptflow pretrain exited with {finished.returncode}; see {log}")
    return _read_run(name, workspace, command_s)


def _read_run(name: str, workspace: Path, command_s: float) -> JobResult:
    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gptflow-pretrain")
    run = client.search_runs([experiment.experiment_id], max_results=1)[0]
    metrics = run.data.metrics
    bits_per_nat = metrics["eval/bits_per_byte"] / metrics["eval/val_loss"]
    start_ms = run.info.start_time
    curve = [((point.timestamp - start_ms) / 1000, point.value * bits_per_nat)
             for point in client.get_metric_history(run.info.run_id, "val/loss")]
    flow_s = (run.info.end_time - start_ms) / 1000
    curve.append((flow_s, metrics["eval/bits_per_byte"]))
    return JobResult(name=name, flow_s=flow_s, command_s=command_s, steps=int(run.data.params["train.max_steps"]),
                     tokens=metrics["train/tokens"], val_loss=metrics["eval/val_loss"],
                     bits_per_byte=metrics["eval/bits_per_byte"], curve=curve)


def _report(results: list[JobResult]) -> None:
    print("| run | flow s | command s | steps | train tokens | val loss (nats/token) | val bits/byte |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for result in results:
        print(f"| {result.name} | {result.flow_s:.0f} | {result.command_s:.0f} | {result.steps} | "
              f"{result.tokens / 1e6:.2f}M | {result.val_loss:.3f} | {result.bits_per_byte:.3f} |")
    by_name = {result.name: result for result in results}
    if {"before", "now"} <= by_name.keys():
        before, now = by_name["before"], by_name["now"]
        print(f"\nflow time now / before: {now.flow_s / before.flow_s:.2f}; val bits/byte now - before: "
              f"{now.bits_per_byte - before.bits_per_byte:+.3f}")
        reached = next((seconds for seconds, bits in now.curve if bits <= before.bits_per_byte), math.nan)
        print(f"now reaches before's final {before.bits_per_byte:.3f} bits/byte at {reached:.0f} s of its flow")
    print("\nval bits/byte against seconds since the flow started (last point: the final evaluation)")
    for result in results:
        print(f"{result.name:7s} " + ", ".join(f"{seconds:.0f} s: {bits:.3f}" for seconds, bits in result.curve))


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS),
                        help="which settings to run, in this order (default: before, then now)")
    parser.add_argument("--keep", metavar="DIR", help="put each run's workspace and log under DIR and keep them")
    return parser


if __name__ == "__main__":
    main()
