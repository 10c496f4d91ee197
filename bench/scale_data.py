"""How the tokenize stage scales with Ray workers: 2 workers against 1, one tokenizer thread each.

    python bench/scale_data.py                       # the built-in corpus
    python bench/scale_data.py --corpus ./texts --repeats 3 --workers 4

Ingests the corpus into a temporary store and trains a tokenizer once (in this process), then,
for each worker count, starts a local Ray cluster of that many CPUs (`ray start --head`, no
dashboard), tokenizes the whole corpus into a fresh token store through the stage's Ray map (each
group of files a Prefect task run on prefect-ray's task runner, as `--ray` runs it), and stops
the cluster. Starting a cluster is not timed; each run's time is the stage's wall time, best of
--repeats, runs of each count interleaved. Every worker tokenizes with one thread
(`tokenize.workers=1`), so the ratio is the per-worker efficiency: 2.0x would be perfect scaling.
A Prefect temporary server records the task runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prefect import flow

from gptflow.data.config import IngestConfig, TokenizeConfig, TokenizerConfig
from gptflow.data.ingest import CorpusManifest, ingest_corpus
from gptflow.data.sources import BUILTIN_CORPUS, resolve_sources
from gptflow.data.tokenize import tokenize_corpus
from gptflow.data.tokenizer import TokenizerArtifact, train_tokenizer
from gptflow.tasks.tokenize import unit_label
from gptflow.tasks.units import UnitRunner


@flow(name="bench-scale-data")
def tokenize_on_ray(manifest: CorpusManifest, tokenizer: TokenizerArtifact, config: TokenizeConfig, store: str,
                    address: str) -> float:
    """Wall seconds of the tokenize stage with its units on the Ray cluster at ``address``."""
    work_bytes = sum(sum(unit.bytes.values()) for unit in manifest.units)
    map_units = UnitRunner(address).for_stage("tokenize", work_bytes, label=unit_label)
    started = time.perf_counter()
    tokenize_corpus(manifest, tokenizer, config, Path(store), map_units=map_units)
    return time.perf_counter() - started


def main() -> None:
    args = _parser().parse_args()
    args.corpus = args.corpus or [BUILTIN_CORPUS]
    counts = [1, args.workers]
    with tempfile.TemporaryDirectory(prefix="gptflow-bench-") as scratch:
        store = Path(scratch)
        manifest = ingest_corpus(resolve_sources(args.corpus), IngestConfig(), store)
        tokenizer = train_tokenizer(manifest, TokenizerConfig(vocab_size=args.vocab_size), store)
        config = TokenizeConfig(batch_bytes=args.batch_bytes, workers=1)
        times: dict[int, list[float]] = {count: [] for count in counts}
        for repeat in range(args.repeats):
            for count in counts:
                token_store = Path(tempfile.mkdtemp(dir=scratch))
                with _ray_cluster(count) as address:
                    times[count].append(tokenize_on_ray(manifest, tokenizer, config, str(token_store), address))
                shutil.rmtree(token_store)
                print(f"repeat {repeat + 1}: {count} worker(s) {times[count][-1]:.1f} s", flush=True)

    n_bytes = sum(manifest.totals["bytes"].values())
    groups = -(-n_bytes // args.batch_bytes)
    print()
    print(f"corpus   {', '.join(args.corpus)}: {len(manifest.units)} files, {n_bytes / 1e6:.1f} MB; "
          f"about {groups} groups of {args.batch_bytes / 2**20:g} MiB; best of {args.repeats}")
    print(f"machine  {os.cpu_count()} CPUs; Ray {_ray_version()}, one tokenizer thread per worker")
    print()
    print(f"{'workers':>8} {'seconds':>8} {'MB/s':>7} {'speed-up':>9}")
    base = min(times[1])
    for count in counts:
        best = min(times[count])
        print(f"{count:>8} {best:>8.1f} {n_bytes / 1e6 / best:>7.2f} {base / best:>8.2f}x")


class _ray_cluster:
    """A local Ray cluster of ``cpus`` CPUs for the ``with`` block; its address."""

    def __init__(self, cpus: int) -> None:
        self.cpus = cpus

    def __enter__(self) -> str:
        self.temp_dir = tempfile.mkdtemp(prefix="gptflow-ray-", dir="/tmp")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.head = subprocess.Popen(
            [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--port", str(port),
             "--node-ip-address", "127.0.0.1", "--num-cpus", str(self.cpus), "--object-store-memory",
             str(200 * 1024 * 1024), "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", self.temp_dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return f"127.0.0.1:{port}"
            except OSError:
                time.sleep(0.5)

    def __exit__(self, *exc: object) -> None:
        os.killpg(self.head.pid, signal.SIGTERM)
        try:
            self.head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.head.pid, signal.SIGKILL)
            self.head.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _ray_version() -> str:
    import ray

    return ray.__version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", action="append", default=None, help=f"default: {BUILTIN_CORPUS}")
    parser.add_argument("--workers", type=int, default=2, help="the worker count compared with 1 (default 2)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-bytes", type=int, default=1 << 20,
                        help="text per encode batch, and so per group of files (default 1 MiB: many groups)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    return parser


if __name__ == "__main__":
    main()
