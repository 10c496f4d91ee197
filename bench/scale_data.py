"""How the tokenize stage scales with Ray workers: 2 workers against 1, one tokenizer thread each.

    python bench/scale_data.py                       # the built-in corpus, 4 copies (about 50 MB)
    python bench/scale_data.py --corpus ./texts --copies 1 --repeats 3 --workers 4

Ingests the corpus into a temporary store and trains a tokenizer once (in this process), then,
for each worker count, starts a local Ray cluster of that many CPUs (`ray start --head`, no
dashboard), tokenizes the whole corpus into a fresh token store through the stage's Ray map (each
group of files a Prefect task run on prefect-ray's task runner, as `--ray` runs it), and stops
the cluster. Starting a cluster is not timed. Two times per run, best of --repeats (runs of each
count interleaved): the stage's wall time, which includes connecting to the cluster and starting
its workers (seconds, a fixed cost per stage), and the units' span, from the first unit's start to
the last one's end (from their Prefect task runs): the work itself. Every worker tokenizes with
one thread (`tokenize.workers=1`), so the span's ratio is the per-worker efficiency; 2.0x would be
perfect scaling. --copies N writes the corpus N times, each line of copy k prefixed with `#k `
(so that dedup keeps them all), to make the work long beside the fixed cost.
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

from prefect import flow, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.runtime import flow_run

from gptflow.data.config import IngestConfig, TokenizeConfig, TokenizerConfig
from gptflow.data.ingest import CorpusManifest, ingest_corpus
from gptflow.data.sources import BUILTIN_CORPUS, resolve_sources
from gptflow.data.store import LOCAL_STORE
from gptflow.data.tokenize import tokenize_corpus
from gptflow.data.tokenizer import TokenizerArtifact, train_tokenizer
from gptflow.tasks.runtime.unit_maps import UnitRunner
from gptflow.tasks.stages.tokenize import unit_label


@flow(name="bench-scale-data")
def tokenize_on_ray(manifest_path: str, tokenizer: TokenizerArtifact, config: TokenizeConfig, store: str,
                    address: str) -> tuple[float, str]:
    """Wall seconds of the tokenize stage with its units on the Ray cluster at ``address``, and
    the flow run's id. The manifest is read from its file: a flow run's parameters must be small."""
    manifest = LOCAL_STORE.read_manifest(CorpusManifest, manifest_path)
    map_units = UnitRunner(address).for_stage("tokenize", LOCAL_STORE, label=unit_label)
    started = time.perf_counter()
    tokenize_corpus(manifest, tokenizer, config, Path(store), map_units=map_units)
    return time.perf_counter() - started, str(flow_run.id)


def _units_span(flow_run_id: str) -> float:
    """Seconds from the first unit's start to the last unit's end, from the flow run's task runs."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return (max(run.end_time for run in runs) - min(run.start_time for run in runs)).total_seconds()


def main() -> None:
    args = _parser().parse_args()
    args.corpus = args.corpus or [BUILTIN_CORPUS]
    counts = [1, args.workers]
    with tempfile.TemporaryDirectory(prefix="gptflow-bench-") as scratch:
        store = Path(scratch)
        sources = resolve_sources(args.corpus)
        if args.copies > 1:
            sources = resolve_sources([str(_copies(sources.files, args.copies, store / "copies"))])
        manifest = ingest_corpus(sources, IngestConfig(), store)
        tokenizer = train_tokenizer(manifest, TokenizerConfig(vocab_size=args.vocab_size), store)
        config = TokenizeConfig(batch_bytes=args.batch_bytes, workers=1)
        times: dict[int, list[tuple[float, float]]] = {count: [] for count in counts}
        for repeat in range(args.repeats):
            for count in counts:
                token_store = Path(tempfile.mkdtemp(dir=scratch))
                with _ray_cluster(count) as address:
                    wall, flow_run_id = tokenize_on_ray(manifest.path, tokenizer, config, str(token_store), address)
                    times[count].append((wall, _units_span(flow_run_id)))
                shutil.rmtree(token_store)
                print(f"repeat {repeat + 1}: {count} worker(s) {times[count][-1][0]:.1f} s wall, "
                      f"{times[count][-1][1]:.1f} s span", flush=True)

    n_bytes = sum(manifest.totals["bytes"].values())
    groups = -(-n_bytes // args.batch_bytes)
    print()
    print(f"corpus   {', '.join(args.corpus)}: {len(manifest.units)} files, {n_bytes / 1e6:.1f} MB; "
          f"about {groups} groups of {args.batch_bytes / 2**20:g} MiB; best of {args.repeats}")
    print(f"machine  {os.cpu_count()} CPUs; Ray {_ray_version()}, one tokenizer thread per worker")
    print()
    print(f"{'workers':>8} {'wall s':>7} {'span s':>7} {'MB/s (span)':>12} {'speed-up (wall)':>16} {'speed-up (span)':>16}")
    base_wall, base_span = (min(run[index] for run in times[1]) for index in (0, 1))
    for count in counts:
        wall, span = (min(run[index] for run in times[count]) for index in (0, 1))
        print(f"{count:>8} {wall:>7.1f} {span:>7.1f} {n_bytes / 1e6 / span:>12.2f} {base_wall / wall:>15.2f}x "
              f"{base_span / span:>15.2f}x")


def _copies(files: list, copies: int, folder: Path) -> Path:
    """``copies`` copies of the text of ``files`` in ``folder``, every line of copy k prefixed with ``#k ``."""
    for copy in range(copies):
        for index, source in enumerate(files):
            text = source.path.read_text(errors="replace")
            target = folder / f"copy-{copy}" / f"{index:05d}-{source.path.name}.txt"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("".join(f"#{copy} {line}" for line in text.splitlines(keepends=True)))
    return folder


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
    parser.add_argument("--copies", type=int, default=4, help="copies of the corpus to tokenize (default 4)")
    parser.add_argument("--batch-bytes", type=int, default=1 << 20,
                        help="text per encode batch, and so per group of files (default 1 MiB: many groups)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    return parser


if __name__ == "__main__":
    main()
