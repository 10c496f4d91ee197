"""A rank's start-up against corpus size: opening the train split and reading the first batch.

    python bench/loader_startup.py
    python bench/loader_startup.py --shard-mb 4 --shards 8 --scales 1 4 16

Token shards of random ids (uint16, ``--shard-mb`` each) are committed as the tokenize stage
commits them, ``--shards`` times each of ``--scales``. Timed, best of ``--repeats`` (a warm page
cache: the files were just written): (a) what a rank does before its first step now: open the
split as ``TokenWindows`` through the store (each shard's footer) and read the first global batch
of the epoch (which checks the content hash of each shard it touches, when first read); (b) what
start-up did before issue 27: the pretrain task's ``verify_files`` over every shard, then opening
the split with a scan of every id (``pyarrow.compute.max``, as the loader did), then the batch.
No model, no Prefect, no MLflow.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gptflow.data.commits import atomic_directory
from gptflow.data.loader import TokenWindows
from gptflow.data.shards import TOKEN_COLUMN
from gptflow.data.store import LOCAL_STORE
from gptflow.data.token_shards import IndexedShardWriter

BLOCK_SIZE, VOCAB_SIZE, GLOBAL_BATCH = 256, 8192, 64


def write_shards(store: Path, count: int, tokens_per_shard: int, first: int) -> list[Path]:
    rng = np.random.default_rng(first)
    paths = []
    for index in range(first, first + count):
        with atomic_directory(store / "tokens" / f"unit-{index:05d}") as tmp:
            writer = IndexedShardWriter(tmp / "train.arrow", np.dtype(np.uint16))
            writer.write(rng.integers(0, VOCAB_SIZE, tokens_per_shard, dtype=np.uint16))
            writer.close()
        paths.append(store / "tokens" / f"unit-{index:05d}" / "train.arrow")
    return paths


def first_batch_now(paths: list[Path]) -> None:
    windows = TokenWindows(paths, BLOCK_SIZE, VOCAB_SIZE, store=LOCAL_STORE)
    windows.batch(0, np.arange(GLOBAL_BATCH))


def first_batch_before(paths: list[Path]) -> None:
    LOCAL_STORE.verify_files(paths)
    for path in paths:
        with pa.memory_map(str(path)) as source:
            pc.max(pa.ipc.open_file(source).read_all().column(TOKEN_COLUMN))
    TokenWindows(paths, BLOCK_SIZE, VOCAB_SIZE).batch(0, np.arange(GLOBAL_BATCH))


def best(run: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shard-mb", type=float, default=4.0)
    parser.add_argument("--shards", type=int, default=8, help="shards at scale 1")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tokens_per_shard = int(args.shard_mb * 1e6 / 2)
    print(f"{'scale':>5} {'shards':>6} {'MB':>7} {'(a) now s':>10} {'(b) before s':>13} {'(b)/(a)':>8}")
    with tempfile.TemporaryDirectory(prefix="gptflow-loader-startup-") as folder:
        paths: list[Path] = []
        for scale in sorted(args.scales):
            paths += write_shards(Path(folder), scale * args.shards - len(paths), tokens_per_shard, len(paths))
            now, before = best(lambda: first_batch_now(paths), args.repeats), best(lambda: first_batch_before(paths),
                                                                                   args.repeats)
            megabytes = sum(path.stat().st_size for path in paths) / 1e6
            print(f"{scale:>5} {len(paths):>6} {megabytes:>7.0f} {now:>10.3f} {before:>13.3f} {before / now:>8.1f}")


if __name__ == "__main__":
    main()
