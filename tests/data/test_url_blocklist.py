"""``data.url_blocklist``: WARC pages of listed domains (and their subdomains) are dropped before any
other filter, counted as the ``url_blocklist`` filter; the list keys WARC files' units only, so a
change re-filters them from their extraction units and leaves every other file's unit alone. WARC
files written here with warcio, ingested for real."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from gptflow.data.config import IngestConfig
from gptflow.data.errors import SkipReport
from gptflow.data.ingest import CorpusManifest, ingest_corpus
from gptflow.data.quality import survival_summary
from gptflow.data.shards import iter_raw_batches, read_unit_file
from gptflow.data.sources import SourceFile, resolve_sources
from gptflow.data.url_blocklist import UrlBlocklist, UrlBlocklistError, load_url_blocklist
from gptflow.data.web import read_pages

PAGES = Path(__file__).parent.parent / "fixtures" / "web"


@pytest.fixture
def corpus(tmp_path, write_warc) -> Path:
    """A WARC of three pages (English at a subdomain of example.com, French at example.com written
    as a browser may, German at notexample.com), an HTML page and a text file."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_warc(folder / "crawl.warc.gz", [
        ("https://news.example.com/today", "text/html; charset=utf-8", (PAGES / "article_en.html").read_bytes()),
        ("https://EXAMPLE.com.:443/fr", "text/html; charset=utf-8", (PAGES / "article_fr.html").read_bytes()),
        ("https://notexample.com/", "text/html; charset=iso-8859-1", (PAGES / "article_de.htm").read_bytes()),
    ], True)
    shutil.copy(PAGES / "article_en.html", folder / "page.html")
    (folder / "notes.txt").write_text("Notes on reading large files one line at a time.\n", encoding="utf-8")
    return folder


def write_list(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def units_by_name(manifest: CorpusManifest) -> dict[str, object]:
    return {Path(unit.source).name: unit for unit in manifest.units}


def main_text(page: str) -> str:
    """The main text ``data.web`` extracts from the fixture page ``page``."""
    [(_, text)] = read_pages(SourceFile(PAGES / page, "html"), SkipReport())
    return text


def test_pages_of_a_listed_domain_and_its_subdomains_are_dropped_and_others_kept(corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datatrove.data", None)  # without data.quality, datatrove is not needed
    blocklist = write_list(tmp_path / "blocked.txt",
                           "# ad and spam hosts\n\nexample.com  # subdomains too\nads.example.org\n")
    # data.languages set too: a blocked page is dropped before it is identified, so it counts under no language.
    config = IngestConfig(val_fraction=0.3, url_blocklist=blocklist, languages="de,fr,en")

    manifest = ingest_corpus(resolve_sources([str(corpus)]), config, tmp_path / "store", required_splits=())

    warc = units_by_name(manifest)["crawl.warc.gz"]
    texts = [text for batch in iter_raw_batches(Path(warc.directory), ["text"]) for text in batch.column(0).to_pylist()]
    assert warc.documents == 1 and "Dateien zeilenweise lesen" in texts[0]
    assert warc.languages == {"de": 1} and warc.language_drops == {}
    en_bytes, fr_bytes = (len(main_text(page).encode()) for page in ("article_en.html", "article_fr.html"))
    assert warc.quality == {"judged": 3, "dropped": {"url_blocklist": 2},
                            "dropped_bytes": {"url_blocklist": en_bytes + fr_bytes},
                            "rules": {"url_blocklist/listed_domain": 2}}
    samples = read_unit_file(Path(warc.directory))["quality_samples"]["url_blocklist"]
    assert [sample["url"] for sample in samples] == ["https://news.example.com/today", "https://EXAMPLE.com.:443/fr"]
    # The HTML page (no URL) and the text file are kept and judged by no filter.
    assert {name: (unit.documents, unit.quality) for name, unit in units_by_name(manifest).items()
            if name != "crawl.warc.gz"} == {"page.html": (1, {}), "notes.txt": (1, {})}
    assert survival_summary(config, manifest.totals["quality"]) == (
        f"data.url_blocklist={blocklist} kept 1 of 3 prose documents judged: url_blocklist 1 (33%)")


def test_a_list_change_refilters_warc_units_from_their_extraction_and_leaves_other_files_alone(corpus, tmp_path):
    sources = resolve_sources([str(corpus)])
    store = tmp_path / "store"
    unset = ingest_corpus(sources, IngestConfig(val_fraction=0.3), store, required_splits=())
    extracted = {path.name: (path / "pages.arrow").stat().st_mtime_ns for path in (store / "extracted").iterdir()}

    blocking = ingest_corpus(sources, IngestConfig(val_fraction=0.3, url_blocklist=write_list(
        tmp_path / "first.txt", "example.com\n")), store, required_splits=())
    changed = ingest_corpus(sources, IngestConfig(val_fraction=0.3, url_blocklist=write_list(
        tmp_path / "second.txt", "notexample.com\n")), store, required_splits=())
    # The same domains, reordered, commented and cased otherwise: nothing to re-filter.
    same_domains = ingest_corpus(sources, IngestConfig(val_fraction=0.3, url_blocklist=write_list(
        tmp_path / "third.txt", "# one host\nNotExample.com.\n")), store, required_splits=())

    assert {path.name: (path / "pages.arrow").stat().st_mtime_ns for path in (store / "extracted").iterdir()} == \
        extracted  # the WARC's and the HTML page's, written once
    runs = [units_by_name(manifest) for manifest in (unset, blocking, changed, same_domains)]
    assert [run["crawl.warc.gz"].documents for run in runs] == [3, 1, 2, 2]
    assert len({run["crawl.warc.gz"].key for run in runs}) == 3
    assert [run["crawl.warc.gz"].reused for run in runs] == [False, False, False, True]
    for name in ("page.html", "notes.txt"):  # no URLs: keyed and counted as without a list
        assert {run[name].key for run in runs} == {runs[0][name].key}
        assert [run[name].reused for run in runs] == [False, True, True, True]
        assert {str(run[name].quality) for run in runs} == {"{}"}


def test_a_missing_list_is_one_line_naming_it_before_anything_is_ingested(corpus, tmp_path):
    missing = tmp_path / "lists" / "blocked.txt"
    store = tmp_path / "store"

    with pytest.raises(UrlBlocklistError) as raised:
        ingest_corpus(resolve_sources([str(corpus)]), IngestConfig(url_blocklist=str(missing)), store,
                      required_splits=())

    assert str(raised.value) == (f"data.url_blocklist: cannot read {missing} (No such file or directory). Give a UTF-8 "
                                 f"text file of domains, one per line, or leave data.url_blocklist unset.")
    assert not store.exists()


def test_a_line_that_is_no_domain_is_named_with_its_line_number(tmp_path):
    path = write_list(tmp_path / "blocked.txt", "example.com\nhttps://spam.example.net/page\n")

    with pytest.raises(UrlBlocklistError, match=rf"^data.url_blocklist: {path}:2 is 'https://spam.example.net/page', "
                                                r"not a domain\. Write the host alone, such as example.com"):
        load_url_blocklist(path)


def test_a_host_matches_a_listed_domain_or_its_subdomains_only():
    blocklist = UrlBlocklist("blocked.txt", frozenset({"example.com", "tracker.net"}))

    blocked = ["http://example.com", "https://a.b.example.com/x?y=1", "https://user:pw@EXAMPLE.com:8080/",
               "https://example.com./", "http://cdn.tracker.net/pixel.gif"]
    kept = ["https://notexample.com/", "https://example.com.evil.org/", "https://example.org/", "https://[::1/",
            "", None, "https://com/", "https://net/tracker.net"]
    assert [url for url in blocked if not blocklist.blocks(url)] == []
    assert [url for url in kept if blocklist.blocks(url)] == []
    assert load_url_blocklist(None) is None
