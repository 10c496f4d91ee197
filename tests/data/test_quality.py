"""Quality filters (``data.quality``): the presets run datatrove's own filters, with FineWeb's
published arguments and the thresholds set, on real documents and on documents crafted to sit at
each threshold; code is judged by no prose filter; a threshold change re-filters without
re-extracting and retokenizes only the files whose kept text changed."""

from __future__ import annotations

import gzip
import random
import re
import shutil
import sysconfig
from pathlib import Path

import pytest

from gptflow.data.config import QUALITY_PRESETS, IngestConfig, TokenizeConfig
from gptflow.data.errors import CorpusError, SkipReport
from gptflow.data.ingest import CorpusManifest, ingest_corpus
from gptflow.data.language import identify_language
from gptflow.data.quality import FILTERS_BY_PRESET, QualityFilters, survival_summary
from gptflow.data.sources import BUILTIN_CORPUS, SourceFile, resolve_sources
from gptflow.data.tokenize import tokenize_corpus
from gptflow.data.web import read_pages

datatrove_filters = pytest.importorskip("datatrove.pipeline.filters")

PAGES = Path(__file__).parent.parent / "fixtures" / "web"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
DOC_ROOTS = sorted(Path("/usr/share/doc").glob("python3*/html"))
MAN_PAGES = Path("/usr/share/man")
DOCUMENT_CHARS = 2500
"""Real documents are cut to about this size at a line end: the filters judge documents of every
size alike, and spaCy's word split of kilobytes of text is what the test's time goes on."""


def page_text(path: Path) -> str:
    """The page's main text as ``data.web`` extracts it; empty for a page without main text."""
    return "".join(text for _, text in read_pages(SourceFile(path.resolve(), "html"), SkipReport()))


def reference_pipeline(config: IngestConfig) -> list:
    """The filters FineWeb's published pipeline (datatrove's examples/fineweb.py) and C4 and Gopher
    name, built here from datatrove's classes, independently of ``data.quality``."""
    gopher = [datatrove_filters.GopherRepetitionFilter(), datatrove_filters.GopherQualityFilter()]
    if config.quality == "gopher":
        return gopher
    if config.quality == "c4":
        return [datatrove_filters.C4QualityFilter()]
    return [*gopher, datatrove_filters.C4QualityFilter(filter_no_terminal_punct=False),
            datatrove_filters.FineWebQualityFilter(line_punct_thr=config.quality_line_punct,
                                                   char_duplicates_ratio=config.quality_char_duplicates,
                                                   short_line_thr=config.quality_short_lines)]


def run_reference(pipeline: list, text: str) -> str | None:
    """The document's text after datatrove's own pipeline steps (``run``), or None if dropped."""
    from datatrove.data import Document

    documents = iter([Document(text=text, id="0")])
    for step in pipeline:
        documents = step.run(documents)
    kept = list(documents)
    return kept[0].text if kept else None


def cut(text: str) -> str:
    end = text.find("\n", DOCUMENT_CHARS)
    return text if end < 0 else text[:end]


@pytest.fixture(scope="module")
def real_documents() -> list[str]:
    """About 1,250 real documents: Python's HTML documentation (about 530 pages, extracted by
    ``data.web``), Debian's English and French manual pages (roff source) and standard-library modules."""
    if not DOC_ROOTS:
        pytest.skip("Python's HTML documentation is not installed: apt-get install -y python3-doc")
    pages = sorted(path for path in DOC_ROOTS[0].rglob("*.html") if "_static" not in path.parts)
    random.Random(0).shuffle(pages)
    documents = [cut(page_text(path)) for path in pages]
    manuals = sorted(MAN_PAGES.glob("man[158]/*.gz"))[:450] + sorted(MAN_PAGES.glob("fr/man1/*.gz"))[:150]
    documents += [cut(gzip.decompress(path.read_bytes()).decode("utf-8", "replace")) for path in manuals]
    documents += [cut(path.read_text(encoding="utf-8")) for path in sorted(STDLIB.glob("*.py"))[:150]]
    return [document for document in documents if document.strip()]


def crafted_documents(sentences: list[str], rng: random.Random) -> list[str]:
    """Documents built from real sentences to sit on both sides of each filter's thresholds."""
    def prose(count: int) -> list[str]:
        return rng.sample(sentences, count)

    def unpunctuated(line: str) -> str:
        return line.rstrip(".!?\"'") + " and so on"

    documents = []
    for step in range(100):
        lines = prose(50)  # FineWeb: lines ending in punctuation around 0.12
        documents.append("\n".join(line if index < 3 + step % 7 else unpunctuated(line)
                                   for index, line in enumerate(lines)))
        lines = prose(30)  # FineWeb: lines of at most 30 characters around 0.67
        documents.append("\n".join(line[:25].rstrip() + "." if index < 16 + step % 8 else line
                                   for index, line in enumerate(lines)))
        lines = prose(80)  # FineWeb: characters in duplicated lines around 0.01
        repeated = lines[0][: 10 + step * 3]
        documents.append("\n".join([repeated, *lines[1:], repeated]))
        words = " ".join(prose(12)).split()  # Gopher: words around 50, stop words around 2
        documents.append(" ".join(words[: 40 + step % 21]))
        stop_free = [word for word in words if word.lower() not in {"the", "be", "to", "of", "and", "that", "have",
                                                                    "with"}]
        documents.append(" ".join(stop_free[:60] + ["the", "of", "and"][: step % 4]))
        lines = prose(20)  # Gopher: bullets around 0.9, ellipses around 0.3, hashes around 0.1
        documents.append("\n".join(("- " + line) if index < 15 + step % 6 else line
                                   for index, line in enumerate(lines)))
        documents.append("\n".join(line.rstrip(".") + "..." if index < 3 + step % 6 else line
                                   for index, line in enumerate(lines)))
        body = " ".join(prose(8))
        documents.append(body + " #" * (len(body.split()) // 10 - 2 + step % 5))
        lines = prose(10)  # C4: lorem ipsum, curly brackets, javascript, policies, citations, sentences
        marked = {0: "Lorem ipsum dolor sit amet is placeholder text.", 1: "Call it as f{x} to format.",
                  2: "Please enable JavaScript to view this page.", 3: "Read our privacy policy before you go.",
                  4: "It was settled in 1905.[12]", 5: "Short."}[step % 6]
        documents.append("\n".join(lines[: 2 + step % 5] + [marked] + lines[5:]))
        paragraph = "\n".join(prose(3))  # Gopher repetition: duplicated paragraphs, lines and n-grams
        documents.append("\n\n".join([paragraph] * (1 + step % 3) + ["\n".join(prose(4 + step % 5))]))
        phrase = " ".join(rng.choice(sentences).split()[:3])
        documents.append(" ".join(prose(6)) + (" " + phrase) * (2 + step % 9))
    return documents


@pytest.fixture(scope="module")
def documents(real_documents) -> list[str]:
    sentences = [line.strip() for document in real_documents[:800] for line in document.split("\n")
                 if 40 <= len(line.strip()) <= 200 and line.strip().endswith(".")]
    crafted = crafted_documents(sentences, random.Random(1))
    assert len(crafted) >= 1000 and len(real_documents) + len(crafted) >= 2000
    return real_documents + crafted


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    {"quality": "gopher"}, {"quality": "c4"}, {"quality": "fineweb"},
    {"quality": "fineweb", "quality_line_punct": 0.3, "quality_char_duplicates": 0.05, "quality_short_lines": 0.5},
], ids=["gopher", "c4", "fineweb", "fineweb-thresholds-set"])
def test_each_preset_keeps_and_drops_what_datatrove_s_pipeline_does(documents, settings):
    config = IngestConfig(**settings)
    filters = QualityFilters(config)
    pipeline = reference_pipeline(config)

    ours, theirs = [], []
    for text in documents:  # one document at a time: datatrove keeps its last word splits for the next filter
        ours.append(filters.judge(text).text)
        theirs.append(run_reference(pipeline, text))

    disagreements = [index for index, (a, b) in enumerate(zip(ours, theirs)) if a != b]
    assert len(disagreements) <= len(documents) // 1000, disagreements[:5]
    assert filters.judged == len(documents)
    # Every filter of the preset dropped some documents, and each preset keeps some.
    assert set(filters.dropped) == set(FILTERS_BY_PRESET[config.quality])
    assert 0 < sum(text is not None for text in ours) < len(documents)
    assert sum(filters.dropped.values()) == sum(text is None for text in ours)


def test_the_presets_are_the_settings_choices_and_another_is_one_line_listing_them():
    assert tuple(FILTERS_BY_PRESET) == QUALITY_PRESETS
    with pytest.raises(ValueError, match=r"^data\.quality must be one of none, gopher, c4, fineweb, got 'fineweb2'$"):
        IngestConfig(quality="fineweb2")
    with pytest.raises(ValueError, match=r"data\.quality_line_punct must be a share in \[0, 1\], got 12"):
        IngestConfig(quality="fineweb", quality_line_punct=12)


def test_c4_keeps_the_lines_it_keeps_and_the_first_filter_to_drop_a_document_is_counted():
    text = page_text(PAGES / "article_en.html")
    filters = QualityFilters(IngestConfig(quality="fineweb"))

    kept = filters.judge(text + "\nPlease enable JavaScript to see the comments below this page.")
    repeated = filters.judge("\n\n".join([text] * 4))

    assert kept.text is not None and "JavaScript" not in kept.text and kept.text.startswith(text.split("\n")[0])
    assert (repeated.text, repeated.filter, repeated.reason) == (None, "gopher_repetition", "dup_para_frac")
    assert filters.counts() == {"judged": 2, "dropped": {"gopher_repetition": 1},
                                "dropped_bytes": {"gopher_repetition": len("\n\n".join([text] * 4).encode())},
                                "rules": {"gopher_repetition/dup_para_frac": 1}}
    assert survival_summary(IngestConfig(quality="fineweb"), filters.counts()) == (
        "data.quality=fineweb kept 1 of 2 prose documents judged: gopher_repetition 1 (50%) → gopher_quality 1 (50%) "
        "→ c4 1 (50%) → fineweb 1 (50%)")


def test_code_is_judged_by_no_prose_filter(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    code = (STDLIB / "json" / "encoder.py").read_text(encoding="utf-8")
    (corpus / "encoder.py").write_text(code, encoding="utf-8")
    (corpus / "article.txt").write_text(page_text(PAGES / "article_en.html"), encoding="utf-8")
    (corpus / "menu.md").write_text("Home\nAbout us\nProducts\nContact\nSearch\n", encoding="utf-8")
    judged_as_prose = IngestConfig(quality="fineweb", languages="fr")
    assert QualityFilters(judged_as_prose).judge(code).text is None  # what the exemption spares it
    assert identify_language(code)[0] != "fr"

    def ingest(name: str, **settings) -> CorpusManifest:  # a store each: every unit is computed
        return ingest_corpus(resolve_sources([str(corpus)]), IngestConfig(val_fraction=0.3, **settings),
                             tmp_path / name, required_splits=())

    plain, quality, french = ingest("plain"), ingest("quality", quality="fineweb"), ingest("french", languages="fr")

    units = {name: {Path(unit.source).name: unit for unit in manifest.units}
             for name, manifest in (("plain", plain), ("quality", quality), ("french", french))}
    assert len({units[name]["encoder.py"].key for name in units}) == 1  # one unit: neither setting reaches code
    assert units["quality"]["encoder.py"].documents == 1 and units["quality"]["encoder.py"].quality == {}
    assert units["french"]["encoder.py"].documents == 1 and units["french"]["encoder.py"].language_drops == {}
    assert units["quality"]["article.txt"].documents == 1
    assert units["quality"]["menu.md"].documents == 0
    menu = units["quality"]["menu.md"].quality
    assert menu["judged"] == sum(menu["dropped"].values()) == 1
    assert quality.totals["quality"]["judged"] == 2
    assert units["french"]["article.txt"].language_drops == {"en": 1}


def test_the_built_in_corpus_and_code_files_are_code_and_prose_files_are_not():
    assert all(source.is_code for source in resolve_sources([BUILTIN_CORPUS]).files)
    assert SourceFile(Path("/corpus/tool.py.gz"), "text", "gzip").is_code
    assert not any(SourceFile(Path(f"/corpus/{name}"), file_format).is_code for name, file_format in
                   [("notes.txt", "text"), ("README.md", "text"), ("page.html", "html"), ("crawl.warc", "warc"),
                    ("rows.jsonl", "jsonl"), ("code.py.jsonl", "jsonl")])


def test_a_threshold_change_refilters_without_re_extracting_and_retokenizes_only_what_changed(
        tmp_path, make_crawl, tiny_tokenizer):
    crawl = make_crawl(tmp_path)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.move(crawl, corpus / crawl.name)
    english = page_text(PAGES / "article_en.html")
    # Every line ends in a full stop: the article's text keeps through any line_punct threshold.
    (corpus / "article.txt").write_text(re.sub(r"(?<=[^.\n])$", ".", english, flags=re.MULTILINE), encoding="utf-8")
    sources = resolve_sources([str(corpus)])
    store = tmp_path / "store"

    default = ingest_corpus(sources, IngestConfig(val_fraction=0.3, quality="fineweb"), store, required_splits=())
    [extracted] = (store / "extracted").iterdir()
    written_at = (extracted / "pages.arrow").stat().st_mtime_ns
    first_tokens = tokenize_corpus(default, tiny_tokenizer, TokenizeConfig(), store)
    # Of the English page's lines that C4 keeps, 4 of 5 end in punctuation (0.8): 0.85 drops it.
    stricter = ingest_corpus(sources, IngestConfig(val_fraction=0.3, quality="fineweb", quality_line_punct=0.85), store,
                             required_splits=())
    second_tokens = tokenize_corpus(stricter, tiny_tokenizer, TokenizeConfig(), store)

    assert [path.name for path in (store / "extracted").iterdir()] == [extracted.name]
    assert (extracted / "pages.arrow").stat().st_mtime_ns == written_at
    by_name = [{Path(unit.source).name: unit for unit in manifest.units} for manifest in (default, stricter)]
    assert all(by_name[0][name].key != by_name[1][name].key for name in by_name[0])  # both re-filtered
    assert [by_name[0][crawl.name].documents, by_name[1][crawl.name].documents] == [1, 0]
    assert by_name[1][crawl.name].quality["dropped"] == {"gopher_quality": 2, "fineweb": 1}
    assert by_name[1][crawl.name].quality["rules"]["fineweb/line_punct_ratio"] == 1
    reused = {Path(unit.source).name: unit.reused for unit in second_tokens.units}
    assert reused == {"article.txt": True, crawl.name: False}
    assert not any(unit.reused for unit in first_tokens.units)


def test_a_corpus_of_which_no_document_passes_says_how_many_survived_each_filter(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "menu.md").write_text("Home\nAbout us\nProducts\nContact\nSearch\n", encoding="utf-8")
    (corpus / "letters.txt").write_text("\n\n".join([page_text(PAGES / "article_en.html")] * 4), encoding="utf-8")

    with pytest.raises(CorpusError, match=r"^The corpus has no usable documents \(2 source files; nothing skipped; "
                                          r"data\.quality=gopher kept 0 of 2 prose documents judged: "
                                          r"gopher_repetition \d \(\d+%\) → gopher_quality 0 \(0%\)\)\. Fix"):
        ingest_corpus(resolve_sources([str(corpus)]), IngestConfig(val_fraction=0.3, quality="gopher"),
                      tmp_path / "store", required_splits=())
