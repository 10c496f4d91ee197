"""What a sweep trains and what it reports: the points of a grid (or a seeded random draw from it),
each checked before any trains; each point's outcome and score; the table and the scaling-law fit
logged on the sweep's MLflow run, beside ``tasks.sweep_plots``'s plots (docs/ARCHITECTURE.md, "Sweeps").

A point is a set of ``section.field`` settings applied over the sweep's preset, config file and
``--set`` overrides, and trained by the ``pretrain`` flow as any other run: the data stages and
each point's training are cached by their keys, so points a workspace trained before (in an
earlier sweep or by ``gptflow pretrain``) are not trained again.

This module loads neither Prefect nor torch (the fit and the plots import what they need): the
command line checks a sweep with it before anything starts, and the flow checks again for
deployment runs. Random draws (``--random N``) are sequential from ``random.Random(seed)``, so N+1
draws extend N. The comparison is written to ``store/sweeps/<run id>/`` and logged as the sweep
run's ``sweep/`` artifacts; each point's val-loss curve comes from the run that trained it (a
cached point's curve lives in that earlier run), and ``model.scaling_law`` fits the law.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gptflow.data.errors import UserError
from gptflow.model.scaling_law import (
    FLOPS_PER_PARAMETER_TOKEN,
    MIN_POINTS,
    ScalingLaw,
    fit_scaling_law,
)
from gptflow.tasks.settings import ConfigError, PretrainSettings, build_config

RANGE_SEPARATOR = ".."
DRAW_ATTEMPTS = 100
"""Draws a random sweep makes per point before it gives up finding a point it has not drawn."""
VAL_LOSS_METRIC = "val/loss"
"""The validation curve: measured during training on ``train.val_tokens`` tokens sampled over the
whole val split. A point's table and plots of settings give its final evaluation instead,
``eval/val_loss`` (``FINAL_VAL_LOSS``), on ``eval.eval_tokens`` tokens sampled alike, with which
the curve's last point agrees within sampling noise (exactly, when both budgets cover the split)."""
FINAL_VAL_LOSS = "eval/val_loss"
EVAL_CORPUS_BITS_PER_BYTE = "eval_corpus/bits_per_byte"
"""A point's score on the sweep's ``--eval-corpus``: the same text for every point, so points that
read their own corpus differently (a swept ``data.*`` setting: each holds out its own val split)
compare by it; the sweep ranks its points by it when it has one, else by ``FINAL_VAL_LOSS``."""
SWEEP_POINT_TAG = "gptflow.sweep.point"
BEST_POINT_TAG = "gptflow.sweep.best"


class SweepError(ConfigError):
    """A grid, a draw or a point that cannot be trained; the message names the setting and the fix."""


class PointFailed(UserError):
    """A point's pretraining failed; the message is its error's (the point's own flow run logged
    the traceback)."""


@dataclass(frozen=True)
class SweepMember:
    """A pretraining that is one point of a sweep: its MLflow run nests under the sweep's."""

    parent_run_id: str
    point: int


@dataclass(frozen=True)
class SweepPoint:
    index: int
    """1-based, in the order the grid (or the draw) gives the points."""
    settings: dict[str, str]
    """``{"train.learning_rate": "3e-3"}``: each swept setting's value, as given."""

    def label(self) -> str:
        return " ".join(f"{key.rpartition('.')[2]}={value}" for key, value in self.settings.items())


@dataclass
class PointOutcome:
    """What training one point gave, or why it failed."""

    point: SweepPoint
    status: str
    """``completed`` or ``failed``."""
    mlflow_run_id: str | None = None
    val_loss: float | None = None
    """The final evaluation's ``eval/val_loss``."""
    perplexity: float | None = None
    parameters: int | None = None
    tokens: int | None = None
    steps: int | None = None
    training: str | None = None
    """The pretrain stage's status: ``executed`` (trained now) or ``cached`` (trained before)."""
    trained_in_run: str | None = None
    """The MLflow run that trained the model, whose ``val/loss`` history is the point's curve."""
    elapsed_s: float | None = None
    error: str | None = None
    eval_corpus_bits_per_byte: float | None = None
    """``EVAL_CORPUS_BITS_PER_BYTE``, when the sweep has an evaluation corpus."""

    @property
    def score(self) -> float | None:
        """What the sweep ranks the point by (lower is better): ``EVAL_CORPUS_BITS_PER_BYTE`` when
        the sweep has an evaluation corpus, else ``FINAL_VAL_LOSS``."""
        return self.val_loss if self.eval_corpus_bits_per_byte is None else self.eval_corpus_bits_per_byte


@dataclass
class ScalingReport:
    law: ScalingLaw
    compute_budget: float
    """FLOPs (``6 N D``) the compute-optimal size is given for."""

    @property
    def optimal_parameters(self) -> float:
        return self.law.compute_optimal(self.compute_budget)[0]

    @property
    def optimal_tokens(self) -> float:
        return self.law.compute_optimal(self.compute_budget)[1]

    def metrics(self) -> dict[str, float]:
        return {
            "scaling/E": self.law.E, "scaling/A": self.law.A, "scaling/alpha": self.law.alpha,
            "scaling/B": self.law.B, "scaling/beta": self.law.beta, "scaling/rms_log_residual": self.law.residual,
            "scaling/compute_budget_flops": self.compute_budget,
            "scaling/optimal_parameters": self.optimal_parameters, "scaling/optimal_tokens": self.optimal_tokens,
        }

    def describe(self) -> str:
        from gptflow.tasks.tracking.progress import human_count

        return (f"{self.law.describe()}; for {self.compute_budget:.3g} FLOPs: "
                f"{human_count(self.optimal_parameters)} parameters on {human_count(self.optimal_tokens)} tokens")


def parse_grid(pairs: Sequence[str]) -> dict[str, list[str]]:
    """``["train.learning_rate=1e-3,3e-3"]`` → ``{"train.learning_rate": ["1e-3", "3e-3"]}``;
    ``KEY=LOW..HIGH`` is a range to draw from (``--random``)."""
    grid: dict[str, list[str]] = {}
    for pair in pairs:
        key, sep, values = pair.partition("=")
        key = key.strip()
        if not sep or "." not in key:
            raise SweepError(f"--grid {pair!r} must look like section.field=V1,V2,..., "
                             "e.g. --grid train.learning_rate=1e-3,3e-3.")
        if key in grid:
            raise SweepError(f"--grid {key} is given twice: list all its values in one --grid.")
        grid[key] = [value.strip() for value in values.split(",")]
    return grid


def plan_points(grid: dict[str, list[Any]], draws: int | None = None, seed: int = 0) -> list[SweepPoint]:
    """Every combination of ``grid``'s values, the first key's values outermost; with ``draws``,
    that many distinct points drawn at random (``seed``: the same draw again; one more draw adds a
    point and keeps the earlier ones). A value ``LOW..HIGH`` is drawn from that range: log-uniform
    between positive numbers, uniform among whole numbers."""
    if not grid:
        raise SweepError("A sweep needs at least one --grid section.field=V1,V2,... "
                         "(e.g. --grid train.learning_rate=1e-3,3e-3,1e-2).")
    values = {key: [str(value).strip() for value in options] for key, options in grid.items()}
    for key, options in values.items():
        if not options or any(not option for option in options):
            raise SweepError(f"--grid {key} has an empty value: give its values as {key}=V1,V2,...")
        if len(set(options)) < len(options):
            raise SweepError(f"--grid {key} lists a value twice: {','.join(options)}.")
        if any(RANGE_SEPARATOR in option for option in options) and (draws is None or len(options) > 1):
            raise SweepError(f"--grid {key}={','.join(options)}: a range LOW{RANGE_SEPARATOR}HIGH is drawn from "
                             "with --random N, and stands alone as the setting's value.")
    if draws is None:
        return [SweepPoint(index, dict(zip(values, combination)))
                for index, combination in enumerate(itertools.product(*values.values()), start=1)]
    samplers = {key: _sampler(key, options) for key, options in values.items()}
    rng = random.Random(seed)
    points: list[SweepPoint] = []
    drawn: set[tuple[str, ...]] = set()
    while len(points) < draws:
        for _ in range(DRAW_ATTEMPTS):
            combination = tuple(sample(rng) for sample in samplers.values())
            if combination not in drawn:
                break
        else:
            raise SweepError(f"--random {draws}: the grid holds only {len(points)} distinct points; lower --random "
                             "or add values.")
        drawn.add(combination)
        points.append(SweepPoint(len(points) + 1, dict(zip(values, combination))))
    return points


def _sampler(key: str, options: list[str]):
    """How a random sweep draws ``key``'s value: one of the listed ones, or from a range."""
    if len(options) > 1 or RANGE_SEPARATOR not in options[0]:
        return lambda rng: rng.choice(options)
    low_text, _, high_text = options[0].partition(RANGE_SEPARATOR)
    try:
        low, high = float(low_text), float(high_text)
    except ValueError:
        raise SweepError(f"--grid {key}={options[0]}: a range is LOW{RANGE_SEPARATOR}HIGH of two numbers, "
                         "e.g. 1e-4..1e-2.") from None
    if not low < high:
        raise SweepError(f"--grid {key}={options[0]}: LOW must be below HIGH.")
    if all(is_whole_number(text) for text in (low_text, high_text)):
        return lambda rng: str(rng.randint(int(low), int(high)))
    if low <= 0:
        raise SweepError(f"--grid {key}={options[0]}: a range of decimals is drawn log-uniformly, so both ends must "
                         "be positive.")
    return lambda rng: f"{math.exp(rng.uniform(math.log(low), math.log(high))):.3g}"


def is_whole_number(text: str) -> bool:
    return text.strip().lstrip("-").isdigit()


def check_points(points: list[SweepPoint], preset: str, config_file: str | None,
                 overrides: dict[str, Any]) -> list[PretrainSettings]:
    """Each point's settings, built now: an unknown setting, a value that does not parse or an
    invalid combination fails the sweep before any point trains, naming the point."""
    swept_and_set = sorted(set(points[0].settings) & set(overrides)) if points else []
    if swept_and_set:
        raise SweepError(f"{', '.join(swept_and_set)} is both swept (--grid) and set (--set): drop one of them.")
    configs = []
    for point in points:
        try:
            configs.append(build_config(PretrainSettings, preset, config_file, {**overrides, **point.settings}))
        except ConfigError as error:
            raise SweepError(f"sweep point {point.index} ({point.label()}): {error}") from None
    seen: dict[str, SweepPoint] = {}
    for point, config in zip(points, configs):
        flat = json.dumps(config.flatten(), sort_keys=True, default=str)
        if flat in seen:
            raise SweepError(f"sweep points {seen[flat].index} ({seen[flat].label()}) and {point.index} "
                             f"({point.label()}) are the same settings: drop one of the values.")
        seen[flat] = point
    return configs


def check_scaling(points: list[SweepPoint], configs: list[PretrainSettings]) -> None:
    """A scaling sweep needs several model sizes and token budgets, and enough points to fit."""
    example = "e.g. --grid model.n_layer=2,4,6 --grid train.max_steps=200,400,800"
    shapes = {json.dumps(dataclasses.asdict(config.model), sort_keys=True) for config in configs}
    budgets = {planned_tokens(config) for config in configs}
    if len(shapes) < 2 or len(budgets) < 2:
        swept = "model sizes" if len(shapes) < 2 else "token budgets"
        raise SweepError(f"--scaling fits the loss against model size and training tokens, but this sweep has one of "
                         f"its {swept}: sweep model.* settings and the steps, {example}.")
    if len(points) < MIN_POINTS:
        raise SweepError(f"--scaling fits 5 constants: it needs at least {MIN_POINTS} points, this sweep has "
                         f"{len(points)} ({example}).")


def planned_tokens(config: PretrainSettings) -> int:
    """Tokens a pretraining at ``config`` trains on."""
    train = config.train
    sequences = train.global_batch_size or train.micro_batch_size * train.grad_accum_steps * train.nproc
    return train.max_steps * sequences * config.model.block_size


def best_point(outcomes: list[PointOutcome]) -> PointOutcome | None:
    """The completed point of lowest score (``PointOutcome.score``)."""
    completed = [outcome for outcome in outcomes if outcome.status == "completed"]
    return min(completed, key=lambda outcome: outcome.score) if completed else None


def ranking_metric(outcomes: list[PointOutcome]) -> str:
    """The metric the points' scores are: ``EVAL_CORPUS_BITS_PER_BYTE`` or ``FINAL_VAL_LOSS``."""
    scored_on_eval_corpus = any(outcome.eval_corpus_bits_per_byte is not None for outcome in outcomes)
    return EVAL_CORPUS_BITS_PER_BYTE if scored_on_eval_corpus else FINAL_VAL_LOSS


def fit_scaling(outcomes: list[PointOutcome], compute_budget: float | None) -> ScalingReport:
    """The scaling law of the completed points; the compute-optimal size for ``compute_budget``
    FLOPs (default: the costliest point's ``6 N D``). ``ScalingFitError`` when they cannot fit it."""
    completed = [outcome for outcome in outcomes if outcome.status == "completed"]
    law = fit_scaling_law([outcome.parameters for outcome in completed], [outcome.tokens for outcome in completed],
                          [outcome.val_loss for outcome in completed])
    budget = compute_budget or max(FLOPS_PER_PARAMETER_TOKEN * outcome.parameters * outcome.tokens
                                   for outcome in completed)
    return ScalingReport(law, budget)


TABLE_COLUMNS = ("point", "status", EVAL_CORPUS_BITS_PER_BYTE, FINAL_VAL_LOSS, "perplexity", "parameters", "tokens", "training", "time",
                 "MLflow run", "error")


def table_rows(outcomes: list[PointOutcome], best: PointOutcome | None) -> list[dict[str, str]]:
    """One row per point: its swept settings, then ``TABLE_COLUMNS``."""
    from gptflow.tasks.tracking.progress import human_count, human_duration

    rows = []
    for outcome in outcomes:
        row = {"point": str(outcome.point.index) + (" (best)" if outcome is best else ""), **outcome.point.settings}
        row.update({
            "status": outcome.status,
            EVAL_CORPUS_BITS_PER_BYTE: ("" if outcome.eval_corpus_bits_per_byte is None
                                        else f"{outcome.eval_corpus_bits_per_byte:.4f}"),
            FINAL_VAL_LOSS: "" if outcome.val_loss is None else f"{outcome.val_loss:.4f}",
            "perplexity": "" if outcome.perplexity is None else f"{outcome.perplexity:.2f}",
            "parameters": "" if outcome.parameters is None else human_count(outcome.parameters),
            "tokens": "" if outcome.tokens is None else human_count(outcome.tokens),
            "training": _training_cell(outcome),
            "time": "" if outcome.elapsed_s is None else (f"{outcome.elapsed_s:.1f}s" if outcome.elapsed_s < 60
                                                          else human_duration(outcome.elapsed_s)),
            "MLflow run": outcome.mlflow_run_id or "",
            "error": outcome.error or "",
        })
        rows.append(row)
    return rows


def _training_cell(outcome: PointOutcome) -> str:
    """``executed``, or for a point whose training an earlier run did, ``cached`` and that run."""
    if outcome.training == "cached" and outcome.trained_in_run and outcome.trained_in_run != outcome.mlflow_run_id:
        return f"cached: trained by run {outcome.trained_in_run[:8]}"
    return outcome.training or ""


def markdown_table(rows: list[dict[str, str]], columns: Sequence[str]) -> str:
    """``rows`` as a markdown table of ``columns``, in that order."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row[name].replace("|", "\\|").replace("\n", " ") for name in columns) + " |"
              for row in rows]
    return "\n".join(lines)


def text_table(rows: list[dict[str, str]], columns: Sequence[str]) -> str:
    """``rows`` as aligned columns for a terminal (``columns`` of them, in that order)."""
    widths = {name: max(len(name), *(len(row[name]) for row in rows)) for name in columns}
    lines = ["  ".join(name.ljust(widths[name]) for name in columns)]
    lines += ["  ".join(row[name].ljust(widths[name]) for name in columns) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def csv_table(outcomes: list[PointOutcome]) -> str:
    """Every point with its swept settings and outcome, numbers unrounded, for a spreadsheet or pandas."""
    buffer = io.StringIO()
    fields = [name for name in PointOutcome.__dataclass_fields__ if name != "point"]
    swept = list(outcomes[0].point.settings)
    writer = csv.DictWriter(buffer, fieldnames=["point", *swept, *fields], lineterminator="\n")
    writer.writeheader()
    for outcome in outcomes:
        values = {name: getattr(outcome, name) for name in fields}
        writer.writerow({"point": outcome.point.index, **outcome.point.settings,
                         **{name: "" if value is None else value for name, value in values.items()}})
    return buffer.getvalue()
