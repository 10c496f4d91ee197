"""The evaluate flow's ``multiple_choice`` stage: zero-shot accuracy on a HellaSwag-format file.

Scored as lm-evaluation-harness scores a ``multiple_choice`` task: each ending is a loglikelihood
request (context → ``" " + ending``); ``acc`` picks the ending with the highest summed
log-probability, ``acc_norm`` the highest per character of the ending (lm-evaluation-harness's
``acc_norm``), ``acc_bytes`` the highest per UTF-8 byte (its ``acc_bytes``; the same as
``acc_norm`` for ASCII text).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prefect import task

from gptflow.data.multiple_choice import MultipleChoiceError, encode_example, read_multiple_choice
from gptflow.data.store import ArtifactStore
from gptflow.model.device import resolve_device
from gptflow.model.evaluate import predicted_choice, score_continuations
from gptflow.tasks.model_source import ResolvedModel
from gptflow.tasks.runtime.caching import directory_is_complete, run_stage, stage_key
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.stages.evaluation import LOSS_BATCH_SEQUENCES
from gptflow.tasks.tracking.progress import StageProgress, run_logger
from gptflow.tasks.tracking.run import PipelineRun

PREDICTIONS_FILE = "predictions.jsonl"


@dataclass
class MultipleChoiceReport:
    directory: str
    """``predictions.jsonl``: per example, its location, label, each ending's log-likelihood and
    the three predictions."""
    file_hash: str
    """Content hash of the file scored (its path may differ from run to run)."""
    examples: int
    acc: float
    """Share of examples whose highest-log-likelihood ending is the labelled one."""
    acc_norm: float
    """The same, with each log-likelihood divided by its ending's length in characters."""
    acc_bytes: float
    """The same, with each log-likelihood divided by its ending's length in UTF-8 bytes."""
    truncated: int
    """Examples whose context was cut from the left to fit the model's context window."""

    def metrics(self) -> dict[str, float]:
        return {
            "eval/mc_acc": self.acc,
            "eval/mc_acc_norm": self.acc_norm,
            "eval/mc_acc_bytes": self.acc_bytes,
            "eval/mc_examples": self.examples,
            "eval/mc_truncated": self.truncated,
        }


@task(name="score-multiple-choice")
def score_multiple_choice_task(source: ResolvedModel, path: str, file_hash: str, out_dir: str,
                               artifacts: ArtifactStore) -> MultipleChoiceReport:
    examples = read_multiple_choice(Path(path))
    text_tokenizer = source.load_tokenizer()
    encoded = [encode_example(text_tokenizer, example, source.tokenizer.eot_id) for example in examples]
    device = resolve_device("auto")
    gpt = source.load(device)
    for example, tokens in zip(examples, encoded):
        longest = max(len(ids) for ids in tokens.ending_ids)
        if longest > gpt.config.block_size:
            raise MultipleChoiceError(
                f"{example.location}: an ending of {longest} tokens does not fit the model's context of "
                f"{gpt.config.block_size} tokens; shorten it or leave the example out."
            )
    requests = [(tokens.context_ids, ids) for tokens in encoded for ids in tokens.ending_ids]
    scores = score_continuations(gpt, requests, LOSS_BATCH_SEQUENCES * gpt.config.block_size, device,
                                 progress=StageProgress("multiple_choice (endings)", ""))

    rows = []
    first = 0
    for example in examples:
        last = first + len(example.endings)
        log_likelihoods = scores.log_likelihoods[first:last]
        rows.append({
            "location": example.location,
            "label": example.label,
            "log_likelihoods": log_likelihoods,
            "pred": predicted_choice(log_likelihoods),
            "pred_norm": predicted_choice(log_likelihoods, [len(ending) for ending in example.endings]),
            "pred_bytes": predicted_choice(log_likelihoods, [len(ending.encode()) for ending in example.endings]),
            "truncated": any(scores.truncated[first:last]),
        })
        first = last
    with artifacts.commit(Path(out_dir)) as directory:
        (directory / PREDICTIONS_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))

    def accuracy(prediction: str) -> float:
        return sum(row[prediction] == row["label"] for row in rows) / len(rows)

    return MultipleChoiceReport(
        directory=out_dir, file_hash=file_hash, examples=len(rows),
        acc=accuracy("pred"), acc_norm=accuracy("pred_norm"), acc_bytes=accuracy("pred_bytes"),
        truncated=sum(row["truncated"] for row in rows),
    )


def score_multiple_choice(
    source: ResolvedModel,
    path: Path,
    file_hash: str,
    workspace: Workspace,
    run: PipelineRun,
) -> MultipleChoiceReport:
    """The ``multiple_choice`` stage, keyed by the model's weights, the tokenizer and the file's content."""
    key = stage_key(
        "multiple_choice",
        config={},
        modules=(__name__,),
        inputs={"model": source.weights_hash, "tokenizer": source.tokenizer_hash, "file": file_hash},
    )
    outcome = run_stage(score_multiple_choice_task, key=key, workspace=workspace,
                        is_valid=directory_is_complete, source=source, path=str(path),
                        file_hash=file_hash, out_dir=str(workspace.store / "eval" / key),
                        artifacts=workspace.artifacts)
    report = outcome.result
    run.record_stage("multiple_choice", outcome.status)
    run.log_metrics(report.metrics())
    run.log_artifact(Path(report.directory) / PREDICTIONS_FILE, "eval/multiple_choice")
    truncated = f"; {report.truncated} contexts cut to fit the model's context" if report.truncated else ""
    run_logger().info(
        f"multiple choice: acc {report.acc:.4f}, acc_norm {report.acc_norm:.4f} over {report.examples} examples "
        f"of {path.name}{truncated}"
    )
    return report
