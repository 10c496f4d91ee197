"""The built-in fine-tuning demo: functions extracted with ast, docstrings moved into prompts,
balanced package labels."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from gptflow.data.finetune_demo import (
    CLASSIFICATION_PACKAGES,
    classification_records,
    functions_of,
    sft_records,
    write_demo,
)

MODULE = textwrap.dedent('''\
    """A module."""
    import os


    def documented(path, mode="r"):
        """Open a file.

        Longer explanation.
        """
        return open(path, mode)


    @decorator
    def undocumented():
        return 1


    class Reader:
        def read(self):
            """Read it all."""
            data = self.stream.read()
            return data

        def only_docstring(self):
            """Nothing else."""

        def outer(self):
            def inner():
                """Nested: not extracted on its own."""
            return inner
    ''')


def _package(root: Path, name: str, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = root / name / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_functions_are_extracted_with_and_without_their_docstrings(tmp_path):
    _package(tmp_path, "email", {"__init__.py": MODULE, "tests/test_x.py": MODULE, "broken.py": "def (:\n"})
    functions = {function.name: function for function in functions_of(tmp_path, "email")}
    assert set(functions) == {"documented", "undocumented", "Reader.read", "Reader.only_docstring", "Reader.outer"}
    documented = functions["documented"]
    assert documented.module == "email" and documented.location == "email/__init__.py:5"
    assert documented.docstring.startswith("Open a file.")
    assert documented.body_without_docstring == 'def documented(path, mode="r"):\n    return open(path, mode)'
    assert functions["undocumented"].source == "def undocumented():\n    return 1"  # decorators left out
    read = functions["Reader.read"]
    assert read.body_without_docstring == "def read(self):\n    data = self.stream.read()\n    return data"
    assert functions["Reader.only_docstring"].body_without_docstring == ""


def test_sft_records_pair_a_docstring_summary_with_the_function(tmp_path):
    _package(tmp_path, "json", {"decoder.py": MODULE})
    records = sft_records(tmp_path)
    assert [record["response"].split("(")[0] for record in records] == ["def documented", "def read"]
    assert records[0]["prompt"] == ("Write the function `documented` of Python's `json.decoder` module. "
                                    "Its docstring: Open a file.")


def test_classification_records_are_balanced_across_packages(tmp_path):
    for index, package in enumerate(CLASSIFICATION_PACKAGES):
        # Unequal sizes: the larger packages are thinned to the smallest one's count.
        _package(tmp_path, package, {f"m{copy}.py": MODULE for copy in range(index + 1)})
    records = classification_records(tmp_path)
    counts = {package: sum(record["label"] == package for record in records) for package in CLASSIFICATION_PACKAGES}
    assert set(counts.values()) == {5}
    assert records == classification_records(tmp_path)  # deterministic
    assert [record["label"] for record in records[:5]] != [CLASSIFICATION_PACKAGES[0]] * 5  # interleaved

    out = tmp_path / "demo.jsonl"
    assert write_demo("classification", out, root=tmp_path) == len(records)
    assert [json.loads(line) for line in out.read_text().splitlines()] == records
