"""Ingest of a WARC file, first with extraction, then with language settings changed (extraction
reused from its unit), then cached: what each costs, on real pages (Python's HTML documentation,
Debian's ``python3-doc``).

    apt-get install -y python3-doc
    python bench/web_ingest.py --pages 300

Writes a ``.warc.gz`` of ``--pages`` random pages with warcio's writer into a temporary folder and
prints, per ingest, its wall time and the documents kept and dropped per language.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from html_extraction import python_doc_pages  # this folder's: both benches draw the same pages

from gptflow.data.config import IngestConfig
from gptflow.data.ingest import ingest_corpus
from gptflow.data.sources import resolve_sources
from gptflow.data.web_demo import write_crawl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    root, pages = python_doc_pages(args.pages, args.seed)
    with tempfile.TemporaryDirectory(prefix="gptflow-web-ingest-") as folder:
        crawl = Path(folder) / "corpus" / "docs.warc.gz"
        crawl.parent.mkdir()
        write_crawl(crawl, ((f"https://docs.python.org/3/{page.relative_to(root)}", page.read_bytes())
                            for page in pages))
        print(f"{len(pages)} pages, {sum(page.stat().st_size for page in pages) / 1e6:.1f} MB of HTML, "
              f"{crawl.stat().st_size / 1e6:.1f} MB of .warc.gz")
        sources = resolve_sources([str(crawl.parent)])
        steps = [
            ("first ingest: extracts", IngestConfig()),
            ("data.languages=en: re-filters the extracted text", IngestConfig(languages="en")),
            ("data.languages=en,fr, threshold 0.8: re-filters", IngestConfig(languages="en,fr", language_threshold=0.8)),
            ("the same again: every unit cached", IngestConfig(languages="en,fr", language_threshold=0.8)),
        ]
        for label, config in steps:
            start = time.perf_counter()
            manifest = ingest_corpus(sources, config, Path(folder) / "store", required_splits=())
            seconds = time.perf_counter() - start
            print(f"{label}: {seconds:.2f} s, {manifest.total_documents} documents, kept "
                  f"{manifest.totals['languages']}, dropped {manifest.totals['language_drops']}")


if __name__ == "__main__":
    main()
