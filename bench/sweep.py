"""A 4-point sweep against the 4 `gptflow pretrain` commands it replaces, on this machine.

    python bench/sweep.py                         # tiny preset, 4 learning rates, 5 stdlib packages
    python bench/sweep.py --steps 200 --parallel 2

Each way starts from an empty workspace, through the command line as a user runs it (Prefect's
temporary server, MLflow's SQLite store): the 4 pretrain commands one after the other (the first
computes the data stages, the others find them cached); `gptflow sweep --max-parallel 1`; and
`gptflow sweep --max-parallel K`. Prints the wall seconds of each and their ratio to the
sequential commands.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

PACKAGES = ("json", "logging", "email", "collections", "importlib")
LEARNING_RATES = ("1e-3", "3e-3", "1e-2", "3e-2")


def _corpus(directory: Path) -> Path:
    """Five standard-library packages (~300 KB of real text): what the tests train the tiny preset on."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for package in PACKAGES:
        for source in sorted((stdlib / package).glob("*.py")):
            shutil.copy2(source, directory / f"{package}_{source.name}")
    return directory


def _gptflow(arguments: list[str], workspace: Path, prefect_home: Path) -> float:
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith(("MLFLOW_", "PREFECT_API"))}
    environment |= {"PREFECT_HOME": str(prefect_home), "GPTFLOW_HOME": str(workspace),
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "gptflow.flows.cli", *arguments], env=environment,
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"gptflow {' '.join(arguments)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="train.max_steps of every point (tiny preset: 30)")
    parser.add_argument("--parallel", type=int, default=2, help="--max-parallel of the parallel sweep (default 2)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="gptflow-bench-sweep-") as temporary:
        root = Path(temporary)
        corpus = _corpus(Path(tempfile.mkdtemp(dir=root)))
        shared = ["--corpus", str(corpus), "--preset", "tiny", "--set", f"train.max_steps={args.steps}"]
        print(f"4 points (train.learning_rate={','.join(LEARNING_RATES)}), tiny preset, {args.steps} steps, "
              f"{os.cpu_count()} CPU cores", flush=True)
        # An untimed command first: the first start of Python, torch and Prefect from a cold disk.
        _gptflow(["pretrain", *shared, "--set", "train.max_steps=1"], root / "warm-up", root / "prefect-warm-up")

        timings = {}
        sequential = 0.0
        for rate in LEARNING_RATES:
            sequential += _gptflow(["pretrain", *shared, "--set", f"train.learning_rate={rate}"],
                                   root / "sequential", root / "prefect-sequential")
        timings["4 x gptflow pretrain, one after the other"] = sequential
        grid = ["--grid", f"train.learning_rate={','.join(LEARNING_RATES)}"]
        for parallel in sorted({1, args.parallel}):
            timings[f"gptflow sweep --max-parallel {parallel}"] = _gptflow(
                ["sweep", *shared, *grid, "--max-parallel", str(parallel)], root / f"sweep-{parallel}",
                root / f"prefect-sweep-{parallel}")

    width = max(map(len, timings))
    print(f"\n{'':{width}}  wall s  vs sequential")
    for name, seconds in timings.items():
        print(f"{name:{width}}  {seconds:6.1f}  {sequential / seconds:5.2f}x")


if __name__ == "__main__":
    main()
