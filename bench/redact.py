"""How fast `data.redact_pii` is, what it costs the ingest stage, and how precise it is.

    python bench/redact.py

1. Throughput: `data.redact.redact` over every document of the built-in corpus (the standard
   library's source), in this one process: MB/s per core (CPU time) and wall.
2. The ingest stage with and without redaction, each into an empty store, best of 5 interleaved.
3. Precision and recall per kind on a labelled sample built here: generated e-mail addresses,
   phone numbers, IPs, payment card numbers (Luhn-valid) and keys, each set into a line of the
   standard library's source; and, as look-alikes that must stay, every version string, hex
   constant, float, date and dotted number of the standard library, each set into such a line.
   Secrets come with a vendor prefix, or with only their context: an AWS secret access key or a
   password assigned in Python, shell, INI, YAML or JSON, or after an access key id in a
   credentials CSV. Their look-alikes are the standard library's own lines that assign to a name
   ending in secret, token, password, key, ...: each one redacted is listed.
"""

from __future__ import annotations

import random
import re
import string
import tempfile
import time
from collections import Counter
from pathlib import Path

from gptflow.data.config import IngestConfig
from gptflow.data.errors import SkipReport
from gptflow.data.ingest import ingest_corpus
from gptflow.data.readers import read_documents
from gptflow.data.redact import REDACTION_KINDS, REPLACEMENTS, luhn_valid, redact
from gptflow.data.sources import BUILTIN_CORPUS, resolve_sources

SAMPLE_PER_KIND = 400


def throughput(texts: list[str]) -> None:
    megabytes = sum(len(text.encode()) for text in texts) / 1e6
    best_cpu, best_wall, found = float("inf"), float("inf"), Counter()
    for _ in range(3):
        cpu, wall = time.process_time(), time.perf_counter()
        found = Counter()
        for text in texts:
            found.update(redact(text)[1])
        best_cpu, best_wall = min(best_cpu, time.process_time() - cpu), min(best_wall, time.perf_counter() - wall)
    print(f"1. redact() over the built-in corpus: {megabytes:.1f} MB, {len(texts):,} documents, best of 3")
    print(f"   {megabytes / best_cpu:.1f} MB/s per core (CPU time), {megabytes / best_wall:.1f} MB/s wall")
    print(f"   found: {dict(sorted(found.items()))}")


def ingest_cost(repeats: int = 5) -> None:
    """Runs with and without redaction interleaved, so a busy moment of the machine hits both."""
    sources = resolve_sources([BUILTIN_CORPUS])
    timings = {False: float("inf"), True: float("inf")}
    for _ in range(repeats):
        for redacting in timings:
            with tempfile.TemporaryDirectory() as store:
                started = time.perf_counter()
                ingest_corpus(sources, IngestConfig(redact_pii=redacting), Path(store))
                timings[redacting] = min(timings[redacting], time.perf_counter() - started)
    print(f"2. ingest stage, built-in corpus, empty store, best of {repeats} interleaved: {timings[False]:.2f} s "
          f"without redaction, {timings[True]:.2f} s with ({timings[True] / timings[False]:.2f}x)")


def _luhn_complete(rng: random.Random, prefix: str, length: int) -> str:
    """A random card number of ``prefix`` and ``length`` with a valid checksum digit."""
    body = prefix + "".join(str(rng.randrange(10)) for _ in range(length - len(prefix) - 1))
    return next(body + str(check) for check in range(10) if luhn_valid(body + str(check)))


def _positives(rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    """Per kind: (the text set into a line, the part of it that must go)."""
    def word(n: int, alphabet: str = string.ascii_lowercase) -> str:
        return "".join(rng.choice(alphabet) for _ in range(n))

    def card() -> str:
        prefix, length = rng.choice([("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("34", 15), ("37", 15),
                                     ("6011", 16)])
        number = _luhn_complete(rng, prefix, length)
        separator = rng.choice(["", " ", "-"])
        return separator.join(number[i:i + 4] for i in range(0, len(number), 4)) if separator else number

    def phone() -> str:
        area, exchange, line = rng.randrange(200, 1000), rng.randrange(200, 1000), rng.randrange(10000)
        return rng.choice([f"+1 {area} {exchange} {line:04d}", f"({area}) {exchange}-{line:04d}",
                           f"{area}-{exchange}-{line:04d}", f"+44 20 {exchange}{line % 10} {line:04d}",
                           f"+49-30-{rng.randrange(100000, 999999)}"])

    alphanumeric = string.ascii_letters + string.digits

    def prefixed_key() -> tuple[str, str]:
        key = rng.choice(["AKIA" + word(16, string.ascii_uppercase + string.digits), "ghp_" + word(36, alphanumeric),
                          "AIza" + word(35, alphanumeric + "-_"), "sk-" + word(48, alphanumeric)])
        return key, key

    def key_in_context() -> tuple[str, str]:
        aws = word(40, alphanumeric + "/+")
        password = word(10, alphanumeric) + rng.choice("0123456789") + rng.choice("!#%&*-_")
        form = rng.choice([
            f'AWS_SECRET_ACCESS_KEY = "{aws}"', f"export AWS_SECRET_ACCESS_KEY={aws}", f"aws_secret_access_key = {aws}",
            f'"SecretAccessKey": "{aws}"', f"AKIA{word(16, string.ascii_uppercase + string.digits)},{aws}",
            f"aws configure set aws_secret_access_key {aws}", f"password = '{password}'", f"DB_PASSWORD={password}",
            f"api_token: {word(32, alphanumeric)}0", f'client_secret="{word(24, alphanumeric)}9"',
        ])
        return form, form.rsplit("=", 1)[-1].rsplit(" ", 1)[-1].rsplit(",", 1)[-1].strip("'\"")

    def as_is(value: str) -> tuple[str, str]:
        return value, value

    return {
        "email": [as_is(f"{word(rng.randrange(3, 10))}.{word(5)}@{word(6)}.{rng.choice(['com', 'org', 'co.uk', 'io'])}")
                  for _ in range(SAMPLE_PER_KIND)],
        "phone": [as_is(phone()) for _ in range(SAMPLE_PER_KIND)],
        "ip_address": [as_is(".".join(str(rng.randrange(10, 256)) for _ in range(2)) + "."
                             + ".".join(str(rng.randrange(256)) for _ in range(2))) for _ in range(SAMPLE_PER_KIND)],
        "credit_card": [as_is(card()) for _ in range(SAMPLE_PER_KIND)],
        "secret": [prefixed_key() for _ in range(SAMPLE_PER_KIND // 2)]
        + [key_in_context() for _ in range(SAMPLE_PER_KIND - SAMPLE_PER_KIND // 2)],
    }


def _look_alikes(text: str) -> tuple[list[str], int]:
    """The standard library's look-alikes, and how many dotted quads of 0-255 were left out: by
    their shape those are IP addresses (masks, network and documentation addresses), not
    look-alikes, unless the library names them as a version."""
    versions = set(re.findall(r"""__version__\s*=\s*['"]([^'"]+)['"]""", text))
    patterns = [r"\b(0[xX][0-9a-fA-F]+)\b", r"\b(\d+\.\d+(?:[eE][-+]?\d+)?)\b", r"\b(\d{4}-\d{2}-\d{2})\b",
                r"\b(\d+(?:\.\d+){2,})\b"]
    found = {value for pattern in patterns for value in re.findall(pattern, text)}
    quads = {value for value in found if re.fullmatch(r"(?:\d{1,3}\.){3}\d{1,3}", value)
             and all(int(part) <= 255 for part in value.split("."))} - versions
    return sorted(versions | found - quads), len(quads)


def precision(texts: list[str]) -> None:
    rng = random.Random(0)
    lines = [line for text in texts[:200] for line in text.splitlines() if 20 < len(line) < 100 and "@" not in line]
    sample = [(kind, value, secret) for kind, values in _positives(rng).items() for value, secret in values]
    negatives, quads = _look_alikes("\n".join(texts))
    false_positives, found = Counter(), Counter()
    for kind, value, secret in sample:
        line = rng.choice(lines)
        cut = rng.randrange(len(line))
        redacted, counts = redact(f"{line[:cut]} {value} {line[cut:]}")
        found[kind] += counts[kind] >= 1 and REPLACEMENTS[kind] in redacted and secret not in redacted
    for value in negatives:
        line = rng.choice(lines)
        redacted, counts = redact(f"{line} # {value}")
        false_positives.update(counts)
    print(f"3. labelled sample: {len(sample):,} values of 5 kinds set into standard-library lines, and "
          f"{len(negatives):,} look-alikes (version strings, hex constants, floats, dates, dotted numbers of the "
          f"standard library) that must stay ({quads} dotted quads of 0-255 left out: by shape, IP addresses)")
    for kind in REDACTION_KINDS:
        if kind == "private_key":
            continue
        total = SAMPLE_PER_KIND
        print(f"   {kind:12s} recall {found[kind] / total:6.1%}  false positives on the look-alikes: "
              f"{false_positives[kind]}")
    assignments = _secret_assignments(texts)
    taken = [line for line in assignments if redact(line)[1]["secret"]]
    print(f"   {len(assignments):,} standard-library lines assign to a name ending in secret, token, password, key, "
          f"...; {len(taken)} redacted:")
    for line in taken:
        print(f"     {line}")


def _secret_assignments(texts: list[str]) -> list[str]:
    """The lines that assign to a name a secret could have: as many chances for a false positive."""
    assignment = re.compile(r"(?i)(?:secret|token|passw(?:or)?d|pwd|key)\w*[\"']?\s*(?:=(?!=)|:)")
    return [line.strip() for text in texts for line in text.splitlines() if assignment.search(line)]


def main() -> None:
    texts = [text for source in resolve_sources([BUILTIN_CORPUS]).files
             for text in read_documents(source, "text", SkipReport())]
    throughput(texts)
    ingest_cost()
    precision(texts)


if __name__ == "__main__":
    main()
