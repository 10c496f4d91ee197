"""What verifying artifacts where they are consumed costs, against the training that consumes them.

    python bench/verify_cost.py                       # built-in corpus + 200 MB of synthetic shards
    python bench/verify_cost.py --synthetic-mb 0      # built-in corpus only
    python bench/verify_cost.py --no-builtin --steps 5

Token shards are committed as the tokenize stage commits them (``data.store.ArtifactStore.commit``),
for the built-in corpus (ingested and tokenized with the ``cpu`` preset's tokenizer settings) and
for ``--synthetic-mb`` of random ids in 2 MB shards. Timed, best of ``--repeats`` after an untimed
run (so the page cache is warm, as it is right after tokenizing; a cold cache adds disk reads,
which training pays for anyway since it maps every shard): (a) ``ArtifactStore.verify_files`` over every shard,
what the pretrain task ran before training until issue 27 (each rank now checks a shard when it
first reads it); (b) opening them as ``TokenWindows`` (each file's footer; until issue 27 also a
scan of every id against the vocabulary), and that scan alone (``max id``). Against the
median of ``--steps`` training steps of the ``cpu`` preset on this machine (after one untimed
step), and its ``max_steps`` of them (a run). Also (c) ``verify_contents`` of the preset's
exported weights against ``load_model`` as a whole (which includes it). No Prefect, no MLflow.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from gptflow.data.commits import atomic_directory, verify_contents
from gptflow.data.config import IngestConfig, TokenizeConfig
from gptflow.data.ingest import ingest_corpus
from gptflow.data.loader import TokenWindows
from gptflow.data.shards import token_dtype
from gptflow.data.sources import BUILTIN_CORPUS, resolve_sources
from gptflow.data.store import LOCAL_STORE
from gptflow.data.token_shards import IndexedShardWriter
from gptflow.data.tokenize import tokenize_corpus
from gptflow.data.tokenizer import train_tokenizer
from gptflow.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_model, save_final
from gptflow.model.config import ModelConfig, pad_vocab_size
from gptflow.model.device import autocast, resolve_autocast_dtype, resolve_device
from gptflow.model.gpt import GPT
from gptflow.model.optim import build_optimizer
from gptflow.tasks.settings import PretrainSettings, build_config

SYNTHETIC_SHARD_BYTES = 2 << 20


def main() -> None:
    args = _parser().parse_args()
    settings = build_config(PretrainSettings, "cpu")
    vocab_size = settings.tokenizer.vocab_size
    with tempfile.TemporaryDirectory(prefix="gptflow-bench-") as scratch:
        store = Path(scratch)
        corpora: dict[str, list[Path]] = {}
        if not args.no_builtin:
            manifest = ingest_corpus(resolve_sources([BUILTIN_CORPUS]), IngestConfig(), store)
            tokenizer = train_tokenizer(manifest, settings.tokenizer, store)
            tokens = tokenize_corpus(manifest, tokenizer, TokenizeConfig(), store)
            corpora[f"built-in corpus, {len(tokens.units)} units"] = tokens.paths("train") + tokens.paths("val")
            vocab_size = tokenizer.vocab_size
        if args.synthetic_mb:
            paths = _synthetic_shards(store / "synthetic", args.synthetic_mb * 10**6, vocab_size)
            corpora[f"synthetic, {len(paths)} shards of 2 MB"] = paths

        model_config = dataclasses.replace(settings.model, vocab_size=pad_vocab_size(vocab_size))
        step_s = _training_step_seconds(settings, model_config, args.steps)
        final = save_final(store / "run", GPT(model_config))
        verify_model_s = _best(lambda: verify_contents(final, (WEIGHTS_FILE, CONFIG_FILE)), args.repeats)
        load_model_s = _best(lambda: load_model(final), args.repeats)

        print(f"machine  {torch.get_num_threads()} torch threads; best of {args.repeats} (warm page cache)")
        print(f"training cpu preset ({model_config.n_layer} layers x {model_config.n_embd}, block "
              f"{model_config.block_size}, micro-batch {settings.train.micro_batch_size}, vocab "
              f"{model_config.vocab_size}): {step_s:.3f} s per step (median of {args.steps}), "
              f"{settings.train.max_steps} steps per run")
        print()
        print(f"{'shards':36} {'MB':>6} {'(a) verify s':>13} {'MB/s':>5} {'(a)/step':>9} {'(a)/run':>8} "
              f"{'(b) open s':>11} {'(b) max id s':>13} {'max id/step':>11}")
        for name, paths in corpora.items():
            megabytes = sum(path.stat().st_size for path in paths) / 1e6
            verify_s = _best(lambda: LOCAL_STORE.verify_files(paths), args.repeats)
            open_s = _best(lambda: TokenWindows(paths, model_config.block_size, model_config.vocab_size), args.repeats)
            columns = [_token_column(path) for path in paths]
            max_id_s = _best(lambda: [pc.max(column) for column in columns], args.repeats)
            run_s = step_s * settings.train.max_steps
            print(f"{name:36} {megabytes:6.1f} {verify_s:13.4f} {megabytes / verify_s:5.0f} {verify_s / step_s:9.3f} "
                  f"{verify_s / run_s:8.3%} {open_s:11.4f} {max_id_s:13.4f} {max_id_s / step_s:11.4f}")
        weights_mb = (final / WEIGHTS_FILE).stat().st_size / 1e6
        print()
        print(f"(c) model weights {weights_mb:.1f} MB: verify_contents {verify_model_s:.4f} s of load_model "
              f"{load_model_s:.4f} s ({verify_model_s / load_model_s:.0%})")


def _synthetic_shards(root: Path, total_bytes: int, vocab_size: int) -> list[Path]:
    """Random ids below ``vocab_size`` in committed one-shard units of ``SYNTHETIC_SHARD_BYTES``."""
    dtype = token_dtype(vocab_size)
    rng = np.random.default_rng(0)
    paths = []
    for index in range(math.ceil(total_bytes / SYNTHETIC_SHARD_BYTES)):
        with atomic_directory(root / f"unit-{index:05d}") as tmp:
            writer = IndexedShardWriter(tmp / "train.arrow", dtype)
            writer.write(rng.integers(0, vocab_size, SYNTHETIC_SHARD_BYTES // dtype.itemsize, dtype=dtype))
            writer.close()
        paths.append(root / f"unit-{index:05d}" / "train.arrow")
    return paths


def _token_column(path: Path) -> pa.ChunkedArray:
    """A shard's ``tokens`` column, memory-mapped as ``TokenWindows`` maps it."""
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all().column("tokens")


def _training_step_seconds(settings: PretrainSettings, model_config: ModelConfig, steps: int) -> float:
    """Median wall time of one optimizer step of the preset (random ids: the time does not depend on them)."""
    train = settings.train
    device = resolve_device(train.device)
    dtype = resolve_autocast_dtype(train.dtype, device)
    torch.manual_seed(0)
    model = GPT(model_config).to(device)
    optimizer = build_optimizer(model, train, device)
    shape = (train.micro_batch_size, model_config.block_size)
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        for _ in range(train.grad_accum_steps):
            inputs = torch.randint(0, model_config.vocab_size, shape, device=device)
            with autocast(device, dtype):
                _, loss = model(inputs, inputs)
            (loss / train.grad_accum_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def _best(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up: page cache and first-use costs, untimed
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic-mb", type=int, default=200, help="MB of synthetic shards (0: none)")
    parser.add_argument("--no-builtin", action="store_true", help="skip the built-in corpus")
    parser.add_argument("--steps", type=int, default=5, help="training steps timed")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each verification")
    return parser


if __name__ == "__main__":
    main()
