"""Fine-tuning data: the chat template's trained mask, the formats, bad records (skipped and
counted with file:line, or one clear error), over-long examples and the Arrow round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptflow.data.chat import ChatTemplate, Message
from gptflow.data.finetune_data import (
    SKIP_PROMPT_FILLS_MAX_LENGTH,
    SKIP_TOO_LONG,
    SKIP_UNKNOWN_LABEL,
    SKIP_UNSEEN_LABEL,
    prepare_examples,
    prepare_labelled,
    read_split,
)
from gptflow.data.finetune_inputs import FinetuneDataError, check_data_file
from gptflow.data.finetune_records import (
    SKIP_EMPTY_RESPONSE,
    SKIP_MALFORMED_MESSAGES,
    SKIP_MISSING_FIELDS,
    SKIP_NOT_AN_OBJECT,
)
from gptflow.data.readers import SKIP_INVALID_JSON, SKIP_INVALID_UTF8
from gptflow.data.tokenizer import load_tokenizer


def _jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _pairs(count: int, prefix: str = "q") -> list[dict[str, str]]:
    return [{"prompt": f"{prefix} {index}: what is {index} + 1?", "response": f"It is {index + 1}."}
            for index in range(count)]


def _prepare(task: str, train: Path, tokenizer, tmp_path: Path, val: Path | None = None, **settings):
    options = {"max_length": 256, "overlong": "truncate", "val_fraction": 0.25, **settings}
    return prepare_examples(task, train, val, Path(tokenizer.path), tmp_path / "prepared", **options)


def test_chat_template_trains_on_assistant_content_and_end_token_only(tiny_tokenizer):
    tokenizer = load_tokenizer(tiny_tokenizer)
    template = ChatTemplate()
    messages = [Message("system", "Be brief."), Message("user", "def parse("), Message("assistant", "text):\n    pass"),
                Message("user", "again"), Message("assistant", "ok")]
    ids, trained = template.encode(tokenizer, messages)
    assert ids[0] == tiny_tokenizer.eot_id and len(ids) == len(trained)
    trained_ids = [token for token, is_trained in zip(ids, trained) if is_trained]
    assert tokenizer.decode(trained_ids, skip_special_tokens=False) == "text):\n    pass<|endoftext|>ok<|endoftext|>"
    prompt, _ = template.encode(tokenizer, messages[:2], add_generation_prompt=True)
    assert ids[: len(prompt)] == prompt
    assert tokenizer.decode(prompt).endswith("### User:\ndef parse(\n\n### Assistant:\n")


def test_template_round_trips_through_its_json_file(tmp_path):
    template = ChatTemplate(headers={"system": "S: ", "user": "U: ", "assistant": "A: "}, separator="\n")
    assert ChatTemplate.load(template.save(tmp_path)) == template
    assert ChatTemplate.load(tmp_path) == template


def test_pairs_and_chats_prepare_into_arrow_with_response_masks(tiny_tokenizer, tmp_path):
    chats = [{"messages": [{"role": "user", "content": f"hi {index}"}, {"role": "assistant", "content": "hello"}]}
             for index in range(20)]
    data = _jsonl(tmp_path / "sft.jsonl", [*_pairs(20), *chats])
    prepared = _prepare("sft", data, tiny_tokenizer, tmp_path)
    assert prepared.examples["train"] + prepared.examples["val"] == 40
    assert prepared.examples["val"] > 0 and prepared.skip_report().total == 0
    train = read_split(Path(prepared.directory), "train")
    assert len(train.input_ids) == prepared.examples["train"] == len(train.locations)
    assert all(len(ids) == len(mask) and mask.any() and not mask[0] for ids, mask in zip(train.input_ids, train.loss_mask))
    assert prepared.trained_tokens["train"] == sum(int(mask[1:].sum()) for mask in train.loss_mask)
    assert train.locations[0].startswith(f"{data}:")
    # The split follows each record's content: appending records moves none of the old ones.
    grown = _jsonl(tmp_path / "grown.jsonl", [*_pairs(20), *chats, *_pairs(10, prefix="new")])
    regrown = _prepare("sft", grown, tiny_tokenizer, tmp_path / "again")
    old_val = {location.rsplit(":", 1)[1] for location in read_split(Path(prepared.directory), "val").locations}
    new_val = {location.rsplit(":", 1)[1] for location in read_split(Path(regrown.directory), "val").locations}
    assert old_val == {line for line in new_val if int(line) <= 40}


def test_bad_sft_records_are_skipped_and_counted_with_their_lines(tiny_tokenizer, tmp_path):
    data = _jsonl(tmp_path / "sft.jsonl", [
        *_pairs(12),
        {"prompt": "empty", "response": "   "},                                   # line 13
        "{not json",                                                              # line 14
        ["a", "list"],                                                            # line 15
        {"question": "?", "answer": "!"},                                         # line 16
        {"messages": [{"role": "robot", "content": "beep"}]},                     # line 17
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},  # line 18
    ])
    prepared = _prepare("sft", data, tiny_tokenizer, tmp_path)
    skips = prepared.skip_report()
    assert skips.counts == {SKIP_EMPTY_RESPONSE: 2, SKIP_INVALID_JSON: 1, SKIP_NOT_AN_OBJECT: 1,
                            SKIP_MISSING_FIELDS: 1, SKIP_MALFORMED_MESSAGES: 1}
    assert skips.examples[SKIP_EMPTY_RESPONSE] == [f"{data}:13", f"{data}:18"]
    assert skips.examples[SKIP_INVALID_JSON] == [f"{data}:14"]
    assert prepared.examples["train"] + prepared.examples["val"] == 12


def test_a_file_without_the_fields_is_one_error_naming_the_fields_it_has(tiny_tokenizer, tmp_path):
    data = _jsonl(tmp_path / "qa.jsonl", [{"question": "?", "answer": "!"}] * 5)
    with pytest.raises(FinetuneDataError, match="expected .*prompt.*'answer', 'question'"):
        _prepare("sft", data, tiny_tokenizer, tmp_path)
    assert not (tmp_path / "prepared").exists()


def test_over_long_examples_are_truncated_or_skipped_and_counted(tiny_tokenizer, tmp_path):
    long_answer = {"prompt": "count", "response": " ".join(str(number) for number in range(200))}
    long_prompt = {"prompt": " ".join(str(number) for number in range(200)), "response": "done"}
    data = _jsonl(tmp_path / "sft.jsonl", [*_pairs(16), long_answer, long_prompt])
    truncated = _prepare("sft", data, tiny_tokenizer, tmp_path, max_length=64)
    assert sum(truncated.truncated.values()) == 1
    assert truncated.skip_report().counts == {SKIP_PROMPT_FILLS_MAX_LENGTH: 1}
    for split in ("train", "val"):
        assert all(len(ids) <= 64 for ids in read_split(Path(truncated.directory), split).input_ids)
    skipped = _prepare("sft", data, tiny_tokenizer, tmp_path / "skip", max_length=64, overlong="skip")
    assert sum(skipped.truncated.values()) == 0
    assert skipped.skip_report().counts == {SKIP_TOO_LONG: 2}
    with pytest.raises(FinetuneDataError, match="fits max_length=4 tokens"):
        _prepare("sft", data, tiny_tokenizer, tmp_path / "tiny", max_length=4, overlong="skip")
    assert not list((tmp_path / "tiny").glob("*prepared*"))  # not even a half-written directory


def test_a_labelled_file_for_a_trained_classifier_keeps_its_label_order_and_cut(tiny_tokenizer, tmp_path):
    data = _jsonl(tmp_path / "labelled.jsonl", [
        {"body": "def f(x):\n    return x", "kind": "code"}, {"body": "hello there, how are you today", "kind": "prose"},
        {"body": "hi", "kind": "greeting"}, {"body": "", "kind": "code"}, {"body": "import os", "kind": "code"},
    ])
    prepared = prepare_labelled(data, Path(tiny_tokenizer.path), tmp_path / "eval", labels=["prose", "code"],
                                max_length=4, text_field="body", label_field="kind")
    # The classifier's class order, not the file's sorted labels; every record in the one split.
    assert prepared.labels == ["prose", "code"] and prepared.examples == {"eval": 3}
    assert prepared.label_counts == {"eval": {"code": 2, "prose": 1}}
    split = read_split(Path(prepared.directory), "eval")
    assert split.labels.tolist() == [1, 0, 1]
    assert all(len(ids) <= 4 for ids in split.input_ids) and prepared.truncated["eval"] >= 1
    skips = prepared.skip_report()
    assert skips.examples[SKIP_UNKNOWN_LABEL] == [f"{data}:3 ('greeting')"] and skips.counts["empty text"] == 1

    with pytest.raises(FinetuneDataError, match="whose labels are poem, song"):
        prepare_labelled(data, Path(tiny_tokenizer.path), tmp_path / "none", labels=["poem", "song"],
                         max_length=4, text_field="body", label_field="kind")
    with pytest.raises(FinetuneDataError, match="expected fields 'body' and 'label'; its records have 'body', 'kind'"):
        prepare_labelled(data, Path(tiny_tokenizer.path), tmp_path / "none", labels=["prose", "code"],
                         max_length=4, text_field="body", label_field="label")
    assert not (tmp_path / "none").exists()


def test_classification_csv_with_a_val_file_skips_labels_train_lacks(tiny_tokenizer, tmp_path):
    train = tmp_path / "train.csv"
    train.write_text('text,label\n"def f(x):\n    return x",code\nhello there,prose\nclass A: pass,code\n,prose\n'
                     "good morning,prose\n")
    val = tmp_path / "val.csv"
    val.write_text("text,label\nimport os,code\nhi,greeting\nsee you,prose\n")
    prepared = _prepare("classification", train, tiny_tokenizer, tmp_path, val=val, max_length=8)
    assert prepared.labels == ["code", "prose"]
    assert prepared.examples == {"train": 4, "val": 2}
    assert prepared.label_counts == {"train": {"code": 2, "prose": 2}, "val": {"code": 1, "prose": 1}}
    skips = prepared.skip_report()
    assert skips.examples[SKIP_UNSEEN_LABEL] == [f"{val}:3 ('greeting')"]
    assert skips.counts["empty text"] == 1 and skips.examples["empty text"] == [f"{train}:6"]
    split = read_split(Path(prepared.directory), "train")
    assert split.labels.tolist() == [0, 1, 0, 1]
    assert split.locations[:2] == [f"{train}:2", f"{train}:4"]  # a quoted text may span lines
    assert all(ids[0] == tiny_tokenizer.eot_id and len(ids) <= 8 for ids in split.input_ids)


def test_a_bad_csv_row_is_skipped_and_located_as_in_pretraining_and_parquet_reads_too(tiny_tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [(f"text number {index}", "ab"[index % 2]) for index in range(12)]
    train = tmp_path / "train.csv"
    train.write_bytes(b"text,label\n" + b"".join(f"{text},{label}\n".encode() for text, label in rows[:6])
                      + b"caf\xe9 latin-1,a\n" + b"".join(f"{text},{label}\n".encode() for text, label in rows[6:]))
    prepared = _prepare("classification", train, tiny_tokenizer, tmp_path, val_fraction=0.3)
    assert sum(prepared.examples.values()) == 12
    assert prepared.skip_report().examples == {SKIP_INVALID_UTF8: [f"{train}:8"]}

    table = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": [text for text, _ in rows], "label": [label for _, label in rows]}), table)
    from_parquet = _prepare("classification", table, tiny_tokenizer, tmp_path / "parquet", val_fraction=0.3)
    assert from_parquet.examples == prepared.examples and from_parquet.labels == ["a", "b"]


def test_classification_needs_two_labels_and_named_fields(tiny_tokenizer, tmp_path):
    one_label = _jsonl(tmp_path / "one.jsonl", [{"text": f"text {index}", "label": "a"} for index in range(8)])
    with pytest.raises(FinetuneDataError, match="at least two"):
        _prepare("classification", one_label, tiny_tokenizer, tmp_path)
    other_fields = _jsonl(tmp_path / "fields.jsonl", [{"body": f"text {index}", "tag": index % 2} for index in range(8)])
    prepared = _prepare("classification", other_fields, tiny_tokenizer, tmp_path, text_field="body", label_field="tag")
    assert prepared.labels == ["0", "1"]


@pytest.mark.parametrize(("name", "message"), [("missing.jsonl", "does not exist"), ("data.txt", "must be .jsonl, .json, .csv")])
def test_unusable_files_are_named(tmp_path, name, message):
    if name == "data.txt":
        (tmp_path / name).write_text("text")
    with pytest.raises(FinetuneDataError, match=message):
        check_data_file(tmp_path / name)
