"""Throughput of the tokenize stage against the tokenizer alone, on the same texts and threads.

    python bench/tokenize_throughput.py                      # the built-in corpus
    python bench/tokenize_throughput.py --corpus ./texts --repeats 5
    python bench/tokenize_throughput.py --pack 8             # same texts, in 8 files

Ingests the corpus into a temporary store, trains (or, with --store-dir, reuses) a byte-level BPE
tokenizer, then measures in this one process, interleaved and best of --repeats (shared machines
are noisy): (a) ``Tokenizer.encode_batch``, (b) ``Tokenizer.encode_batch_fast`` on the corpus's
documents in batches of ``TokenizeConfig.batch_bytes``, and (c) the whole ``tokenize_corpus``
stage, raw shards to committed token shards, into a fresh token store each time. MB are 10^6
bytes of UTF-8 document text. No Prefect, no MLflow.

The stage writes one committed directory per source file, a fixed cost per file that can dominate
on corpora of many small files where creating files is slow; ``--pack N`` first rewrites the
corpus's documents into N JSONL files, separating that per-file cost from the per-byte one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from gptflow.data.config import IngestConfig, TokenizeConfig, TokenizerConfig
from gptflow.data.ingest import CorpusManifest, ingest_corpus
from gptflow.data.shards import iter_raw_batches
from gptflow.data.sources import BUILTIN_CORPUS, resolve_sources
from gptflow.data.tokenize import tokenize_corpus
from gptflow.data.tokenizer import load_tokenizer, train_tokenizer


def main() -> None:
    args = _parser().parse_args()
    if args.threads:
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # before the tokenizer's pool starts
    with tempfile.TemporaryDirectory(prefix="gptflow-bench-", dir=args.store_dir) as scratch:
        store = Path(scratch)
        resolution = resolve_sources(args.corpus)
        manifest = ingest_corpus(resolution, IngestConfig(), store)
        if args.pack:
            resolution = resolve_sources([str(_pack(manifest, args.pack, store / "packed"))])
            manifest = ingest_corpus(resolution, IngestConfig(), store)
        artifact = train_tokenizer(manifest, TokenizerConfig(vocab_size=args.vocab_size), store)
        tokenizer = load_tokenizer(artifact)
        batches = _document_batches(manifest, args.batch_bytes)
        config = TokenizeConfig(batch_bytes=args.batch_bytes)
        # Empty token stores made up front, so that creating and deleting them is not timed.
        token_stores = iter([Path(tempfile.mkdtemp(dir=scratch)) for _ in range(args.repeats + 1)])

        contenders: dict[str, Callable[[], object]] = {
            "(a) encode_batch": lambda: [tokenizer.encode_batch(batch, add_special_tokens=False) for batch in batches],
            "(b) encode_batch_fast": lambda: [tokenizer.encode_batch_fast(batch, add_special_tokens=False)
                                              for batch in batches],
            "(c) tokenize_corpus stage": lambda: tokenize_corpus(manifest, artifact, config, next(token_stores)),
        }
        contenders["(c) tokenize_corpus stage"]()  # warm-up: first-use imports and page cache, untimed
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
        for _ in range(args.repeats):
            for name, run in contenders.items():
                wall, cpu = time.perf_counter(), time.process_time()
                run()
                runs[name].append((time.perf_counter() - wall, time.process_time() - cpu))
        n_tokens = sum(len(encoding) for batch in batches
                       for encoding in tokenizer.encode_batch_fast(batch, add_special_tokens=False))

    n_bytes = sum(manifest.totals["bytes"].values())
    threads = os.environ.get("RAYON_NUM_THREADS") or f"{os.cpu_count()} (all CPUs)"
    packed = f" packed into {args.pack} JSONL files" if args.pack else ""
    print(f"corpus   {', '.join(args.corpus)}{packed}: {len(resolution.files)} files, "
          f"{manifest.total_documents} documents, {n_bytes / 1e6:.1f} MB, "
          f"{n_tokens / 1e6:.2f} M tokens at vocab {artifact.vocab_size}")
    print(f"threads  {threads}; batches of {args.batch_bytes / 2**20:.0f} MiB; best of {args.repeats} (by wall time)")
    print()
    best = {name: min(times) for name, times in runs.items()}  # (wall s, cpu s) of the fastest run
    (a, b, c) = (best[name] for name in contenders)
    print(f"{'':28}{'MB/s':>7}{'vs (a)':>8}{'vs (b)':>8}{'CPU s':>8}   every run (MB/s)")
    for name, (wall, cpu) in best.items():
        every = " ".join(f"{n_bytes / run_wall / 1e6:.2f}" for run_wall, _ in runs[name])
        print(f"{name:28}{n_bytes / wall / 1e6:7.2f}{a[0] / wall:8.2f}{b[0] / wall:8.2f}{cpu:8.2f}   {every}")
    print(f"\n(c)/(b) by wall time {b[0] / c[0]:.0%}, by CPU time {b[1] / c[1]:.0%}; the stage's extra CPU: "
          f"{c[1] - b[1]:+.2f} s over {len(manifest.units)} units ({1e3 * (c[1] - b[1]) / len(manifest.units):+.2f} ms "
          f"per unit)")


def _document_batches(manifest: CorpusManifest, batch_bytes: int) -> list[list[str]]:
    """The documents the stage tokenizes (cross-file duplicates left out), in batches."""
    batches: list[list[str]] = [[]]
    size = 0
    for unit in manifest.units:
        dropped = set(unit.drop_doc_hashes)
        for batch in iter_raw_batches(Path(unit.directory), ["text", "doc_hash"]):
            for text, doc_hash in zip(batch.column("text").to_pylist(), batch.column("doc_hash").to_pylist()):
                if doc_hash in dropped:
                    continue
                if size >= batch_bytes:
                    batches.append([])
                    size = 0
                batches[-1].append(text)
                size += len(text)
    return batches


def _pack(manifest: CorpusManifest, n_files: int, folder: Path) -> Path:
    folder.mkdir()
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(folder / f"part-{index:03d}.jsonl", "w")) for index in range(n_files)]
        for index, text in enumerate(text for batch in _document_batches(manifest, 1 << 30) for text in batch):
            files[index % n_files].write(json.dumps({"text": text}) + "\n")
    return folder


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", nargs="+", default=[BUILTIN_CORPUS], help="files, folders, globs or hf: ids")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--batch-bytes", type=int, default=TokenizeConfig().batch_bytes)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="tokenizer threads (default: every core)")
    parser.add_argument("--store-dir", help="where the temporary stores go (default: the system temp dir)")
    parser.add_argument("--pack", type=int, default=0, metavar="N", help="first rewrite the documents into N files")
    return parser


if __name__ == "__main__":
    main()
