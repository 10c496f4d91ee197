"""Scoring a fine-tuned classifier: accuracy, macro-F1, a majority baseline and a confusion-matrix
plot, shared by the finetune flow's ``evaluate`` stage (on its val split) and the evaluate flow's
``classification`` stage (on any labelled CSV/JSONL file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import task

from gptflow.data.commits import write_report
from gptflow.data.finetune_data import EVAL_SPLIT, PreparedSplit, prepare_labelled, read_split
from gptflow.data.hashing import hash_file
from gptflow.data.store import ArtifactStore
from gptflow.model.classifier import GPTClassifier, classification_metrics, load_classifier
from gptflow.model.device import resolve_device
from gptflow.model.finetune import score_examples
from gptflow.tasks.model_source import ResolvedModel
from gptflow.tasks.runtime.caching import directory_is_complete, run_stage, stage_key
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.tracking.progress import run_logger
from gptflow.tasks.tracking.run import PipelineRun

CONFUSION_PLOT = "confusion_matrix.png"
PREDICTIONS_FILE = "predictions.jsonl"


@dataclass
class ClassificationReport:
    directory: str
    """``report.json``, ``confusion_matrix.png`` and ``predictions.jsonl``."""
    metrics: dict[str, float]
    """``eval/accuracy``, ``eval/macro_f1``, ``eval/majority_accuracy``, ``eval/<split>_loss``,
    ``eval/<split>_examples`` and ``eval/f1/<label>``."""
    classes: dict[str, Any] = field(default_factory=dict)
    """``labels``, per-class ``f1``, ``confusion`` (rows true, columns predicted) and the
    ``majority_label`` the baseline always predicts."""
    skipped: str = ""
    """What was left out of the scored file (``SkipReport.summary()``); empty when nothing was."""


def classify_and_report(
    classifier_model: GPTClassifier, split: PreparedSplit, split_name: str, labels: list[str],
    majority_label: str, pad_id: int, directory: Path,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Classify every example of ``split`` and write ``predictions.jsonl`` and the confusion matrix
    into ``directory``; the metrics, where the majority baseline always predicts ``majority_label``."""
    scores = score_examples(classifier_model, split, pad_id)
    true = split.labels.tolist()
    measured = classification_metrics(true, scores.predictions, len(labels))
    majority_accuracy = sum(labels[label] == majority_label for label in true) / len(true)
    plot_confusion_matrix(measured.confusion, labels, directory / CONFUSION_PLOT,
                           f"accuracy {measured.accuracy:.3f} · macro-F1 {measured.macro_f1:.3f} · "
                           f"majority baseline {majority_accuracy:.3f}")
    with open(directory / PREDICTIONS_FILE, "w") as out:
        out.writelines(json.dumps({"location": location, "label": labels[label], "predicted": labels[predicted]}) + "\n"
                       for location, label, predicted in zip(split.locations, true, scores.predictions))
    metrics = {"eval/accuracy": measured.accuracy, "eval/macro_f1": measured.macro_f1,
               "eval/majority_accuracy": majority_accuracy, f"eval/{split_name}_loss": scores.loss,
               f"eval/{split_name}_examples": len(true),
               **{f"eval/f1/{label}": f1 for label, f1 in zip(labels, measured.f1)}}
    classes = {"labels": labels, "f1": measured.f1, "confusion": measured.confusion, "majority_label": majority_label}
    return metrics, classes


def most_common_label(counts: dict[str, int]) -> str:
    """The label a constant guesser picks: the most frequent, ties to the later name (deterministic)."""
    return max(counts, key=lambda label: (counts[label], label))


# --- the evaluate flow's classification stage --------------------------------------------------


@task(name="score-classifier")
def score_classifier_task(source: ResolvedModel, path: str, text_field: str, label_field: str,
                          out_dir: str, artifacts: ArtifactStore) -> ClassificationReport:
    device = resolve_device("auto")
    classifier_model, max_length = load_classifier(source.model_dir, source.classifier_dir, device)
    pad_id = source.tokenizer.pad_id
    with artifacts.commit(Path(out_dir)) as directory:
        prepared = prepare_labelled(Path(path), source.tokenizer_file, directory / "data", labels=classifier_model.labels,
                                    max_length=max_length, text_field=text_field, label_field=label_field)
        split = read_split(Path(prepared.directory), EVAL_SPLIT)
        majority = most_common_label(prepared.label_counts[EVAL_SPLIT])
        metrics, classes = classify_and_report(classifier_model, split, EVAL_SPLIT, classifier_model.labels, majority, pad_id,
                                       directory)
        skips = prepared.skip_report()
        metrics.update({"eval/truncated": prepared.truncated[EVAL_SPLIT], "eval/skipped": skips.total})
        report = ClassificationReport(directory=out_dir, metrics=metrics, classes=classes,
                                      skipped=skips.summary() if skips.total else "")
        write_report(directory, report)
    return report


def score_classifier(
    source: ResolvedModel, path: Path, text_field: str, label_field: str, workspace: Workspace, run: PipelineRun
) -> ClassificationReport:
    """The ``classification`` stage: ``source`` (a fine-tuned classifier: ``classifier_dir`` set) on a labelled file, keyed
    by the classifier's weights, the tokenizer and the file's content and fields."""
    key = stage_key(
        "classification",
        config={"text_field": text_field, "label_field": label_field},
        modules=(__name__,),
        inputs={"model": source.weights_hash, "tokenizer": source.tokenizer_hash, "file": hash_file(path)},
    )
    outcome = run_stage(
        score_classifier_task, key=key, workspace=workspace, is_valid=directory_is_complete,
        source=source, path=str(path), text_field=text_field, label_field=label_field,
        out_dir=str(workspace.store / "eval" / key), artifacts=workspace.artifacts,
    )
    report = outcome.result
    run.record_stage("classification", outcome.status)
    run.log_metrics(report.metrics)
    run.log_artifact(Path(report.directory), "eval/classification")
    logger = run_logger()
    metrics = report.metrics
    logger.info(f"classification: accuracy {metrics['eval/accuracy']:.3f}, macro-F1 {metrics['eval/macro_f1']:.3f} "
                f"(majority baseline {metrics['eval/majority_accuracy']:.3f}) on "
                f"{int(metrics[f'eval/{EVAL_SPLIT}_examples']):,} examples of {path.name}")
    if report.skipped:
        logger.warning(f"classification: {report.skipped}")
    return report


def plot_confusion_matrix(confusion: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; and never pick an interactive backend inside a worker
    import matplotlib.pyplot as plt

    size = max(4.0, 0.6 * len(labels) + 2.5)
    figure, axes = plt.subplots(figsize=(size, size), dpi=110)
    image = axes.imshow(confusion, cmap="Blues")
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title, fontsize=8)
    largest = max(max(row) for row in confusion) or 1
    for row, counts in enumerate(confusion):
        for column, count in enumerate(counts):
            axes.text(column, row, str(count), ha="center", va="center",
                      color="white" if count > largest / 2 else "black", fontsize=8)
    figure.colorbar(image, ax=axes, fraction=0.046)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
