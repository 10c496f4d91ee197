"""One epoch of the same windows read from S3 (moto's server on this machine) within a cache of a
tenth of the corpus: by gptflow's streaming loader, and by MosaicML streaming as a reference.

    python bench/streaming_reference.py
    python bench/streaming_reference.py --shards 80 --shard-tokens 65536

Reading only, no model: one epoch of the windows of ``BLOCK_SIZE + 1`` tokens tiling ``--shards``
random shards of ``--shard-tokens`` uint16 ids, ``MICRO_BATCH`` windows a batch, each reader from a
fresh local folder (another machine's view), both in this process against one moto server:

gptflow   the shards as the tokenize stage commits them (``bench/streaming.py``'s ``publish_corpus``),
          read in epoch order through ``TokenWindows.batch`` streamed through a ``ShardCache`` capped
          at 10% of the corpus, with ``bench/streaming.py``'s pieces of one shard and buffers of two;
MosaicML  the same windows, one sample each (a column ``ndarray:uint16:BLOCK_SIZE + 1``), written by
          ``MDSWriter`` to the same S3 server in MDS shards of one gptflow shard's bytes, read by its
          ``StreamingDataset`` (shuffled, ``cache_limit`` 10% of the gptflow corpus, a shuffle block
          of as many windows as gptflow's shuffle buffer) through a ``DataLoader`` of no workers.

Printed: tokens/s of reading (windows read x BLOCK_SIZE, after the first batch), seconds to the
first batch (from opening the dataset), bytes fetched from the store against the reader's own
corpus format (gptflow's count includes what its cache had fetched ahead, by the epoch's end, of
the next epoch's first buffer), the largest its local folder grew, and the ratio of the two
readers' tokens/s. Both
must read the same multiset of windows (their token sums are compared). Load averages are printed
at start and end: moto is a Python server on the same cores as the readers.

MosaicML streaming is installed beside, not into, the project's environment (its pins ask for
numpy < 2.2, and its package imports torchvision, which nothing here uses; PyPI's torchvision
wheels for the project's torch need CUDA's libraries, so with a CPU-only torch an older one that
imports without its compiled operators stands in):

    pip install --target /work/ref-pkgs --no-deps mosaicml-streaming python-snappy cramjam Brotli zstd
    pip install --target /work/ref-pkgs --no-deps torchvision==0.16.2  # CPU-only torch only
    PYTHONPATH=/work/ref-pkgs:$PYTHONPATH python bench/streaming_reference.py
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import signal
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from gptflow.data.loader import TokenWindows

HERE = Path(__file__).resolve().parent
LOCAL_SIZE_EVERY = 32
"""Batches between two looks at a reader's local folder (time spent looking is not counted)."""


def load_gptflow_bench() -> ModuleType:
    """bench/streaming.py, imported under a name of its own: as ``streaming`` it would be MosaicML's package."""
    spec = importlib.util.spec_from_file_location("gptflow_streaming_bench", HERE / "streaming.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def import_mosaicml() -> ModuleType:
    """MosaicML's ``streaming`` package; exits with how to install it if it is not there."""
    # bench/ leads sys.path when this script runs, and its streaming.py would shadow the package.
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's image extension, unused here
            import streaming
    except ImportError as error:
        sys.exit(f"MosaicML streaming is missing ({error}): pip install mosaicml-streaming (see this script's "
                 "docstring for installing it beside the project's environment)")
    return streaming


gptflow_bench = load_gptflow_bench()
BLOCK_SIZE, MICRO_BATCH, VOCAB_SIZE = gptflow_bench.BLOCK_SIZE, gptflow_bench.MICRO_BATCH, gptflow_bench.VOCAB_SIZE


@dataclasses.dataclass
class Reading:
    """One reader's epoch."""

    reader: str
    windows: int
    token_sum: int
    first_batch_s: float
    rest_s: float
    fetched_bytes: int
    corpus_bytes: int
    largest_local_bytes: int

    @property
    def tokens_per_s(self) -> float:
        return (self.windows - MICRO_BATCH) * BLOCK_SIZE / self.rest_s


def read_epoch(reader: str, open_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
               local: Path) -> Reading:
    """Time ``open_batches`` (from opening the dataset) and one epoch of the batches it gives;
    look at the size of the local folder ``local`` every ``LOCAL_SIZE_EVERY`` batches."""
    windows, token_sum, largest, looking_s = 0, 0, 0, 0.0
    start = time.perf_counter()
    for step, (inputs, targets) in enumerate(open_batches()):
        windows += len(inputs)
        token_sum += int(inputs.sum()) + int(targets[:, -1].sum())  # every token of each window once
        if step == 0:
            first_batch_s, start = time.perf_counter() - start, time.perf_counter()
        if step % LOCAL_SIZE_EVERY == 0:
            looked = time.perf_counter()
            largest = max(largest, gptflow_bench.tree_bytes(local))
            looking_s += time.perf_counter() - looked
    rest_s = time.perf_counter() - start - looking_s
    largest = max(largest, gptflow_bench.tree_bytes(local))
    return Reading(reader, windows, token_sum, first_batch_s, rest_s, 0, 0, largest)


def gptflow_epoch(work: Path, url: str, names: list[str], shard_tokens: int, cap_bytes: int,
                  corpus_bytes: int) -> Reading:
    """An epoch of gptflow's windows streamed from ``url`` into a fresh local copy, in epoch order."""
    root, opened = work / "gptflow-reader", {}

    def open_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        with contextlib.ExitStack() as caches:
            windows = opened["windows"] = gptflow_bench.streamed(root, url, names, shard_tokens, cap_bytes,
                                                                 shard_tokens, caches)
            for first in range(0, windows.num_windows, MICRO_BATCH):
                yield windows.batch(0, np.arange(first, min(first + MICRO_BATCH, windows.num_windows)))

    reading = read_epoch("gptflow (ShardCache, byte ranges)", open_batches, root)
    return dataclasses.replace(reading, fetched_bytes=opened["windows"].cache.fetched_bytes, corpus_bytes=corpus_bytes)


def publish_mds(streaming: ModuleType, windows: TokenWindows, local: Path, remote: str, shard_bytes: int) -> int:
    """Write every window of ``windows`` as one MDS sample to ``remote``; the bytes of the MDS dataset."""
    with streaming.MDSWriter(out=(str(local), remote), columns={"tokens": f"ndarray:uint16:{BLOCK_SIZE + 1}"},
                             size_limit=shard_bytes, keep_local=True) as writer:
        for first in range(0, windows.num_windows, 1024):
            for window in windows.read_windows(range(first, min(first + 1024, windows.num_windows))):
                writer.write({"tokens": window})
    return gptflow_bench.tree_bytes(local)


def mosaicml_epoch(streaming: ModuleType, work: Path, remote: str, cap_bytes: int, shuffle_windows: int,
                   corpus_bytes: int) -> Reading:
    """An epoch of MosaicML's StreamingDataset over ``remote`` into a fresh local folder, shuffled."""

    class CountingStream(streaming.Stream):
        """A stream that adds up the bytes of the files it downloads (MosaicML keeps no count)."""

        downloaded_bytes = 0

        def _download_file(self, from_basename: str, to_basename: str | None = None) -> str:
            local_file = super()._download_file(from_basename, to_basename)
            CountingStream.downloaded_bytes += os.path.getsize(local_file)
            return local_file

    local = work / "mosaicml-reader"

    def open_batches() -> torch.utils.data.DataLoader:
        dataset = streaming.StreamingDataset(streams=[CountingStream(remote=remote, local=str(local))],
                                             batch_size=MICRO_BATCH, shuffle=True, shuffle_seed=0,
                                             shuffle_block_size=shuffle_windows, cache_limit=cap_bytes)
        return torch.utils.data.DataLoader(dataset, batch_size=MICRO_BATCH, num_workers=0,
                                           collate_fn=inputs_and_targets)

    reading = read_epoch("MosaicML streaming (MDS shards)", open_batches, local)
    return dataclasses.replace(reading, fetched_bytes=CountingStream.downloaded_bytes, corpus_bytes=corpus_bytes)


def inputs_and_targets(samples: list[dict[str, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``TokenWindows.batch`` gives for the same windows: int64 inputs and targets."""
    windows = np.stack([sample["tokens"] for sample in samples])
    return torch.from_numpy(windows[:, :-1].astype(np.int64)), torch.from_numpy(windows[:, 1:].astype(np.int64))


def print_table(readings: list[Reading], cap_bytes: int) -> None:
    mib = 2**20
    print(f"\n| reader | windows | tokens/s after the first batch | first batch (s) | epoch (s) | fetched (MiB) "
          f"| x its corpus | largest local (MiB, cap {cap_bytes / mib:.2f}) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for reading in readings:
        print(f"| {reading.reader} | {reading.windows} | {reading.tokens_per_s:,.0f} | {reading.first_batch_s:.3f} "
              f"| {reading.first_batch_s + reading.rest_s:.2f} | {reading.fetched_bytes / mib:.2f} "
              f"| {reading.fetched_bytes / reading.corpus_bytes:.2f} | {reading.largest_local_bytes / mib:.2f} |")
    gptflow, reference = readings
    print(f"\ngptflow / MosaicML tokens/s: {gptflow.tokens_per_s / reference.tokens_per_s:.2f}; first batch "
          f"{gptflow.first_batch_s / reference.first_batch_s:.2f} x MosaicML's")
    same = (gptflow.windows, gptflow.token_sum) == (reference.windows, reference.token_sum)
    print(f"same windows: {'yes' if same else 'NO'} ({gptflow.windows} and {reference.windows} windows, token sums "
          f"{gptflow.token_sum} and {reference.token_sum})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--shard-tokens", type=int, default=64 * 1024)
    args = parser.parse_args()
    streaming = import_mosaicml()
    torch.set_num_threads(2)
    print(f"load average at start: {os.getloadavg()}")
    server, environment = gptflow_bench.start_moto()
    os.environ["S3_ENDPOINT_URL"] = environment["AWS_ENDPOINT_URL"]  # where MosaicML's boto3 clients look
    try:
        import s3fs

        with tempfile.TemporaryDirectory(prefix="gptflow-bench-reference-") as tmp:
            work, url = Path(tmp), f"s3://bench-reference-{uuid.uuid4().hex[:8]}"
            s3fs.S3FileSystem(skip_instance_cache=True).mkdir(url.removeprefix("s3://"))
            names = gptflow_bench.publish_corpus(url, work / "writer", args.shards, args.shard_tokens)
            corpus_bytes = gptflow_bench.shard_bytes(work / "writer" / "store")
            cap = corpus_bytes // 10
            written = TokenWindows([work / "writer" / name for name in names], BLOCK_SIZE, VOCAB_SIZE,
                                   piece_tokens=args.shard_tokens)
            mds_bytes = publish_mds(streaming, written, work / "mds-writer", f"{url}/mds",
                                    args.shard_tokens * np.dtype(np.uint16).itemsize)
            print(f"corpus: {args.shards} shards x {args.shard_tokens} tokens = {corpus_bytes / 2**20:.2f} MiB "
                  f"(as MDS: {mds_bytes / 2**20:.2f} MiB); cache cap {cap / 2**20:.2f} MiB; {written.num_windows} "
                  f"windows of {BLOCK_SIZE + 1} tokens, {MICRO_BATCH} a batch")
            readings = [
                gptflow_epoch(work, url, names, args.shard_tokens, cap, corpus_bytes),
                mosaicml_epoch(streaming, work, f"{url}/mds", cap,
                               gptflow_bench.BUFFER_PIECES * written.piece_windows, mds_bytes),
            ]
            print_table(readings, cap)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
