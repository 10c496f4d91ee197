"""Tagging data: spans checked, CoNLL schemes read, tags on BPE tokens and back, entity-level
scores, prepared examples with bad records skipped by file:line, and the tokenize demo."""

from __future__ import annotations

import gzip
import json
import tokenize
from pathlib import Path

import pytest

from gptflow.data.finetune_data import (
    SKIP_UNKNOWN_SPAN_LABEL,
    SKIP_UNSEEN_SPAN_LABEL,
    prepare_examples,
    prepare_labelled,
    read_split,
)
from gptflow.data.finetune_demo import TAG_KINDS, python_token_spans, tagging_records
from gptflow.data.finetune_inputs import FinetuneDataError, check_data_file
from gptflow.data.readers import SKIP_INVALID_UTF8
from gptflow.data.sources import builtin_corpus_root
from gptflow.data.tagging import (
    NOT_SCORED,
    SKIP_MALFORMED_SPANS,
    SKIP_OVERLAPPING_SPANS,
    SKIP_SPAN_OUTSIDE_TEXT,
    SKIP_UNKNOWN_TAG_SCHEME,
    Span,
    SpanError,
    align,
    char_span,
    conll_spans,
    parse_spans,
    span_scores,
    spans_of_tags,
    tag_names,
    tags_of,
)
from gptflow.data.tokenizer import load_tokenizer


def test_spans_are_checked_and_sorted():
    text = "def f(x): return x"
    assert parse_spans([[4, 5, "name"], {"start": 0, "end": 3, "label": "keyword"}], text) == [
        Span(0, 3, "keyword"), Span(4, 5, "name")]
    assert parse_spans([], text) == []
    assert parse_spans('[[4, 5, "name"]]', text) == [Span(4, 5, "name")]  # a CSV cell holds JSON text
    for spans, reason in [
        ([[0, 3]], SKIP_MALFORMED_SPANS), ([[0, 3, ""]], SKIP_MALFORMED_SPANS), ([[0.0, 3, "a"]], SKIP_MALFORMED_SPANS),
        ([[True, 3, "a"]], SKIP_MALFORMED_SPANS), ("0 3 a", SKIP_MALFORMED_SPANS),
        ([[0, 99, "a"]], SKIP_SPAN_OUTSIDE_TEXT), ([[-1, 2, "a"]], SKIP_SPAN_OUTSIDE_TEXT),
        ([[3, 3, "a"]], SKIP_SPAN_OUTSIDE_TEXT),
        ([[0, 5, "a"], [4, 6, "b"]], SKIP_OVERLAPPING_SPANS),
    ]:
        with pytest.raises(SpanError) as raised:
            parse_spans(spans, text)
        assert raised.value.reason == reason, spans


@pytest.mark.parametrize("tags", [
    ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "O"],  # IOB2
    ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "O"],  # IOB1: B- only between two spans of one label
    ["B-PER", "E-PER", "O", "S-LOC", "S-LOC", "O"],  # IOBES
    ["B-PER", "L-PER", "O", "U-LOC", "U-LOC", "O"],  # BILOU
])
def test_conll_schemes_read_to_the_same_spans(tags):
    text, spans = conll_spans(["Ada", "Lovelace", "met", "Paris", "London", "today"], tags)
    assert text == "Ada Lovelace met Paris London today"
    assert [(text[span.start:span.end], span.label) for span in spans] == [
        ("Ada Lovelace", "PER"), ("Paris", "LOC"), ("London", "LOC")]


@pytest.mark.parametrize("tag", ["PER", "X-PER", "B-", "", "b-PER"])
def test_a_conll_tag_of_no_scheme_names_its_word(tag):
    with pytest.raises(SpanError) as raised:
        conll_spans(["a", "b"], ["O", tag])
    assert raised.value.reason == SKIP_UNKNOWN_TAG_SCHEME and raised.value.word == 1


@pytest.mark.parametrize("span_label_from", ["each_token", "last_token"])
def test_tags_round_trip_including_adjacent_and_one_token_spans(span_label_from):
    spans = [(0, 2, "a"), (2, 3, "a"), (4, 7, "b"), (7, 8, "a")]
    tags = tags_of(spans, 9, span_label_from)
    assert set(tags) <= set(tag_names(["a", "b"], span_label_from))
    assert spans_of_tags(tags, span_label_from) == spans


def test_each_token_reads_iob2_as_seqeval_does():
    # An I- that continues nothing opens a span; a label change closes one.
    assert spans_of_tags(["I-a", "I-a", "I-b", "O", "B-a", "I-b"], "each_token") == [
        (0, 2, "a"), (2, 3, "b"), (4, 5, "a"), (5, 6, "b")]


def test_last_token_keeps_only_runs_an_end_tag_labels():
    tags = ["B", "I", "O", "B", "I", "E-x", "S-y", "I", "E-z", "B"]
    # The first run never ends in E-: no span; "I" with no open run opens one.
    assert spans_of_tags(tags, "last_token") == [(3, 6, "x"), (6, 7, "y"), (7, 9, "z")]
    assert tag_names(["x"], "last_token") == ["O", "B", "I", "E-x", "S-x"]


def test_entity_scores_count_exact_spans_only():
    gold = [[(0, 2, "a"), (3, 4, "b")], [(1, 3, "a")]]
    predicted = [[(0, 2, "a"), (3, 5, "b")], [(1, 3, "b")]]
    scores = span_scores(gold, predicted, ["a", "b"])
    assert (scores.gold, scores.predicted, scores.correct) == (3, 3, 1)
    assert scores.precision == scores.recall == scores.f1 == pytest.approx(1 / 3)
    assert scores.per_label["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert scores.per_label["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_alignment_to_bpe_tokens_by_character_offsets(tiny_tokenizer):
    tokenizer = load_tokenizer(Path(tiny_tokenizer.path))
    text = 'def f(x):\n    return x + 0x1F  # hi\ny = ""\n'
    spans = parse_spans(python_token_spans(text), text)
    encoding = tokenizer.encode(text, add_special_tokens=False)
    aligned = align(text, encoding.offsets, spans)
    assert aligned.lost == 0 and len(aligned.token_spans) == len(spans)
    for (first, end, label), span in zip(aligned.token_spans, spans):
        assert label == span.label
        # A token carries the space before its word: the span's text starts after it.
        covered = text[encoding.offsets[first][0]:encoding.offsets[end - 1][1]]
        assert covered.strip() == text[span.start:span.end] or aligned.misaligned
    # A span whose edge falls inside a token is trained at the token's edges, and counted.
    text = "x=y+1"
    offsets = [(0, 1), (1, 3), (3, 5)]  # "x", "=y", "+1"
    aligned = align(text, offsets, [Span(0, 1, "name"), Span(2, 3, "name"), Span(4, 5, "number")])
    assert aligned.token_spans == [(0, 1, "name"), (1, 2, "name"), (2, 3, "number")] and aligned.misaligned == 2


def test_the_demo_tags_python_tokens_by_kind():
    source = 'def area(r):  # circle\n    return 3.14 * r ** 2 if r else "none"\n'
    spans = python_token_spans(source)
    assert [(source[start:end], kind) for start, end, kind in spans] == [
        ("def", "keyword"), ("area", "name"), ("r", "name"), ("# circle", "comment"), ("return", "keyword"),
        ("3.14", "number"), ("r", "name"), ("2", "number"), ("if", "keyword"), ("r", "name"), ("else", "keyword"),
        ('"none"', "string")]
    records = tagging_records(builtin_corpus_root(), count=50)
    assert len(records) == 50
    kinds = {span[2] for record in records for span in record["spans"]}
    assert kinds == set(TAG_KINDS)
    for record in records[:10]:  # every span is a real token of its text
        tokens = {(token.string, tokenize.tok_name[token.type]) for token in
                  tokenize.generate_tokens(iter(record["text"].splitlines(keepends=True)).__next__)}
        for start, end, _ in record["spans"]:
            assert any(string == record["text"][start:end] for string, _ in tokens)


def _write(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def _records(count: int) -> list[dict[str, object]]:
    records = []
    for index in range(count):
        text = f"def f{index}(x):\n    return x + {index}\n"
        records.append({"text": text, "spans": python_token_spans(text)})
    return records


@pytest.mark.parametrize("span_label_from", ["each_token", "last_token"])
def test_tagging_records_prepare_into_arrow_with_token_tags(tiny_tokenizer, tmp_path, span_label_from):
    train = _write(tmp_path / "train.jsonl", _records(30))
    prepared = prepare_examples("tagging", train, None, Path(tiny_tokenizer.path), tmp_path / "prepared",
                                max_length=64, overlong="truncate", val_fraction=0.25, span_label_from=span_label_from)
    assert prepared.labels == ["keyword", "name", "number"]
    assert prepared.tags == tag_names(prepared.labels, span_label_from)
    assert sum(prepared.examples.values()) == 30 and prepared.spans["train"]["lost"] == 0
    split = read_split(Path(prepared.directory), "train")
    tags, offsets = split.tags[0], split.offsets[0]
    assert tags[0] == NOT_SCORED and len(tags) == len(split.input_ids[0]) == len(offsets)
    names = [prepared.tags[tag] if tag != NOT_SCORED else "O" for tag in tags]
    text = split.texts[0]
    spans = [text[offsets[first][0]:offsets[end - 1][1]].strip() for first, end, _ in spans_of_tags(names, span_label_from)]
    assert spans[:4] == ["def", split.texts[0].split("(")[0].removeprefix("def "), "x", "return"]
    assert prepared.trained_tokens["train"] == sum(int((tags >= 0).sum()) for tags in split.tags)


def test_bad_tagging_records_are_counted_with_their_lines(tiny_tokenizer, tmp_path):
    good = _records(20)
    lines = [*good[:10], {"text": "abc", "spans": [[0, 9, "name"]]}, {"text": "abc", "spans": [[0, 2, "a"], [1, 3, "b"]]},
             {"text": "abc", "spans": "0-3"}, {"text": "abc"}, *good[10:]]
    train = _write(tmp_path / "train.jsonl", lines)
    val = _write(tmp_path / "val.jsonl", [good[0], {"text": "pass  # x\n", "spans": [[0, 4, "keyword"], [6, 9, "comment"]]}])
    prepared = prepare_examples("tagging", train, val, Path(tiny_tokenizer.path), tmp_path / "prepared",
                                max_length=64, overlong="truncate", val_fraction=0.1)
    skips = prepared.skip_report()
    assert skips.counts == {SKIP_SPAN_OUTSIDE_TEXT: 1, SKIP_OVERLAPPING_SPANS: 1, SKIP_MALFORMED_SPANS: 1,
                            "record without the expected fields": 1, SKIP_UNSEEN_SPAN_LABEL: 1}
    assert skips.examples[SKIP_SPAN_OUTSIDE_TEXT] == [f"{train}:11 ([0, 9) of a text of 3 characters)"]
    assert skips.examples[SKIP_UNSEEN_SPAN_LABEL] == [f"{val}:2 ('comment')"]
    assert prepared.examples == {"train": 20, "val": 1}


def test_a_span_cut_by_max_length_is_left_out_of_the_loss(tiny_tokenizer, tmp_path):
    tokenizer = load_tokenizer(Path(tiny_tokenizer.path))
    text = "x = 1\ny = averyveryverylongidentifiername_with_parts + 2\n"
    spans = python_token_spans(text)
    aligned = align(text, tokenizer.encode(text, add_special_tokens=False).offsets, parse_spans(spans, text))
    first, end, _ = aligned.token_spans[3]  # the long name
    assert end - first > 3
    cut = first + 1 + 2  # the start token, then two tokens of the name
    records = [{"text": text, "spans": spans}] * 4
    prepared = prepare_examples("tagging", _write(tmp_path / "t.jsonl", records), _write(tmp_path / "v.jsonl", records),
                                Path(tiny_tokenizer.path), tmp_path / "prepared", max_length=cut,
                                overlong="truncate", val_fraction=0.1)
    assert prepared.truncated == {"train": 4, "val": 4}
    # Five spans a record (x, 1, y, the name, 2); the name and the 2 are cut.
    assert prepared.spans["val"] == {"total": 20, "misaligned": 0, "lost": 0, "truncated": 8}
    tags = read_split(Path(prepared.directory), "val").tags[0]
    assert len(tags) == cut and tags[0] == NOT_SCORED
    # Half a span is no span: its tokens are neither tagged as it nor as outside it.
    assert (tags[first + 1:] == NOT_SCORED).all() and (tags[1:first + 1] != NOT_SCORED).all()


def test_nothing_usable_is_one_error(tiny_tokenizer, tmp_path):
    train = _write(tmp_path / "train.jsonl", [{"text": f"abc {index}", "spans": []} for index in range(20)])
    with pytest.raises(FinetuneDataError, match="has no span: tagging needs texts with labelled spans"):
        prepare_examples("tagging", train, None, Path(tiny_tokenizer.path), tmp_path / "p", max_length=16,
                         overlong="truncate", val_fraction=0.5)
    wrong_fields = _write(tmp_path / "wrong.jsonl", [{"sentence": f"abc {index}", "labels": []} for index in range(20)])
    with pytest.raises(FinetuneDataError, match="expected fields 'text' and 'spans'; its records have 'labels', 'sentence'"):
        prepare_examples("tagging", wrong_fields, None, Path(tiny_tokenizer.path), tmp_path / "p", max_length=16,
                         overlong="truncate", val_fraction=0.5)


def test_conll_files_read_by_sentence_with_bad_tags_and_bytes_skipped_by_line(tiny_tokenizer, tmp_path):
    sentences = ["-DOCSTART- -X- O O", ""]
    for index in range(12):
        sentences += ["Ada NNP B-PER", "visited VBD O", f"Paris{index} NNP B-LOC", ""]
    sentences += ["Bob PER", "left O", ""]  # a tag of no scheme, on the file's line 51
    path = tmp_path / "ner.conll.gz"
    data = "\n".join(sentences).encode() + b"\nCaf\xe9 B-LOC\n\nEve B-PER\n"  # not UTF-8 on line 54
    path.write_bytes(gzip.compress(data))
    assert check_data_file(path).format == "conll"
    prepared = prepare_labelled(path, Path(tiny_tokenizer.path), tmp_path / "eval", objective="tagging",
                                labels=["PER"], max_length=32, span_label_from="each_token")
    skips = prepared.skip_report()
    assert skips.examples[SKIP_UNKNOWN_TAG_SCHEME] == [f"{path}:51 ('PER')"]
    assert skips.examples[SKIP_INVALID_UTF8] == [f"{path}:54 (byte 3)"]
    # The tagger knows PER only: sentences with a LOC span cannot be scored.
    assert skips.counts[SKIP_UNKNOWN_SPAN_LABEL] == 12 and prepared.examples == {"eval": 1}
    split = read_split(Path(prepared.directory), "eval")
    assert split.texts == ["Eve"] and split.locations == [f"{path}:56"]


def test_the_head_tags_follow_the_setting_and_a_bad_setting_is_refused():
    from gptflow.model.finetune_config import FinetuneConfig
    from gptflow.tasks.settings import FinetuneSettings

    tagging = FinetuneSettings(finetune=FinetuneConfig(span_label_from="last_token"))
    assert tagging.data_settings("tagging")["span_label_from"] == "last_token"
    assert "span_label_from" not in FinetuneSettings().data_settings("classification")
    with pytest.raises(ValueError, match="finetune.span_label_from must be one of each_token, last_token"):
        FinetuneConfig(span_label_from="first_token")
    assert tag_names(["a"], "each_token") == ["O", "B-a", "I-a"]


def test_a_spans_characters_leave_out_the_whitespace_its_tokens_carry():
    text = "x = 1  # one\n"
    offsets = [(0, 1), (1, 3), (3, 5), (5, 6), (6, 8), (8, 12), (12, 13)]  # "x", " =", " 1", " ", " #", " one", "\n"
    assert char_span(text, offsets, 4, 7) == (7, 12) and text[7:12] == "# one"
    assert char_span(text, offsets, 3, 4) == (5, 6)  # all whitespace: kept as it is
