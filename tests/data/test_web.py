"""Web inputs and language identification: HTML files and WARC files written here with warcio's
own writer, from the small real pages in tests/fixtures/web, ingested for real."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from gptflow.data.config import IngestConfig
from gptflow.data.errors import CorpusError
from gptflow.data.ingest import ingest_corpus
from gptflow.data.language import identify_language
from gptflow.data.readers import SKIP_UNREADABLE
from gptflow.data.shards import iter_raw_batches
from gptflow.data.sources import resolve_sources
from gptflow.data.web import SKIP_CUT_SHORT_WARC, SKIP_MALFORMED_WARC, SKIP_NO_MAIN_TEXT, SKIP_UNDECODABLE_PAGE

FIXTURES = Path(__file__).parent.parent / "fixtures"
PAGES = FIXTURES / "web"


def stored_texts(manifest) -> list[str]:
    return [text for unit in manifest.units for batch in iter_raw_batches(Path(unit.directory), ["text"])
            for text in batch.column(0).to_pylist()]


def test_html_files_become_their_main_text_without_navigation_or_footer(tmp_path):
    manifest = ingest_corpus(resolve_sources([str(PAGES)]), IngestConfig(val_fraction=0.3), tmp_path / "store",
                             required_splits=())

    texts = stored_texts(manifest)
    assert manifest.total_documents == 3
    english = next(text for text in texts if text.startswith("Reading files line by line"))
    assert "only the current line is held in memory" in english
    assert "Privacy policy" not in english and "Contact" not in english
    german = next(text for text in texts if text.startswith("Dateien zeilenweise lesen"))
    assert "zu groß für den Arbeitsspeicher" in german  # entities and the page's encoding decoded


@pytest.mark.parametrize("gzipped", [True, False])
def test_a_warc_s_html_responses_are_documents_and_other_records_are_not(tmp_path, gzipped, make_crawl):
    path = make_crawl(tmp_path, gzipped)

    manifest = ingest_corpus(resolve_sources([str(path)]), IngestConfig(val_fraction=0.3), tmp_path / "store",
                             required_splits=())

    assert manifest.total_documents == 3
    texts = stored_texts(manifest)
    assert any(text.startswith("Lire un fichier ligne par ligne") for text in texts)
    # Records: 1 request, 2 response (en), 3-4 (png), 5-6 (fr), 7-8 (de), 9-10 (the empty page).
    assert manifest.skips.counts == {SKIP_NO_MAIN_TEXT: 1}
    assert manifest.skips.examples[SKIP_NO_MAIN_TEXT] == [f"{path}:record 10"]


def test_extracted_pages_keep_their_urls_and_so_do_their_segments(tmp_path, make_crawl):
    path = make_crawl(tmp_path)
    store = tmp_path / "store"
    manifest = ingest_corpus(resolve_sources([str(path)]), IngestConfig(val_fraction=0.3, segment_chars=256), store,
                             required_splits=())

    [extracted] = (store / "extracted").iterdir()
    import pyarrow as pa
    with pa.memory_map(str(extracted / "pages.arrow")) as stream:
        table = pa.ipc.open_file(stream).read_all()
    assert table.column("url").to_pylist() == ["https://example.org/en", "https://example.fr/", "https://example.de/"]
    assert table.column("record").to_pylist() == ["record 2", "record 6", "record 8"]
    [unit] = manifest.units
    rows = [row for batch in iter_raw_batches(Path(unit.directory), ["text", "url", "language"])
            for row in batch.to_pylist()]
    assert len(rows) > 3  # pages cut into segments, each with its page's URL
    assert {row["url"] for row in rows} == {"https://example.org/en", "https://example.fr/", "https://example.de/"}
    assert all(row["url"] == "https://example.fr/" for row in rows if "mémoire" in row["text"])
    assert {row["language"] for row in rows} == {None}  # data.languages unset: nothing identified


def test_a_broken_record_skips_the_rest_of_its_warc_located_and_counted(tmp_path, make_crawl):
    path = make_crawl(tmp_path, gzipped=False)
    data = path.read_bytes()
    french_response = data.index(b"WARC/1.0", data.index(b"https://example.fr/") + 200)  # record 6
    path.write_bytes(data[:french_response] + b"GARBAGE!" + data[french_response + len(b"WARC/1.0"):])

    manifest = ingest_corpus(resolve_sources([str(path)]), IngestConfig(val_fraction=0.3), tmp_path / "store",
                             required_splits=())

    assert manifest.total_documents == 1
    assert manifest.skips.counts == {SKIP_MALFORMED_WARC: 1}
    [example] = manifest.skips.examples[SKIP_MALFORMED_WARC]
    assert example.startswith(f"{path}:record 6 (") and "GARBAGE!" in example


def test_a_page_that_is_not_in_its_declared_encoding_is_skipped_and_located(tmp_path, write_warc):
    path = tmp_path / "crawl" / "bad.warc"
    path.parent.mkdir()
    write_warc(path, [("https://example.org/a", "text/html; charset=utf-8", b"<p>caf\xe9 ferm\xe9</p>"),
                      ("https://example.org/b", "text/html; charset=utf-8", (PAGES / "article_en.html").read_bytes())],
               gzipped=False)

    manifest = ingest_corpus(resolve_sources([str(path)]), IngestConfig(val_fraction=0.3), tmp_path / "store",
                             required_splits=())

    assert manifest.total_documents == 1
    assert manifest.skips.examples[SKIP_UNDECODABLE_PAGE] == [f"{path}:record 2 (utf-8)"]


@pytest.mark.parametrize("gzipped", [True, False])
def test_a_truncated_warc_keeps_the_pages_before_the_break_and_not_the_half_page(tmp_path, gzipped, make_crawl):
    path = make_crawl(tmp_path, gzipped)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 5])  # inside record 6, the French page

    manifest = ingest_corpus(resolve_sources([str(path)]), IngestConfig(val_fraction=0.3), tmp_path / "store",
                             required_splits=())

    assert [text.split("\n")[0] for text in stored_texts(manifest)] == ["Reading files line by line"]
    assert manifest.skips.counts == {SKIP_CUT_SHORT_WARC: 1}
    assert manifest.skips.examples[SKIP_CUT_SHORT_WARC] == [f"{path}:record 6"]


def test_language_identification_labels_the_sample_in_seven_languages():
    sample = [json.loads(line) for line in (FIXTURES / "language_sample.jsonl").read_text().splitlines()]
    assert len({row["language"] for row in sample}) >= 5

    results = [identify_language(row["text"]) for row in sample]

    assert [language for language, _ in results] == [row["language"] for row in sample]
    assert all(0.65 <= score <= 1.0 for _, score in results)


def test_languages_keep_only_those_and_count_the_dropped_per_language(tmp_path):
    sources = resolve_sources([str(PAGES)])
    config = IngestConfig(val_fraction=0.3, languages="en,fr")

    manifest = ingest_corpus(sources, config, tmp_path / "store", required_splits=())

    assert manifest.total_documents == 2
    assert manifest.totals["languages"] == {"en": 1, "fr": 1}
    assert manifest.totals["language_drops"] == {"de": 1}
    rows = [row for unit in manifest.units
            for batch in iter_raw_batches(Path(unit.directory), ["text", "url", "language", "language_score"])
            for row in batch.to_pylist()]
    assert {row["text"].split("\n")[0]: row["language"] for row in rows} == {
        "Reading files line by line": "en", "Lire un fichier ligne par ligne": "fr"}
    assert all(0.65 <= row["language_score"] <= 1.0 and row["url"] is None for row in rows)


def test_a_document_scored_below_the_threshold_is_dropped_though_in_a_kept_language(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "english.txt").write_text("She kept the old letters in a wooden box under the bed and read them "
                                        "again every winter.\n")
    # Half English, half French: English by a small margin, far below 0.9.
    (corpus / "mixed.txt").write_text("The cat sleeps on the warm window sill. Le chat dort sur le rebord chaud.\n")
    assert identify_language((corpus / "mixed.txt").read_text())[1] < 0.9

    manifest = ingest_corpus(resolve_sources([str(corpus)]), IngestConfig(val_fraction=0.3, languages="en,fr",
                                                                          language_threshold=0.9),
                             tmp_path / "store", required_splits=())

    assert stored_texts(manifest) == [(corpus / "english.txt").read_text()]
    assert sum(manifest.totals["language_drops"].values()) == 1


def test_changing_the_language_settings_refilters_without_re_extracting(tmp_path, make_crawl):
    path = make_crawl(tmp_path)
    sources = resolve_sources([str(path)])
    store = tmp_path / "store"

    everything = ingest_corpus(sources, IngestConfig(val_fraction=0.3), store, required_splits=())
    [extracted] = (store / "extracted").iterdir()
    written_at = (extracted / "pages.arrow").stat().st_mtime_ns
    english = ingest_corpus(sources, IngestConfig(val_fraction=0.3, languages="en"), store, required_splits=())
    two = ingest_corpus(sources, IngestConfig(val_fraction=0.3, languages="fr,en"), store, required_splits=())

    assert [path.name for path in (store / "extracted").iterdir()] == [extracted.name]
    assert (extracted / "pages.arrow").stat().st_mtime_ns == written_at
    assert len({everything.units[0].key, english.units[0].key, two.units[0].key}) == 3
    assert (everything.total_documents, english.total_documents, two.total_documents) == (3, 1, 2)
    assert english.totals["language_drops"] == {"fr": 1, "de": 1}
    assert english.skips.counts == everything.skips.counts == {SKIP_NO_MAIN_TEXT: 1}


def test_a_corpus_with_no_document_in_the_languages_asked_for_says_so(tmp_path):
    with pytest.raises(CorpusError, match=r"data\.languages=it dropped 3 documents \(de 1, en 1, fr 1\)"):
        ingest_corpus(resolve_sources([str(PAGES)]), IngestConfig(val_fraction=0.3, languages="it"),
                      tmp_path / "store", required_splits=())


def test_a_moved_warc_reuses_its_extraction_and_reports_skips_at_its_new_path(tmp_path, make_crawl):
    path = make_crawl(tmp_path)
    store = tmp_path / "store"
    ingest_corpus(resolve_sources([str(path)]), IngestConfig(val_fraction=0.3), store, required_splits=())
    moved = tmp_path / "elsewhere.warc.gz"
    path.rename(moved)

    manifest = ingest_corpus(resolve_sources([str(moved)]), IngestConfig(val_fraction=0.3, languages="en"), store,
                             required_splits=())

    assert len(list((store / "extracted").iterdir())) == 1
    assert manifest.skips.examples[SKIP_NO_MAIN_TEXT] == [f"{moved}:record 10"]


def test_gzipped_html_files_are_read(tmp_path):
    corpus = tmp_path / "pages"
    corpus.mkdir()
    (corpus / "page.html.gz").write_bytes(gzip.compress((PAGES / "article_fr.html").read_bytes()))

    manifest = ingest_corpus(resolve_sources([str(corpus)]), IngestConfig(val_fraction=0.3), tmp_path / "store",
                             required_splits=())

    assert stored_texts(manifest)[0].startswith("Lire un fichier ligne par ligne")


def test_a_truncated_gzipped_html_file_is_skipped_and_located(tmp_path):
    corpus = tmp_path / "pages"
    corpus.mkdir()
    (corpus / "good.html").write_bytes((PAGES / "article_en.html").read_bytes())
    broken = corpus / "broken.html.gz"
    broken.write_bytes(gzip.compress((PAGES / "article_fr.html").read_bytes())[:200])

    manifest = ingest_corpus(resolve_sources([str(corpus)]), IngestConfig(val_fraction=0.3), tmp_path / "store",
                             required_splits=())

    assert manifest.total_documents == 1
    assert manifest.skips.counts == {SKIP_UNREADABLE: 1}
    assert manifest.skips.examples[SKIP_UNREADABLE][0].startswith(f"{broken} (")
