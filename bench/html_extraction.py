"""Main-text extraction from HTML: pages/s and MB/s of trafilatura and resiliparse on real pages
(Python's HTML documentation, Debian's ``python3-doc``), and what each keeps of one page.

    apt-get install -y python3-doc
    python bench/html_extraction.py --pages 300 --show library/json.html

Prints, per extractor, pages/s and MB/s of HTML on one core, the share of pages it returned text
for, and the mean characters kept; ``--show`` prints both extractions' first lines of one page.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from pathlib import Path

DOC_ROOTS = sorted(Path("/usr/share/doc").glob("python3*/html"))


def python_doc_pages(count: int, seed: int) -> tuple[Path, list[Path]]:
    """The folder of Debian's Python HTML documentation and ``count`` of its pages, drawn by ``seed``."""
    if not DOC_ROOTS:
        raise SystemExit("No Python HTML documentation under /usr/share/doc: apt-get install -y python3-doc")
    root = DOC_ROOTS[0]
    pages = sorted(path for path in root.rglob("*.html") if "_static" not in path.parts)
    random.Random(seed).shuffle(pages)
    return root, pages[:count]


def extractors() -> dict[str, Callable[[str], str]]:
    import trafilatura
    from resiliparse.extract.html2text import extract_plain_text

    return {
        "trafilatura": lambda html: trafilatura.extract(html, include_comments=False) or "",
        "resiliparse": lambda html: extract_plain_text(html, main_content=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", default="library/json.html", help="a page, relative to the docs' html folder")
    args = parser.parse_args()
    root, pages = python_doc_pages(args.pages, args.seed)
    htmls = [path.read_text(encoding="utf-8", errors="replace") for path in pages]
    megabytes = sum(len(html.encode()) for html in htmls) / 1e6
    print(f"{len(htmls)} pages of {root}, {megabytes:.1f} MB of HTML")
    print("| extractor | pages/s | MB/s | pages with text | mean characters kept |")
    print("|---|---:|---:|---:|---:|")
    for name, extract in extractors().items():
        start = time.perf_counter()
        texts = [extract(html) for html in htmls]
        seconds = time.perf_counter() - start
        with_text = sum(1 for text in texts if text.strip())
        print(f"| {name} | {len(htmls) / seconds:,.0f} | {megabytes / seconds:.2f} | {with_text / len(htmls):.0%} "
              f"| {sum(map(len, texts)) / len(texts):,.0f} |")
    shown = (root / args.show).read_text(encoding="utf-8", errors="replace")
    for name, extract in extractors().items():
        print(f"\n--- {name}: {args.show} (first 600 characters)\n{extract(shown)[:600]}")


if __name__ == "__main__":
    main()
