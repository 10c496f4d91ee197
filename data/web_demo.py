"""An offline web corpus for trying the quality filters: real pages that Debian ships, and pages
made noisy the ways a crawl is, in WARC files; and a held-out evaluation corpus of clean English
prose (``gptflow sweep --grid data.quality=none,gopher,c4,fineweb --eval-corpus``).

    apt-get install -y python3-doc debian-handbook
    python -m gptflow.data.web_demo DIR

``DIR/train/`` holds ``python-docs.warc.gz`` (pages of Python's HTML documentation outside the
held-out folders), ``handbook.warc.gz`` (the Debian Administrator's Handbook in six languages:
English and five others) and ``noisy.warc.gz``: keyword spam, pages of navigation links only,
and short real paragraphs buried in cookie notices, menus and footers, their words drawn from
the documentation itself. ``DIR/eval/`` holds the Python tutorial's, HOWTOs' and FAQ's pages and
every fourth page of the English handbook as HTML files: clean English prose, with code in the
Python pages and without in the handbook's, that no training page repeats (those handbook pages
are left out of training in every language: an untranslated page is the English one again). The same installed packages and
``seed`` give the same files.
"""

from __future__ import annotations

import argparse
import io
import random
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gptflow.data.errors import UserError

PYTHON_DOCS = Path("/usr/share/doc/python3-doc/html")
HANDBOOK = Path("/usr/share/doc/debian-handbook/html")
HANDBOOK_LANGUAGES = ("en-US", "fr-FR", "de-DE", "es-ES", "it-IT", "pt-BR")
EVAL_FOLDERS = ("tutorial", "howto", "faq")
"""Python documentation held out of training: the evaluation corpus, with ``EVAL_HANDBOOK_SHARE``."""
EVAL_HANDBOOK_SHARE = 4
"""Every 4th page of the English handbook is held out too (in file-name order): prose without code."""
TRAIN_FOLDERS = ("library", "reference", "whatsnew", "c-api", "using", "extending")
NAVIGATION = ("Home", "Products", "Pricing", "Blog", "About us", "Contact", "Careers", "Login", "Sign up", "Support",
              "Partners", "Press", "Terms", "Privacy", "Sitemap", "Newsletter")
BOILERPLATE = ("We use cookies to improve your experience. Accept all | Reject | Settings",
               "Subscribe to our newsletter!", "© 2026 Example Corp. All rights reserved.", "Share: Twitter Facebook",
               "Related posts", "Leave a comment", "Skip to content", "Follow us")


class DemoSourcesMissing(UserError):
    """The Debian packages the demo is made from are not installed."""


@dataclass(frozen=True)
class DemoCorpus:
    train: Path
    """``--corpus``: the WARC files."""
    eval: Path
    """``--eval-corpus``: the held-out HTML pages."""
    pages: dict[str, int]
    """Pages per WARC file, and ``eval``."""


def build_demo(out: Path, noisy_pages: int = 400, library_pages: int = 160, seed: int = 0) -> DemoCorpus:
    """Write the demo corpus under ``out`` (see the module's docstring)."""
    missing = [f"{path} (apt-get install -y {package})" for path, package in
               ((PYTHON_DOCS, "python3-doc"), (HANDBOOK, "debian-handbook")) if not path.is_dir()]
    if missing:
        raise DemoSourcesMissing(f"The web demo is made from Debian's documentation packages: {', '.join(missing)}.")
    rng = random.Random(seed)
    train, held_out = out / "train", out / "eval"
    train.mkdir(parents=True, exist_ok=True)
    held_out.mkdir(parents=True, exist_ok=True)
    docs = _python_doc_pages(rng, library_pages)
    handbook = [page for language in HANDBOOK_LANGUAGES for page in sorted((HANDBOOK / language).glob("*.html"))]
    held_out_handbook = sorted((HANDBOOK / "en-US").glob("*.html"))[::EVAL_HANDBOOK_SHARE]
    # In every language: a page left untranslated is the English page again.
    held_out_names = {page.name for page in held_out_handbook}
    handbook = [page for page in handbook if page.name not in held_out_names]
    write_crawl(train / "python-docs.warc.gz", ((_docs_url(page), page.read_bytes()) for page in docs))
    write_crawl(train / "handbook.warc.gz", ((_handbook_url(page), page.read_bytes()) for page in handbook))
    vocabulary = _words(docs[:40])
    paragraphs = _paragraphs(docs[:40])
    write_crawl(train / "noisy.warc.gz",
                (_noisy_page(index, rng, vocabulary, paragraphs) for index in range(noisy_pages)))
    evaluation = [page for folder in EVAL_FOLDERS for page in sorted((PYTHON_DOCS / folder).rglob("*.html"))]
    for page in evaluation:
        target = held_out / "python-docs" / page.relative_to(PYTHON_DOCS)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(page, target)
    (held_out / "handbook").mkdir(exist_ok=True)
    for page in held_out_handbook:
        shutil.copyfile(page, held_out / "handbook" / page.name)
    return DemoCorpus(train, held_out, {"python-docs.warc.gz": len(docs), "handbook.warc.gz": len(handbook),
                                        "noisy.warc.gz": noisy_pages, "eval": len(evaluation) + len(held_out_handbook)})


def write_crawl(path: Path, pages: Iterator[tuple[str, bytes]]) -> None:
    """A ``.warc.gz`` of one HTTP response record per ``(url, html)``."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    partial = path.with_name(path.name + ".partial")  # a file cut short by an interruption is never read as whole
    with open(partial, "wb") as stream:
        writer = WARCWriter(stream, gzip=True)
        for url, html in pages:
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(html),
                                                          http_headers=headers))
    partial.replace(path)


def _python_doc_pages(rng: random.Random, library_pages: int) -> list[Path]:
    library = sorted((PYTHON_DOCS / "library").glob("*.html"))
    others = [page for folder in TRAIN_FOLDERS if folder != "library"
              for page in sorted((PYTHON_DOCS / folder).rglob("*.html"))]
    return sorted(rng.sample(library, min(library_pages, len(library)))) + others


def _docs_url(page: Path) -> str:
    return f"https://docs.python.org/3/{page.relative_to(PYTHON_DOCS)}"


def _handbook_url(page: Path) -> str:
    return f"https://debian-handbook.info/browse/{page.parent.name}/stable/{page.name}"


def _visible_text(page: Path) -> str:
    html = page.read_text(encoding="utf-8", errors="replace")
    html = re.sub(r"(?s)<(script|style)\b.*?</\1>", " ", html)
    return re.sub(r"<[^>]+>", " ", html)


def _words(pages: list[Path]) -> list[str]:
    """The lowercase words of ``pages``, for spam and menus made of real vocabulary."""
    return sorted({word.lower() for page in pages for word in re.findall(r"[A-Za-z]{4,12}", _visible_text(page))})


def _paragraphs(pages: list[Path]) -> list[str]:
    found = [" ".join(match.split()) for page in pages
             for match in re.findall(r"(?s)<p>(.*?)</p>", page.read_text(encoding="utf-8", errors="replace"))]
    return [re.sub(r"<[^>]+>", "", text) for text in found if 120 <= len(text) <= 600 and "<pre" not in text]


def _noisy_page(index: int, rng: random.Random, words: list[str], paragraphs: list[str]) -> tuple[str, bytes]:
    """Keyword spam, a page of links, or a short real paragraph amid boilerplate, in turn."""
    kind = ("spam", "links", "boilerplate")[index % 3]
    if kind == "spam":
        keywords = rng.sample(words, 4)
        body = "".join(f"<p>{' '.join(rng.choice(keywords) for _ in range(rng.randint(40, 90)))}</p>"
                       for _ in range(rng.randint(3, 8)))
    elif kind == "links":
        body = "<ul>" + "".join(f"<li><a href='/{word}'>{word.title()}</a></li>"
                                for word in rng.sample(words, rng.randint(30, 80))) + "</ul>"
    else:
        menu = "".join(f"<a href='#'>{item}</a> | " for item in rng.sample(NAVIGATION, 8))
        notices = "".join(f"<div>{notice}</div>" for notice in rng.sample(BOILERPLATE, 5))
        body = f"<nav>{menu}</nav>{notices}<article><p>{rng.choice(paragraphs)}</p></article><footer>{notices}</footer>"
    html = f"<!doctype html><html><head><title>{kind} {index}</title></head><body>{body}</body></html>"
    return f"https://{kind}-{index % 37}.example/page/{index}", html.encode()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m gptflow.data.web_demo", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder to write train/ and eval/ into")
    parser.add_argument("--noisy-pages", type=int, default=400)
    parser.add_argument("--library-pages", type=int, default=160, help="pages of the library reference to take")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        demo = build_demo(args.out, args.noisy_pages, args.library_pages, args.seed)
    except DemoSourcesMissing as error:
        raise SystemExit(f"web_demo: error: {error}") from None
    print(", ".join(f"{name}: {count} pages" for name, count in demo.pages.items()))
    print(f"gptflow sweep --corpus {demo.train} --eval-corpus {demo.eval} --grid data.quality=none,gopher,c4,fineweb")


if __name__ == "__main__":
    main()
