"""Quality filters (``data.quality``): documents/s and MB/s of each preset as gptflow runs it and as
datatrove's own pipeline steps run it, on the same real pages in one process, and the share of an
ingest's time that filtering adds.

    apt-get install -y python3-doc
    pip install 'gptflow[quality]'
    python bench/quality_filters.py --pages 300

The documents are the main text of ``--pages`` random pages of Python's HTML documentation
(extracted as ``data.web`` does). Prints one table of speeds on one core (gptflow's
``QualityFilters`` against datatrove's ``BaseFilter.run`` chain, each filter alone too), then the
wall time of ingesting those pages as one ``.warc.gz`` with ``data.quality=none`` and ``fineweb``,
each into a new store (extraction included).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from html_extraction import python_doc_pages  # this folder's: the benches draw the same pages

from gptflow.data.config import IngestConfig
from gptflow.data.errors import SkipReport
from gptflow.data.ingest import ingest_corpus
from gptflow.data.quality import FILTERS_BY_PRESET, QualityFilters, datatrove_filter, filter_settings
from gptflow.data.sources import SourceFile, resolve_sources
from gptflow.data.web import read_pages
from gptflow.data.web_demo import write_crawl


def datatrove_pipeline(config: IngestConfig) -> Callable[[str], str | None]:
    """One document through datatrove's own steps (``run``, as its executors call them)."""
    from datatrove.data import Document

    steps = [datatrove_filter(name, arguments) for name, arguments in filter_settings(config).items()]

    def run(text: str) -> str | None:
        documents = iter([Document(text=text, id="0")])
        for step in steps:
            documents = step.run(documents)
        kept = list(documents)
        return kept[0].text if kept else None

    return run


def timed(judge: Callable[[str], object], texts: list[str]) -> tuple[float, list[object]]:
    start = time.perf_counter()
    results = [judge(text) for text in texts]
    return time.perf_counter() - start, results


def speed_rows(texts: list[str]) -> list[str]:
    megabytes = sum(len(text.encode()) for text in texts) / 1e6
    rows = []
    for preset in [name for name in FILTERS_BY_PRESET if name != "none"]:
        config = IngestConfig(quality=preset)
        filters = QualityFilters(config)
        ours_s, ours = timed(lambda text: filters.judge(text).text, texts)
        theirs_s, theirs = timed(datatrove_pipeline(config), texts)
        kept = sum(text is not None for text in ours)
        rows.append(f"| {preset} | {len(texts) / ours_s:,.0f} | {megabytes / ours_s:.2f} "
                    f"| {len(texts) / theirs_s:,.0f} | {megabytes / theirs_s:.2f} | {kept} "
                    f"| {sum(a != b for a, b in zip(ours, theirs))} |")
    for name, arguments in filter_settings(IngestConfig(quality="fineweb")).items():
        alone = datatrove_filter(name, arguments)
        seconds, _ = timed(lambda text, step=alone: step.filter(_document(text)), texts)
        rows.append(f"| {name} alone (datatrove) | | | {len(texts) / seconds:,.0f} | {megabytes / seconds:.2f} | | |")
    return rows


def _document(text: str) -> object:
    from datatrove.data import Document

    return Document(text=text, id="0")


def ingest_seconds(crawl: Path, quality: str) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix="gptflow-quality-bench-store-") as store:
        start = time.perf_counter()
        manifest = ingest_corpus(resolve_sources([str(crawl)]), IngestConfig(quality=quality, val_fraction=0.3),
                                 Path(store), required_splits=())
        return time.perf_counter() - start, manifest.total_documents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root, pages = python_doc_pages(args.pages, args.seed)
    texts = ["".join(text for _, text in read_pages(SourceFile(page, "html"), SkipReport())) for page in pages]
    texts = [text for text in texts if text]
    QualityFilters(IngestConfig(quality="gopher")).judge(texts[0])  # spaCy's tokenizer loaded beforehand
    print(f"{len(texts)} pages of {root}, {sum(len(text.encode()) for text in texts) / 1e6:.1f} MB of main text")
    print("| data.quality | gptflow docs/s | gptflow MB/s | datatrove docs/s | datatrove MB/s | kept "
          "| decisions differ |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(speed_rows(texts)))
    with tempfile.TemporaryDirectory(prefix="gptflow-quality-bench-") as folder:
        crawl = Path(folder) / "pages.warc.gz"
        write_crawl(crawl, ((f"https://docs.python.org/3/{page.relative_to(root)}", page.read_bytes())
                            for page in pages))
        plain_s, plain_documents = ingest_seconds(crawl, "none")
        filtered_s, kept = ingest_seconds(crawl, "fineweb")
    print(f"ingest of the pages as one WARC: data.quality=none {plain_s:.1f} s ({plain_documents} documents), "
          f"fineweb {filtered_s:.1f} s ({kept} kept): filtering is {(filtered_s - plain_s) / filtered_s:.0%} "
          f"of the filtered ingest's time")


if __name__ == "__main__":
    main()
