"""How well the loader's two-level shuffle mixes source files, against a full shuffle of the epoch.

    python bench/shuffle_quality.py
    python bench/shuffle_quality.py --tokens 2e9 --files 1000 --block-size 1024 --global-batch 512

A synthetic corpus: ``--files`` source files of log-normal sizes (as web and code corpora are)
totalling ``--tokens``, each a shard of the stream. For the first ``--batches`` global batches of
an epoch, each batch's source files are counted, and the measure is the mean cosine similarity of
consecutive batches' file counts: 1 when consecutive batches come from the same files in the same
proportions, near 0 when they share none; and the distinct files in a batch. Three orders of the same windows: the loader's
(``data.loader.epoch_order``, pieces of ``PIECE_TOKENS``, buffers of ``BUFFER_PIECES`` and of
``--buffer-pieces``), a full
shuffle (a permutation of the whole epoch: the ideal a bounded buffer approximates), and no
shuffle (stream order). Also the share of consecutive windows from one file. Pure numpy: no file
is written.
"""

from __future__ import annotations

import argparse

import numpy as np

from gptflow.data.loader import BUFFER_PIECES, PIECE_TOKENS, epoch_order


def consecutive_similarity(files: np.ndarray, global_batch: int, n_files: int) -> float:
    """Mean cosine similarity of consecutive batches' per-file window counts."""
    batches = files.reshape(-1, global_batch)
    similarities = []
    for first, second in zip(batches[:-1], batches[1:]):
        a, b = np.bincount(first, minlength=n_files), np.bincount(second, minlength=n_files)
        similarities.append(float(a @ b) / float(np.linalg.norm(a) * np.linalg.norm(b)))
    return float(np.mean(similarities))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=float, default=2e9)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--global-batch", type=int, default=512)
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--buffer-pieces", type=int, nargs="*", default=[16, 64, 1024], help="besides the default")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    sizes = rng.lognormal(0.0, 1.5, args.files)
    file_ends = np.cumsum(sizes / sizes.sum() * args.tokens).astype(np.int64)
    num_windows = (int(file_ends[-1]) - 1) // args.block_size
    positions = np.arange(args.batches * args.global_batch)
    piece_windows = max(1, PIECE_TOKENS // args.block_size)
    orders = {
        **{f"loader, buffer of {pieces} pieces": epoch_order(num_windows, piece_windows, pieces, 0, 0, positions)
           for pieces in sorted({BUFFER_PIECES, *args.buffer_pieces})},
        "full shuffle": rng.permutation(num_windows)[: len(positions)],
        "no shuffle": positions,
    }
    print(f"{args.tokens:.3g} tokens in {args.files} files (largest {sizes.max() / sizes.sum():.1%} of the corpus), "
          f"{num_windows} windows of {args.block_size + 1} tokens; pieces of {piece_windows} windows; "
          f"{args.batches} global batches of {args.global_batch}")
    print(f"{'order':<32} {'batch-to-batch file similarity':>31} {'consecutive windows, same file':>31} "
          f"{'files per batch':>16}")
    for name, ids in orders.items():
        files = np.searchsorted(file_ends, ids * args.block_size, side="right")
        same_file = float(np.mean(files[1:] == files[:-1]))
        per_batch = np.mean([len(np.unique(batch)) for batch in files.reshape(-1, args.global_batch)])
        print(f"{name:<32} {consecutive_similarity(files, args.global_batch, args.files):>31.3f} {same_file:>31.3f} "
              f"{per_batch:>16.1f}")


if __name__ == "__main__":
    main()
