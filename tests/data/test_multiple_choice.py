"""HellaSwag-format files: both field layouts, lm-evaluation-harness's context/ending split, and
errors that name the line and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptflow.data.multiple_choice import MultipleChoiceError, encode_example, read_multiple_choice
from gptflow.data.tokenizer import load_tokenizer

SAMPLE = Path(__file__).resolve().parents[1] / "fixtures" / "hellaswag_sample.jsonl"
GOOD = {"ctx": "The cat sat on the", "endings": ["mat.", "moon."], "label": 0}


def write_lines(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_sample_file_reads_both_layouts_as_lm_evaluation_harness_builds_them():
    examples = read_multiple_choice(SAMPLE)
    assert len(examples) == 8
    assert examples[0].context == "import os\nimport" and examples[0].endings[0] == " sys"
    assert examples[0].location == f"{SAMPLE}:1"
    # activity_label + ": " + ctx_a + " " + ctx_b.capitalize(), as lm-eval's hellaswag task does.
    assert examples[6].context.startswith("Removing ice from car: Then, the man writes")
    assert examples[6].context.endswith("smiles. Then") and examples[6].label == 3
    # WikiHow markup dropped, and the Hugging Face copy's string label read as an index.
    assert examples[7].context == "Home and Garden: How to water a plant. Check the soil. push a finger"
    assert examples[7].label == 0 and "[" not in "".join(examples[7].endings)


def test_bad_records_are_listed_with_their_line_and_what_is_wrong(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [
        GOOD,
        "{not json",
        {"context": "x", "endings": ["a", "b"], "label": 0},
        {**GOOD, "label": 2},
        {**GOOD, "label": ""},
        {**GOOD, "endings": ["only one"]},
    ])
    with pytest.raises(MultipleChoiceError) as raised:
        read_multiple_choice(path)
    message = str(raised.value)
    assert message.startswith(f"5 of the records in {path} cannot be scored")
    assert f"{path}:2: invalid JSON" in message
    assert f"{path}:3: no 'ctx' field (it has 'context', 'endings', 'label')" in message
    assert f"{path}:4: label 2 is out of range for 2 endings (labels count from 0, so 0..1)" in message
    assert f"{path}:5: 'label' must be the index of the right ending, got ''" in message
    assert "HellaSwag's test split has no labels" in message
    assert f"{path}:6: 'endings' must be a list of at least two non-empty strings" in message
    assert "Expected one record per example, e.g. a JSONL line {\"ctx\"" in message


def test_many_bad_records_list_the_first_few(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ["[]"] * 9)
    message = str(pytest.raises(MultipleChoiceError, read_multiple_choice, path).value)
    assert message.startswith("9 of the records") and f"{path}:5:" in message and f"{path}:6:" not in message


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "does not exist"), ("\n\n", "holds no records"), (b"\xff\xfe{", "invalid UTF-8")],
)
def test_unusable_files_say_why(tmp_path, content, message):
    path = tmp_path / "choices.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(MultipleChoiceError, match=message):
        read_multiple_choice(path)


def test_endings_are_the_tokens_after_the_context_in_the_whole_text(tiny_tokenizer, tmp_path):
    tokenizer = load_tokenizer(tiny_tokenizer)
    record = {"ctx": "def parse(text): ", "endings": ["return text", "pass"], "label": 0}
    path = write_lines(tmp_path / "c.jsonl", [record])
    [example] = read_multiple_choice(path)
    encoded = encode_example(tokenizer, example, start_id=tiny_tokenizer.eot_id)
    assert encoded.context_ids[0] == tiny_tokenizer.eot_id
    assert encoded.context_ids[1:] == tokenizer.encode("def parse(text):").ids  # its trailing space moved on
    for ending, ids in zip(example.endings, encoded.ending_ids):
        whole = tokenizer.encode("def parse(text):  " + ending).ids  # context space + delimiter
        assert encoded.context_ids[1:] + ids == whole
        assert tokenizer.decode(ids) == "  " + ending
