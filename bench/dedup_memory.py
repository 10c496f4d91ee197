"""Peak memory of cross-file exact dedup at 1M and 4M documents: bounded, not growing with the corpus.

    python bench/dedup_memory.py                     # 1M and 4M short synthetic documents
    python bench/dedup_memory.py --documents 500000 2000000

For each size, writes that many short synthetic documents (about 60 bytes, 1 in 20 repeating a
document of the first file) into JSONL files of 62,500 documents each (a larger corpus is more
files, as corpora grow), ingests them (`ingest_corpus`, in this
process), then runs the manifest's cross-file dedup again in a fresh Python process and reports
that process's RSS just before it and its peak RSS (what dedup added is the difference). Dedup holds at most `DEDUP_PARTITION_SEGMENTS`
hashes at once (the corpus's hashes partitioned by value), so the peaks should be within 20%; the
largest size is also deduplicated with every hash in one set, as before partitioning, for comparison.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gptflow.data.config import IngestConfig
from gptflow.data.exact_dedup import DEDUP_PARTITION_SEGMENTS
from gptflow.data.ingest import ingest_corpus
from gptflow.data.sources import resolve_sources

DOCUMENTS_PER_FILE = 62_500
REPEAT_EVERY = 20

# Run in a fresh interpreter: the manifest's units with their drop lists emptied, deduplicated again.
MEASURE = """
import json, resource, sys, time
from gptflow.data import exact_dedup
from gptflow.data.exact_dedup import drop_cross_file_duplicates
from gptflow.data.ingest import CorpusManifest
from gptflow.data.store import LOCAL_STORE
exact_dedup.DEDUP_PARTITION_SEGMENTS = int(sys.argv[2])
manifest = LOCAL_STORE.read_manifest(CorpusManifest, sys.argv[1])
for unit in manifest.units:
    unit.drop_doc_hashes, unit.duplicates = [], 0
with open("/proc/self/statm") as statm:  # resident pages now, not the peak so far
    before = int(statm.read().split()[1]) * resource.getpagesize() // 1024
started = time.perf_counter()
drop_cross_file_duplicates(manifest.units)
seconds = time.perf_counter() - started
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps([before, after, seconds, sum(len(unit.drop_doc_hashes) for unit in manifest.units)]))
"""


def main() -> None:
    args = _parser().parse_args()
    rows = []
    for documents in args.documents:
        with tempfile.TemporaryDirectory(prefix="gptflow-bench-") as scratch:
            corpus = _write_corpus(Path(scratch) / "corpus", documents)
            started = time.perf_counter()
            manifest = ingest_corpus(resolve_sources([str(corpus)]), IngestConfig(), Path(scratch) / "store")
            ingest_s = time.perf_counter() - started
            print(f"{documents:,} documents: ingested in {ingest_s:.0f} s", flush=True)
            partition_sizes = [DEDUP_PARTITION_SEGMENTS]
            if documents == max(args.documents):  # the baseline: every hash in one set, as before partitions
                partition_sizes.append(documents * 2)
            for partition_size in partition_sizes:
                measured = subprocess.run([sys.executable, "-c", MEASURE, manifest.path, str(partition_size)],
                                          capture_output=True, text=True, check=True)
                before_kib, after_kib, dedup_s, dropped = json.loads(measured.stdout)
                label = f"{documents:,}" + (" in one set" if partition_size != DEDUP_PARTITION_SEGMENTS else "")
                rows.append((label, dedup_s, dropped, before_kib / 1024, after_kib / 1024))

    print()
    print(f"JSONL files of {DOCUMENTS_PER_FILE:,} documents, 1 in {REPEAT_EVERY} repeating one of the first "
          f"file; partitions of {DEDUP_PARTITION_SEGMENTS:,} hashes")
    print(f"{'documents':>22} {'dropped':>9} {'dedup s':>8} {'RSS before':>11} {'peak RSS':>9} {'added':>7} "
          f"{'peak vs first':>14}")
    first_peak = rows[0][4]
    for label, dedup_s, dropped, before_mib, peak_mib in rows:
        print(f"{label:>22} {dropped:>9,} {dedup_s:>8.1f} {before_mib:>8.0f} MB {peak_mib:>6.0f} MB "
              f"{peak_mib - before_mib:>4.0f} MB {peak_mib / first_peak:>13.2f}x")


def _write_corpus(folder: Path, documents: int) -> Path:
    """``documents`` short documents in JSONL files of ``DOCUMENTS_PER_FILE``; every
    ``REPEAT_EVERY``-th document of a file after the first repeats a document of the first file."""
    folder.mkdir(parents=True)
    for file_index in range(documents // DOCUMENTS_PER_FILE):
        with open(folder / f"part-{file_index:03d}.jsonl", "w") as out:
            for index in range(DOCUMENTS_PER_FILE):
                repeat = file_index > 0 and index % REPEAT_EVERY == 0
                number = index if repeat else file_index * DOCUMENTS_PER_FILE + index
                out.write(json.dumps({"text": f"document {number}: the quick brown fox jumps over {number % 97}"}) + "\n")
    return folder


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, nargs="+", default=[1_000_000, 4_000_000])
    return parser


if __name__ == "__main__":
    main()
