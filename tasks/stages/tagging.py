"""Scoring a fine-tuned tagger: entity-level precision, recall and F1 per label and over all spans
(exact match, as seqeval's default), token accuracy and a token confusion matrix, shared by the
finetune flow's ``evaluate`` stage (on its val split) and the evaluate flow's ``tagging`` stage
(on any file of texts and spans, or CoNLL file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task

from gptflow.data.commits import write_report
from gptflow.data.finetune_data import EVAL_SPLIT, PreparedSplit, prepare_labelled, read_split
from gptflow.data.hashing import hash_file
from gptflow.data.store import ArtifactStore
from gptflow.data.tagging import NOT_SCORED, OUTSIDE, char_span, span_scores, spans_of_tags, token_types
from gptflow.model.classifier import GPTTagger, load_classifier
from gptflow.model.device import resolve_device
from gptflow.model.finetune import score_examples
from gptflow.tasks.model_source import ResolvedModel
from gptflow.tasks.runtime.caching import directory_is_complete, run_stage, stage_key
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.stages.classification import CONFUSION_PLOT, PREDICTIONS_FILE, plot_confusion_matrix
from gptflow.tasks.tracking.progress import run_logger
from gptflow.tasks.tracking.run import PipelineRun


@dataclass
class TaggingReport:
    directory: str
    """``report.json``, ``confusion_matrix.png`` and ``predictions.jsonl``."""
    metrics: dict[str, float]
    """``eval/precision|recall|f1`` (micro, entity-level), ``eval/macro_f1``, ``eval/token_accuracy``,
    ``eval/<split>_loss|examples|spans`` and ``eval/precision|recall|f1/<label>``."""
    labels: dict[str, Any] = field(default_factory=dict)
    """``per_label`` scores and support, the token ``confusion`` (rows true, columns predicted,
    over ``token_labels``)."""
    skipped: str = ""
    """What was left out of the scored file (``SkipReport.summary()``); empty when nothing was."""


def tag_and_report(tagger: GPTTagger, split: PreparedSplit, split_name: str, pad_id: int,
                   directory: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """Tag every example of ``split`` and write ``predictions.jsonl`` (gold and predicted spans in
    characters) and the token confusion matrix into ``directory``; the metrics. Tokens the loss
    leaves out (the start token, a span cut by max_length) are scored as outside every span."""
    scores = score_examples(tagger, split, pad_id)
    token_labels = [OUTSIDE, *tagger.labels]
    index_of = {label: index for index, label in enumerate(token_labels)}
    confusion = np.zeros((len(token_labels), len(token_labels)), dtype=np.int64)
    gold_spans, predicted_spans = [], []
    with open(directory / PREDICTIONS_FILE, "w") as out:
        for example, (gold_ids, predicted_ids) in enumerate(zip(split.tags, scores.tag_predictions)):
            scored = gold_ids != NOT_SCORED
            gold = spans_of_tags([tagger.tags[tag] if keep else OUTSIDE for tag, keep in zip(gold_ids, scored)],
                                 tagger.span_label_from)
            predicted = spans_of_tags([tagger.tags[tag] if keep else OUTSIDE for tag, keep in zip(predicted_ids, scored)],
                                      tagger.span_label_from)
            gold_spans.append(gold)
            predicted_spans.append(predicted)
            gold_types, predicted_types = token_types(gold, len(gold_ids)), token_types(predicted, len(gold_ids))
            for position in np.flatnonzero(scored):
                confusion[index_of[gold_types[position]], index_of[predicted_types[position]]] += 1
            text, offsets = split.texts[example], split.offsets[example]
            out.write(json.dumps({
                "location": split.locations[example],
                "gold": [_in_characters(text, offsets, span) for span in gold],
                "predicted": [_in_characters(text, offsets, span) for span in predicted],
            }) + "\n")
    measured = span_scores(gold_spans, predicted_spans, tagger.labels)
    present = [scores_of["f1"] for scores_of in measured.per_label.values() if scores_of["support"]]
    token_accuracy = float(np.trace(confusion) / confusion.sum())
    plot_confusion_matrix(confusion.tolist(), token_labels, directory / CONFUSION_PLOT,
                          f"tokens by span label · span F1 {measured.f1:.3f} · token accuracy {token_accuracy:.3f}")
    metrics = {
        "eval/precision": measured.precision, "eval/recall": measured.recall, "eval/f1": measured.f1,
        "eval/macro_f1": sum(present) / len(present) if present else 0.0, "eval/token_accuracy": token_accuracy,
        f"eval/{split_name}_loss": scores.loss, f"eval/{split_name}_examples": len(split.tags),
        f"eval/{split_name}_spans": measured.gold,
        **{f"eval/{name}/{label}": values[name] for label, values in measured.per_label.items()
           for name in ("precision", "recall", "f1")},
    }
    details = {"per_label": measured.per_label, "token_labels": token_labels, "confusion": confusion.tolist(),
               "span_label_from": tagger.span_label_from}
    return metrics, details


def _in_characters(text: str, offsets: np.ndarray, span: tuple[int, int, str]) -> list[Any]:
    """A token span of an example (whose token 0 is the start token) as ``[start, end, label, text]``."""
    start, end = char_span(text, offsets.tolist(), span[0], span[1])
    return [start, end, span[2], text[start:end]]


# --- the evaluate flow's tagging stage ---------------------------------------------------------


@task(name="score-tagger")
def score_tagger_task(source: ResolvedModel, path: str, text_field: str, out_dir: str,
                      artifacts: ArtifactStore) -> TaggingReport:
    tagger, max_length = load_classifier(source.model_dir, source.classifier_dir, resolve_device("auto"))
    with artifacts.commit(Path(out_dir)) as directory:
        prepared = prepare_labelled(Path(path), source.tokenizer_file, directory / "data", objective="tagging",
                                    labels=tagger.labels, max_length=max_length, text_field=text_field,
                                    span_label_from=tagger.span_label_from)
        split = read_split(Path(prepared.directory), EVAL_SPLIT)
        metrics, labels = tag_and_report(tagger, split, EVAL_SPLIT, source.tokenizer.pad_id, directory)
        skips = prepared.skip_report()
        spans = prepared.spans[EVAL_SPLIT]
        metrics.update({"eval/truncated": prepared.truncated[EVAL_SPLIT], "eval/skipped": skips.total,
                        "eval/misaligned_spans": spans["misaligned"], "eval/truncated_spans": spans["truncated"]})
        report = TaggingReport(directory=out_dir, metrics=metrics, labels=labels,
                               skipped=skips.summary() if skips.total else "")
        write_report(directory, report)
    return report


def score_tagger(source: ResolvedModel, path: Path, text_field: str, workspace: Workspace,
                 run: PipelineRun) -> TaggingReport:
    """The ``tagging`` stage: ``source`` (a fine-tuned tagger) on a file of texts and spans, keyed
    by the tagger's weights, the tokenizer and the file's content and text field."""
    key = stage_key(
        "tagging",
        config={"text_field": text_field},
        modules=(__name__,),
        inputs={"model": source.weights_hash, "tokenizer": source.tokenizer_hash, "file": hash_file(path)},
    )
    outcome = run_stage(
        score_tagger_task, key=key, workspace=workspace, is_valid=directory_is_complete,
        source=source, path=str(path), text_field=text_field, out_dir=str(workspace.store / "eval" / key),
        artifacts=workspace.artifacts,
    )
    report = outcome.result
    run.record_stage("tagging", outcome.status)
    run.log_metrics(report.metrics)
    run.log_artifact(Path(report.directory), "eval/tagging")
    logger = run_logger()
    logger.info(f"tagging: {summary_line(report.metrics, EVAL_SPLIT)} of {path.name}")
    if report.skipped:
        logger.warning(f"tagging: {report.skipped}")
    return report


def summary_line(metrics: dict[str, float], split: str) -> str:
    """``span F1 0.912 (precision 0.93, recall 0.90), token accuracy 0.971 on 1,234 spans``."""
    return (f"span F1 {metrics['eval/f1']:.3f} (precision {metrics['eval/precision']:.3f}, recall "
            f"{metrics['eval/recall']:.3f}), token accuracy {metrics['eval/token_accuracy']:.3f} on "
            f"{int(metrics[f'eval/{split}_spans']):,} spans")
