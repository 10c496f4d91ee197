"""The evaluate flow's ``lm_eval`` stage: EleutherAI's lm-evaluation-harness on a gptflow model.

``GptflowLM`` is the harness's model class for a gptflow model: the harness builds every request
(prompts, few-shot examples, choices) and computes every metric; gptflow only answers its
requests with ``model.evaluate.score_continuations`` (loglikelihood, rolling loglikelihood) and
``GPT.generate`` (greedy ``generate_until``). A text is encoded as gptflow's own scorer encodes it:
the end-of-text token first (it precedes every document in training), then the text's tokens, so
``--multiple-choice`` and a harness ``multiple_choice`` task on the same file agree.

lm-evaluation-harness is an optional extra (``pip install 'gptflow[lm-eval]'``), imported only
when the stage runs. ``loglikelihood_rolling`` is scored on disjoint windows of ``block_size``
predicted tokens. Metrics are ``lm_eval/<task>/<metric>`` (a filter other than ``none`` appended
as ``_<filter>``), the harness's results JSON goes to ``store/lm-eval/<key>/``, and the key holds
the model's weights hash, the tasks, limit and few-shot count, the harness's version, the content
of ``--lm-eval-tasks-dir`` and this code. An unknown task or a missing harness is a one-line
``HarnessError``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from prefect import task

from gptflow.data.errors import UserError
from gptflow.data.hashing import hash_file, hash_json
from gptflow.data.store import ArtifactStore
from gptflow.model.device import resolve_device
from gptflow.model.evaluate import score_continuations
from gptflow.model.gpt import GPT
from gptflow.tasks.model_source import ResolvedModel
from gptflow.tasks.runtime.caching import directory_is_complete, run_stage, stage_key
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.stages.evaluation import LOSS_BATCH_SEQUENCES
from gptflow.tasks.tracking.progress import run_logger
from gptflow.tasks.tracking.run import PipelineRun

RESULTS_FILE = "results.json"
METRIC_NAME = re.compile(r"[^A-Za-z0-9_\-./ ]")


class HarnessError(UserError):
    """lm-evaluation-harness cannot run as asked (not installed, an unknown task); the message says what to do."""


@dataclass
class HarnessSettings:
    tasks: list[str]
    limit: int | None = None
    """Examples per task (the harness's ``--limit``); None: all."""
    num_fewshot: int | None = None
    tasks_dir: str | None = None
    """A folder of the user's own task YAMLs (the harness's ``--include_path``)."""


@dataclass
class HarnessReport:
    directory: str
    """``results.json``: the harness's results, configs and versions."""
    metrics: dict[str, float]
    """``lm_eval/<task>/<metric>``, e.g. ``lm_eval/hellaswag/acc_norm``."""


def make_lm(model: GPT, tokenizer: Any, eot_id: int, device: torch.device) -> Any:
    """A ``GptflowLM`` (an ``lm_eval.api.model.TemplateLM``) for ``model`` and its ``tokenizers.Tokenizer``."""
    from lm_eval.api.model import TemplateLM

    class GptflowLM(TemplateLM):
        backend = "causal"

        def __init__(self) -> None:
            super().__init__()
            self.model, self.text_tokenizer, self.eot_id, self.torch_device = model.eval(), tokenizer, eot_id, device

        @property
        def eot_token_id(self) -> int:
            return self.eot_id

        @property
        def prefix_token_id(self) -> int:
            return self.eot_id

        @property
        def max_length(self) -> int:
            return self.model.config.block_size

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            ids = self.text_tokenizer.encode(string, add_special_tokens=False).ids
            return ids if add_special_tokens is False else [self.eot_id, *ids]

        def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
            return self.text_tokenizer.decode(tokens)

        def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list:
            scores = score_continuations(self.model, [(context, continuation) for _, context, continuation in requests],
                                         LOSS_BATCH_SEQUENCES * self.max_length, self.torch_device)
            return list(zip(scores.log_likelihoods, scores.greedy))

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            totals = []
            for (text,) in (request.args for request in requests):
                tokens = self.tok_encode(text)  # the end-of-text token, then the text's
                # Disjoint windows of block_size predicted tokens, each read after as much of the
                # text before it as fits.
                pieces = [(tokens[: start + 1], tokens[start + 1 : start + 1 + self.max_length])
                          for start in range(0, len(tokens) - 1, self.max_length)]
                scores = score_continuations(self.model, pieces, LOSS_BATCH_SEQUENCES * self.max_length, self.torch_device)
                totals.append(sum(scores.log_likelihoods))
            return totals

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            answers = []
            for context, gen_kwargs in (request.args for request in requests):
                until = gen_kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(gen_kwargs.get("max_gen_toks", 256))
                prompt = torch.tensor([self.tok_encode(context)[-self.max_length:]], device=self.torch_device)
                with torch.no_grad():
                    generated = self.model.generate(prompt, max_new, top_k=1,
                                                    vocab_limit=self.text_tokenizer.get_vocab_size())
                text = self.tok_decode(generated[0, prompt.size(1):].tolist())
                cut = min((text.index(stop) for stop in until if stop in text), default=len(text))
                answers.append(text[:cut])
            return answers

    return GptflowLM()


@task(name="lm-eval")
def harness_task(source: ResolvedModel, settings: HarnessSettings, out_dir: str,
                 artifacts: ArtifactStore) -> HarnessReport:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise HarnessError("--lm-eval needs lm-evaluation-harness: pip install 'gptflow[lm-eval]'") from None
    task_manager = TaskManager(include_path=settings.tasks_dir) if settings.tasks_dir else TaskManager()
    unknown = [name for name in settings.tasks if not task_manager.match_tasks([name])]
    if unknown:
        where = f" or in {settings.tasks_dir}" if settings.tasks_dir else " (add --lm-eval-tasks-dir for your own YAMLs)"
        raise HarnessError(f"lm-evaluation-harness has no task {', '.join(unknown)}{where}; `lm-eval ls tasks` "
                           "lists its own")
    device = resolve_device("auto")
    lm = make_lm(source.load(device), source.load_tokenizer(), source.tokenizer.eot_id, device)
    results = lm_eval.simple_evaluate(model=lm, tasks=settings.tasks, num_fewshot=settings.num_fewshot,
                                      limit=settings.limit, task_manager=task_manager, log_samples=False,
                                      bootstrap_iters=0)
    metrics = {}
    for task_name, values in results["results"].items():
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and metric != "alias":
                suffix = "" if filter_name in ("", "none") else f"_{filter_name}"
                metrics[METRIC_NAME.sub("_", f"lm_eval/{task_name}/{metric}{suffix}")] = float(value)
    with artifacts.commit(Path(out_dir)) as directory:
        (directory / RESULTS_FILE).write_text(json.dumps(results, indent=1, default=str))
    return HarnessReport(directory=out_dir, metrics=metrics)


def run_harness(source: ResolvedModel, settings: HarnessSettings, workspace: Workspace, run: PipelineRun,
                step: int) -> HarnessReport:
    """The ``lm_eval`` stage: the harness's metrics on ``source``, logged as ``lm_eval/<task>/<metric>``
    with its results JSON as the artifact ``lm_eval/results.json``. Key: the model's weights, the
    tasks and their settings, the content of ``tasks_dir``, the harness's version and this code."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        harness_version = version("lm_eval")
    except PackageNotFoundError:
        raise HarnessError("--lm-eval needs lm-evaluation-harness: pip install 'gptflow[lm-eval]'") from None
    tasks_files = ({str(path.relative_to(settings.tasks_dir)): hash_file(path)
                    for path in sorted(Path(settings.tasks_dir).rglob("*")) if path.is_file()}
                   if settings.tasks_dir else {})
    key = stage_key("lm-eval",
                    config={"tasks": settings.tasks, "limit": settings.limit, "num_fewshot": settings.num_fewshot,
                            "harness": harness_version},
                    modules=(__name__,), inputs={"model": source.weights_hash, "tasks_dir": hash_json(tasks_files)})
    outcome = run_stage(harness_task, key=key, workspace=workspace, is_valid=directory_is_complete,
                        source=source, settings=settings, out_dir=str(workspace.store / "lm-eval" / key),
                        artifacts=workspace.artifacts)
    report = outcome.result
    run.record_stage("lm_eval", outcome.status)
    run.log_metrics(report.metrics, step=step)
    run.log_artifact(Path(report.directory), "lm_eval")
    run_logger().info("lm_eval: " + ", ".join(f"{name.removeprefix('lm_eval/')} {value:.4f}"
                                              for name, value in sorted(report.metrics.items())))
    return report
