"""The offline web demo corpus: built from Debian's documentation packages, the same pages for the
same seed, the evaluation pages held out of training, and its noisy pages what the quality
filters are for."""

from __future__ import annotations

from pathlib import Path

import pytest

from gptflow.data.config import IngestConfig
from gptflow.data.errors import SkipReport
from gptflow.data.ingest import ingest_corpus
from gptflow.data.sources import SourceFile, resolve_sources
from gptflow.data.web import read_pages
from gptflow.data.web_demo import HANDBOOK, PYTHON_DOCS, build_demo

pytestmark = pytest.mark.skipif(not (PYTHON_DOCS.is_dir() and HANDBOOK.is_dir()),
                                reason="apt-get install -y python3-doc debian-handbook (.ci/run does)")


def _pages(warc: Path) -> list[tuple[str, str]]:
    return [(location.rpartition(":")[2], text) for location, text in read_pages(SourceFile(warc, "warc"), SkipReport())]


def test_the_demo_holds_out_its_evaluation_pages_and_the_same_seed_gives_the_same_pages(tmp_path):
    first = build_demo(tmp_path / "first", noisy_pages=12, library_pages=3)
    second = build_demo(tmp_path / "second", noisy_pages=12, library_pages=3)

    assert sorted(path.name for path in first.train.iterdir()) == [
        "handbook.warc.gz", "noisy.warc.gz", "python-docs.warc.gz"]
    for name in ("python-docs.warc.gz", "noisy.warc.gz"):
        assert _pages(first.train / name) == _pages(second.train / name)
    assert first.pages["noisy.warc.gz"] == 12 and first.pages["eval"] > 40
    held_out = sorted(path.relative_to(first.eval) for path in first.eval.rglob("*.html"))
    assert len(held_out) == first.pages["eval"]
    assert {path.parts[0] for path in held_out} == {"python-docs", "handbook"}
    # No training page is an evaluation page: the held-out texts appear in no training page.
    from gptflow.data.web import read_pages as extract

    training = {text for name in ("python-docs.warc.gz", "handbook.warc.gz") for _, text in
                _pages(first.train / name)}
    evaluation = {text for path in held_out
                  for _, text in extract(SourceFile(first.eval / path, "html"), SkipReport())}
    assert evaluation and not training & evaluation


@pytest.mark.slow
def test_gopher_drops_every_keyword_spam_page(tmp_path):
    demo = build_demo(tmp_path / "demo", noisy_pages=30, library_pages=3)
    noisy = demo.train / "noisy.warc.gz"
    manifest = ingest_corpus(resolve_sources([str(noisy)]), IngestConfig(quality="gopher"), tmp_path / "store",
                             required_splits=())
    [unit] = manifest.units
    # Every third page is keyword spam (40 to 90 words drawn from four): Gopher's repetition filter drops all 10.
    assert unit.quality["dropped"]["gopher_repetition"] >= 10
    assert unit.documents >= 1  # a real paragraph amid boilerplate passes
