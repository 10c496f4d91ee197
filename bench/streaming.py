"""Training from token shards streamed out of S3 (moto's server on this machine) within a cache of a
tenth of the corpus, against the same training from local shards.

    python bench/streaming.py
    python bench/streaming.py --shards 160 --shard-tokens 65536 --steps 20 --scales 1 4 16

Starts its own moto S3 server on 127.0.0.1 (killed at the end) and commits shards of random ids
(uint16) to an ``s3://`` workspace as the tokenize stage writes them (record batches of
``TOKENS_PER_RECORD_BATCH`` and their batch index). Measured, each on a fresh local copy (another
machine's view):

(a) steps/s of the ``cpu`` preset's model and micro-batch (forward, backward, AdamW step) reading
    its windows through ``prefetch_batches``: from the local shards, and streamed through a
    ``ShardCache`` capped at 10% of the corpus (``--shards`` shards of ``--shard-tokens``); both
    with buffers of two pieces of one shard's tokens, so that two buffers fit in that cap (the
    default buffer, 256 Mi tokens, needs a corpus of some 5 Gi tokens for a 10% cache);
(b) bytes fetched per epoch (data only, no model; two epochs read, as an epoch's last buffer fetches
    the next epoch's first ahead) against the corpus's bytes, on a corpus of
    ``--epoch-shards`` shards of ``--epoch-shard-tokens`` (each several pieces long), with the
    default pieces (``PIECE_TOKENS``) and pieces of a quarter of that, buffers of two pieces and a
    cache of 10% (which must hold two buffers: 12 shards of 4 Mi tokens by default); and the bytes
    validation fetches for ``--val-windows`` windows spread over it;
(c) time to the first batch against corpus size (``--scales`` times ``--base-shards`` shards):
    streaming, and fetching the whole split first (what a rank did before streaming).

No Prefect, no MLflow. The MosaicML streaming reference is ``bench/streaming_reference.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from gptflow.data.loader import PIECE_TOKENS, TokenWindows, prefetch_batches
from gptflow.data.mirror import RANGES_DIR, ObjectStoreMirror
from gptflow.data.store import ArtifactStore
from gptflow.data.streaming import ShardCache
from gptflow.data.token_shards import IndexedShardWriter
from gptflow.flows.temporary_server import stop_with_parent
from gptflow.model.config import ModelConfig
from gptflow.model.gpt import GPT

VOCAB_SIZE, BLOCK_SIZE, MICRO_BATCH = 8192, 256, 16  # the cpu preset's
BUFFER_PIECES = 2


def start_moto() -> tuple[subprocess.Popen, dict[str, str]]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              preexec_fn=stop_with_parent)  # a killed bench leaves no server behind
    environment = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                   "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(environment)
    for _ in range(300):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return server, environment
        time.sleep(0.1)
    raise RuntimeError("moto_server did not start")


def publish_corpus(url: str, root: Path, shards: int, shard_tokens: int) -> list[str]:
    """Commit ``shards`` random shards to the workspace at ``url``; their names inside it."""
    writer = ArtifactStore(ObjectStoreMirror.attach(root, url))
    rng, names = np.random.default_rng(0), []
    for index in range(shards):
        name = f"store/tokens/unit-{index:05d}/train.arrow"
        with writer.commit(root / Path(name).parent) as tmp:
            shard = IndexedShardWriter(tmp / "train.arrow", np.dtype(np.uint16))
            shard.write(rng.integers(0, VOCAB_SIZE, shard_tokens, dtype=np.uint16))
            shard.close()
        names.append(name)
    writer.wait_for_uploads()
    return names


def shard_bytes(folder: Path) -> int:
    """Bytes of the token shards under ``folder``: the corpus that training streams."""
    return sum(path.stat().st_size for path in folder.rglob("*.arrow"))


def tree_bytes(folder: Path) -> int:
    total = 0
    for parent, _, files in os.walk(folder):  # passes over folders evicted meanwhile, as rglob does not
        for file in files:
            with contextlib.suppress(FileNotFoundError):
                total += (Path(parent) / file).stat().st_size
    return total


def streamed(root: Path, url: str, names: list[str], shard_tokens: int, cap_bytes: int, piece_tokens: int,
             caches: contextlib.ExitStack) -> TokenWindows:
    """Windows streamed into the local copy ``root``; their cache closes with ``caches``, before its folder goes."""
    cache = ShardCache(ArtifactStore(ObjectStoreMirror.attach(root, url)), cap_bytes)
    caches.callback(cache.close)
    return TokenWindows([root / name for name in names], BLOCK_SIZE, VOCAB_SIZE, num_tokens=[shard_tokens] * len(names),
                        cache=cache, piece_tokens=piece_tokens, buffer_pieces=BUFFER_PIECES)


def steps_per_second(windows: TokenWindows, steps: int) -> tuple[float, float]:
    """Seconds to the first step, and steps/s of the ``steps`` after it."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=VOCAB_SIZE, block_size=BLOCK_SIZE, n_layer=4, n_head=4, n_embd=192))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    positions = (np.arange(step * MICRO_BATCH, (step + 1) * MICRO_BATCH) for step in range(steps + 1))
    start = time.perf_counter()
    for step, (inputs, targets) in enumerate(prefetch_batches(windows, 0, positions)):
        _, loss = model(inputs, targets, return_logits=False)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            first_step_s, start = time.perf_counter() - start, time.perf_counter()
    return first_step_s, steps / (time.perf_counter() - start)


def read_ms(windows: TokenWindows, steps: int) -> float:
    """Milliseconds to read one micro-batch of the ``steps`` after the first, again (no model, copies already here)."""
    start = time.perf_counter()
    for step in range(1, steps + 1):
        windows.batch(0, np.arange(step * MICRO_BATCH, (step + 1) * MICRO_BATCH))
    return (time.perf_counter() - start) / steps * 1000


def epochs(root: Path, url: str, names: list[str], shard_tokens: int, corpus_bytes: int, piece_tokens: int,
           caches: contextlib.ExitStack) -> None:
    """Read two epochs' windows streamed within a cap of a tenth of the corpus; print what each
    fetched on average (an epoch's last buffer fetches the next epoch's first ahead)."""
    cap = corpus_bytes // 10
    stream = streamed(root, url, names, shard_tokens, cap, piece_tokens, caches)
    largest, read = 0, 0
    for first in range(0, 2 * stream.num_windows, 256):
        read += len(stream.batch(1, np.arange(first, min(first + 256, 2 * stream.num_windows)))[0])
        largest = max(largest, tree_bytes(root / "store") + tree_bytes(root / RANGES_DIR))
    fetched = stream.cache.fetched_bytes / 2
    print(f"(b) an epoch ({read // 2} windows) of two, pieces of {piece_tokens} tokens: fetched {fetched / 2**20:.1f} "
          f"MiB = {fetched / corpus_bytes:.3f} x the corpus; largest local copy {largest / 2**20:.2f} MiB "
          f"(cap {cap / 2**20:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=160)
    parser.add_argument("--shard-tokens", type=int, default=64 * 1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--base-shards", type=int, default=20)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--epoch-shards", type=int, default=12)
    parser.add_argument("--epoch-shard-tokens", type=int, default=4 * PIECE_TOKENS)
    parser.add_argument("--val-windows", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(2)
    server, _ = start_moto()
    try:
        import s3fs

        with tempfile.TemporaryDirectory(prefix="gptflow-bench-cache-") as tmp, contextlib.ExitStack() as caches:
            work = Path(tmp)
            url = f"s3://bench-cache-{uuid.uuid4().hex[:8]}"
            s3fs.S3FileSystem(skip_instance_cache=True).mkdir(url.removeprefix("s3://"))
            names = publish_corpus(url, work / "writer", args.shards, args.shard_tokens)
            corpus_bytes = shard_bytes(work / "writer" / "store")
            cap = corpus_bytes // 10
            print(f"corpus: {args.shards} shards x {args.shard_tokens} tokens = {corpus_bytes / 2**20:.1f} MiB; "
                  f"cache cap {cap / 2**20:.2f} MiB")

            local = TokenWindows([work / "writer" / name for name in names], BLOCK_SIZE, VOCAB_SIZE,
                                 piece_tokens=args.shard_tokens, buffer_pieces=BUFFER_PIECES)
            local_first, local_rate = steps_per_second(local, args.steps)
            stream = streamed(work / "reader", url, names, args.shard_tokens, cap, args.shard_tokens, caches)
            stream_first, stream_rate = steps_per_second(stream, args.steps)
            print(f"(a) local shards:  first step {local_first:.2f} s, {local_rate:.2f} steps/s; reading alone "
                  f"{read_ms(local, args.steps):.2f} ms a micro-batch")
            print(f"(a) streamed, 10%: first step {stream_first:.2f} s, {stream_rate:.2f} steps/s "
                  f"({stream_rate / local_rate:.2f} of local); reading alone {read_ms(stream, args.steps):.2f} ms "
                  "a micro-batch")

            epoch_url = f"{url}-epoch"
            s3fs.S3FileSystem(skip_instance_cache=True).mkdir(epoch_url.removeprefix("s3://"))
            epoch_names = publish_corpus(epoch_url, work / "writer-epoch", args.epoch_shards, args.epoch_shard_tokens)
            epoch_bytes = shard_bytes(work / "writer-epoch" / "store")
            print(f"(b) corpus: {args.epoch_shards} shards x {args.epoch_shard_tokens} tokens = "
                  f"{epoch_bytes / 2**20:.1f} MiB; cache cap {epoch_bytes / 10 / 2**20:.2f} MiB")
            for piece_tokens in (PIECE_TOKENS, PIECE_TOKENS // 4):
                epochs(work / f"epoch-{piece_tokens}", epoch_url, epoch_names, args.epoch_shard_tokens, epoch_bytes,
                          piece_tokens, caches)
            validation = streamed(work / "validation", epoch_url, epoch_names, args.epoch_shard_tokens,
                                  epoch_bytes // 10, PIECE_TOKENS, caches)
            for _ in validation.evaluation_batches(MICRO_BATCH, args.val_windows * BLOCK_SIZE):
                pass
            fetched = validation.cache.fetched_bytes
            print(f"(b) validation of {args.val_windows} windows spread over it: fetched {fetched / 2**20:.2f} MiB = "
                  f"{fetched / epoch_bytes:.4f} x the corpus")

            for scale in args.scales:
                scaled_url = f"{url}-x{scale}"
                s3fs.S3FileSystem(skip_instance_cache=True).mkdir(scaled_url.removeprefix("s3://"))
                scaled = publish_corpus(scaled_url, work / f"writer-x{scale}", args.base_shards * scale,
                                        args.shard_tokens)
                start = time.perf_counter()
                streamed(work / f"first-x{scale}", scaled_url, scaled, args.shard_tokens, cap, args.shard_tokens,
                         caches).batch(0, np.arange(MICRO_BATCH))
                streaming_s = time.perf_counter() - start
                start = time.perf_counter()
                whole = ArtifactStore(ObjectStoreMirror.attach(work / f"whole-x{scale}", scaled_url))
                whole.are_complete([work / f"whole-x{scale}" / Path(name).parent for name in scaled])
                TokenWindows([work / f"whole-x{scale}" / name for name in scaled], BLOCK_SIZE, VOCAB_SIZE,
                             store=whole, piece_tokens=args.shard_tokens, buffer_pieces=BUFFER_PIECES).batch(
                    0, np.arange(MICRO_BATCH))
                whole_s = time.perf_counter() - start
                print(f"(c) {scale:>2}x ({len(scaled)} shards): first batch streamed {streaming_s:.2f} s, "
                      f"after fetching the split {whole_s:.2f} s")
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


if __name__ == "__main__":
    main()
