"""The ``sweep`` flow: one ``pretrain`` child flow run per point of a grid, up to ``max_parallel`` at
once, nested under one MLflow run that compares them (docs/ARCHITECTURE.md, "Sweeps")."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlflow import MlflowClient
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.transactions import CommitMode, transaction

from gptflow.data.errors import UserError
from gptflow.flows.arguments import NonNegativeInt, PositiveFloat, PositiveInt
from gptflow.flows.checks import SweepInputs, check_sweep
from gptflow.flows.pretrain import PretrainSummary, corpus_label
from gptflow.flows.summaries import FlowSummary, end_log_of_deployment_run, of_run
from gptflow.flows.user_errors import hide_tracebacks_of_user_errors
from gptflow.model.scaling_law import ScalingFitError
from gptflow.tasks.runtime.caching import pipeline_code_version
from gptflow.tasks.runtime.point_workers import point_runner, use_worker_devices
from gptflow.tasks.runtime.unit_maps import workers_report_to_this_api
from gptflow.tasks.runtime.workspace import Workspace
from gptflow.tasks.settings import DEFAULT_PRESET, PresetName
from gptflow.tasks.sweep_plan import (
    BEST_POINT_TAG,
    EVAL_CORPUS_BITS_PER_BYTE,
    FINAL_VAL_LOSS,
    SWEEP_POINT_TAG,
    TABLE_COLUMNS,
    VAL_LOSS_METRIC,
    PointFailed,
    PointOutcome,
    ScalingReport,
    SweepMember,
    SweepPoint,
    best_point,
    csv_table,
    fit_scaling,
    markdown_table,
    ranking_metric,
    table_rows,
    text_table,
)
from gptflow.tasks.sweep_plots import plot_loss_against_settings, plot_loss_curves, plot_scaling_fit
from gptflow.tasks.tracking.progress import run_logger
from gptflow.tasks.tracking.run import MLFLOW_PARENT_RUN_TAG, PipelineRun, flow_run_tags, pipeline_run

SHORT_RUN_ID = 8
"""Characters of a run id that name it in a table: enough to tell a sweep's points apart."""


@dataclass
class SweepSummary(FlowSummary):
    swept: list[str]
    outcomes: list[PointOutcome]
    scaling: ScalingReport | None
    scaling_note: str | None
    """Why a ``--scaling`` sweep has no fit (too few points completed, say)."""

    @property
    def best(self) -> PointOutcome | None:
        """The completed point of lowest score: bits per byte on the evaluation corpus, or val loss."""
        return best_point(self.outcomes)

    @property
    def failed(self) -> list[PointOutcome]:
        return [outcome for outcome in self.outcomes if outcome.status == "failed"]

    def _rows(self) -> list[dict[str, str]]:
        return table_rows(self.outcomes, self.best)

    def _columns(self, *left_out: str) -> list[str]:
        left_out = (*left_out, "point") + (() if self.failed else ("error",))
        if ranking_metric(self.outcomes) != EVAL_CORPUS_BITS_PER_BYTE:
            left_out += (EVAL_CORPUS_BITS_PER_BYTE,)
        return ["point", *self.swept, *(name for name in TABLE_COLUMNS if name not in left_out)]

    def markdown(self, run_url: Callable[[str], str | None]) -> str:
        """The flow run's Prefect artifact: the points, each with its MLflow run, a link named by
        the start of its id where ``run_url`` gives one (``PipelineRun.url_of``: a tracking server
        serves it), since a whole id is wider than the column Prefect gives it."""
        rows = self._rows()
        for row in rows:
            if row["MLflow run"] and (url := run_url(row["MLflow run"])):
                row["MLflow run"] = f"[{row['MLflow run'][:SHORT_RUN_ID]}]({url})"
        url = run_url(self.mlflow_run_id)
        run = f"[{self.mlflow_run_id}]({url})" if url else self.mlflow_run_id
        return "\n".join(["# gptflow sweep", "", f"{self._counts()}; MLflow run {run} nests a run per point.", "",
                          markdown_table(rows, self._columns()), *self._scaling_lines()])

    def description(self) -> str:
        """The sweep's MLflow run's description: the points (nested under it, so without run ids)."""
        return "\n".join([f"{self._counts()}.", "", markdown_table(self._rows(), self._columns("MLflow run")),
                          *self._scaling_lines()])

    def _counts(self) -> str:
        return (f"{len(self.outcomes)} points over {', '.join(self.swept)}, {len(self.failed)} failed, ranked by "
                f"{ranking_metric(self.outcomes)}")

    def _scaling_lines(self) -> list[str]:
        if self.scaling is not None:
            return ["", f"**Scaling law**: {self.scaling.describe()}"]
        if self.scaling_note:
            return ["", f"**Scaling law**: not fitted: {self.scaling_note}"]
        return []

    def render(self) -> str:
        lines = ["", text_table(self._rows(), self._columns("MLflow run", "error")), ""]
        lines += [f"point {outcome.point.index} failed: {outcome.error}" for outcome in self.failed]
        best = self.best
        if best is not None:
            lines.append(f"best        point {best.point.index} ({best.point.label()}): "
                         f"{ranking_metric(self.outcomes)} {best.score:.4f}, MLflow run {best.mlflow_run_id}")
        if self.failed:
            lines.append(f"failed      {len(self.failed)} of {len(self.outcomes)} points (each one's MLflow run and "
                         "Prefect flow run hold its log)")
        if self.scaling is not None:
            lines.append(f"scaling     {self.scaling.describe()}")
        elif self.scaling_note:
            lines.append(f"scaling     not fitted: {self.scaling_note}")
        lines += self.closing_lines(" (the points are its nested runs)")
        return "\n".join(lines)


@task(name="sweep-point", cache_policy=NO_CACHE, persist_result=False)
def train_point(parameters: dict[str, Any], torch_threads: int | None) -> PretrainSummary:
    """One point: the ``pretrain`` flow, a child flow run of this task's, in a worker process. Its
    error comes back as a ``PointFailed`` holding the message alone (whatever the error's class,
    it unpickles in the sweep's process)."""
    # Imported here: the task travels to its worker by value, and the flow must come from its module.
    from gptflow.flows.pretrain import pretrain

    use_worker_devices()
    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)  # the points running at once share the machine's cores
    try:
        # Prefect commits the records of tasks run inside a task when that task ends: the stages'
        # records would reach the cache only once the whole point is trained, and the points
        # training beside it would compute the data stages again. Committed as each stage ends:
        with transaction(commit_mode=CommitMode.EAGER):
            return pretrain(**parameters)
    except Exception as error:
        message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
        raise PointFailed(" ".join(message.split())) from None


def _flow_run_name() -> str:
    parameters = flow_run.parameters
    grid = parameters.get("grid") or {}
    swept = " ".join(f"{key.rpartition('.')[2]}×{len(values)}" for key, values in grid.items())
    drawn = f" {parameters['random_points']} drawn" if parameters.get("random_points") else ""
    preset = parameters.get("preset", DEFAULT_PRESET)
    return f"{swept}{drawn} · sweep {preset} {corpus_label(parameters.get('corpus'))}"


@flow(name="sweep", flow_run_name=_flow_run_name, log_prints=True)
def sweep(
    grid: dict[str, list[Any]],
    corpus: list[str] | None = None,
    preset: PresetName = DEFAULT_PRESET,
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    random_points: PositiveInt | None = None,
    seed: NonNegativeInt = 0,
    max_parallel: PositiveInt = 1,
    scaling: bool = False,
    compute_budget: PositiveFloat | None = None,
    eval_corpus: list[str] | None = None,
    workspace: str | None = None,
    ray: str | None = None,
) -> SweepSummary:
    """Pretrain one model per point of ``grid`` and compare them.

    Args:
        grid: the settings to sweep and their values; the points are every combination:
            train.learning_rate=1e-3,3e-3,1e-2 on the command line, once per setting,
            ``{"train.learning_rate": ["1e-3", "3e-3", "1e-2"]}`` as a flow parameter. With
            ``random_points``, a value LOW..HIGH is a range to draw from: log-uniform for decimals
            (1e-4..1e-2), uniform for whole numbers (2..8).
        corpus: what every point trains on, as pretrain takes it (files, folders, globs, s3:// URLs or
            hf:owner/name datasets, each with an optional =WEIGHT suffix for a data mixture; default:
            the Python standard library's source); the data stages run once for all the points.
        preset: the named configuration every point starts from; ``gptflow presets`` lists them.
        config_file: a TOML or JSON file of settings, applied over the preset.
        overrides: settings applied last to every point, each named by section and field:
            train.max_steps=200 on the command line, ``{"train.max_steps": 200}`` as a flow parameter.
        random_points: train this many points drawn at random from the grid instead of all of them.
        seed: seed of the random draw: the same seed draws the same points, and a larger
            ``random_points`` adds points to them.
        max_parallel: points training at once: worker processes sharing this machine's cores, or tasks
            on the ``ray`` cluster.
        scaling: fit Chinchilla's law L(N, D) = E + A/N^alpha + B/D^beta of the final val loss against
            parameters N and training tokens D (sweep model.* sizes and train.max_steps), and log the
            compute-optimal size for ``compute_budget``.
        compute_budget: training FLOPs (6 x N x D) to give the compute-optimal model size for, e.g. 1e18
            (default: the costliest point's).
        eval_corpus: score every point on every document of this corpus too, in bits per byte, and rank
            the points by it: the same text for every point, where each point's own val split differs
            when the grid sweeps how the corpus is read (data.quality, say).
        workspace: the artifact store and MLflow database: a folder, or an S3 prefix mirrored in
            $GPTFLOW_CACHE (default: $GPTFLOW_HOME or ./.gptflow).
        ray: train the points as tasks on this Ray cluster (auto, HOST:PORT or ray://HOST:PORT; default
            $GPTFLOW_RAY_ADDRESS): its nodes must reach the workspace and the Prefect and MLflow
            servers; without it, the points train on this machine.
    """
    started = time.monotonic()
    hide_tracebacks_of_user_errors()
    overrides = dict(overrides or {})
    inputs = check_sweep(grid, corpus, preset, config_file, overrides, random_points, seed, scaling, max_parallel, ray,
                         eval_corpus)
    points, configs, corpus = inputs.points, inputs.configs, inputs.corpus
    workspace_dir = Workspace.resolve(workspace)
    swept = list(points[0].settings)

    tags = {"gptflow.flow": "sweep", "gptflow.preset": preset}
    with pipeline_run(workspace_dir, "pretrain", tags=tags) as run:  # beside its points, which nest under it
        # The swept settings' column shows the values swept (the children show one each).
        shared = configs[0].flatten() | {key: ",".join(str(value) for value in grid[key]) for key in swept}
        run.log_params({
            "code_version": pipeline_code_version(), "preset": preset, "corpus": " ".join(corpus), **shared,
            "sweep.points": len(points),
            "sweep.max_parallel": max_parallel, "sweep.random_points": random_points or 0, "sweep.seed": seed,
            "sweep.scaling": scaling, **({"eval_corpus": " ".join(eval_corpus)} if eval_corpus else {}),
        })
        if not eval_corpus and (data_keys := [key for key in swept if key.startswith(("data.", "tokenizer."))]):
            run_logger().warning(f"sweep: {', '.join(data_keys)} changes what each point holds out as its val split, "
                                 f"so their {FINAL_VAL_LOSS} do not compare: give --eval-corpus PATH, text scored "
                                 "alike for every point")
        # A point's data stages run in its own process: computed once for the sweep, they gain little
        # from the cluster, and a point waiting on tasks of its own could hold the cluster's last CPU.
        # The workspace by its path: a Ray worker's $GPTFLOW_HOME is its own.
        common = {"corpus": corpus, "preset": preset, "config_file": config_file,
                  "workspace": workspace if workspace is not None else str(workspace_dir.root), "from_scratch": True,
                  "eval_corpus": eval_corpus}
        outcomes = _train_points(points, common, overrides, run, max_parallel, inputs)
        scaling_report, scaling_note = None, None
        if scaling:
            try:
                scaling_report = fit_scaling(outcomes, compute_budget)
            except ScalingFitError as error:
                scaling_note = str(error)
                run_logger().warning(f"sweep: the scaling law is not fitted: {error}")
        summary = SweepSummary(
            swept=swept, outcomes=outcomes, scaling=scaling_report,
            scaling_note=scaling_note, **of_run(run, time.monotonic() - started),
        )
        _log_comparison(run, summary, workspace_dir)
    create_markdown_artifact(key="sweep-summary", markdown=summary.markdown(run.url_of),
                             description="Every point of the sweep, its scores and its MLflow run")
    end_log_of_deployment_run(summary.render())
    return summary


def _train_points(points: list[SweepPoint], common: dict[str, Any], overrides: dict[str, Any], run: PipelineRun,
                  max_parallel: int, inputs: SweepInputs) -> list[PointOutcome]:
    """Train every point, ``max_parallel`` at a time, in worker processes here or on the Ray
    cluster; a point that fails is an outcome like the others, and the rest go on."""
    outcomes: dict[int, PointOutcome] = {}
    in_flight: dict[PrefectFuture[PretrainSummary], SweepPoint] = {}

    def collect_one() -> None:
        done = next(as_completed(list(in_flight)))
        point = in_flight.pop(done)
        try:
            result = done.result(raise_on_failure=False)
        except Exception as error:  # the worker itself died (killed, out of memory): the point failed
            result = error
        outcomes[point.index] = _outcome(point, result)
        outcome = outcomes[point.index]
        scores = (f"{EVAL_CORPUS_BITS_PER_BYTE} {outcome.eval_corpus_bits_per_byte:.4f}, "
                  if outcome.eval_corpus_bits_per_byte is not None else "")
        result = (f"{scores}{FINAL_VAL_LOSS} {outcome.val_loss:.4f} ({outcome.training})"
                  if outcome.status == "completed" else f"failed: {outcome.error}")
        run_logger().info(f"sweep: point {point.index} ({point.label()}) {result}; "
                          f"{len(outcomes)} of {len(points)} done")

    with workers_report_to_this_api(), point_runner(max_parallel, inputs.ray_address, inputs.machine_share) as runner:
        run_logger().info(f"sweep: {len(points)} points, {max_parallel} at a time {runner.where}")
        for point in points:
            if len(in_flight) == max_parallel:
                collect_one()
            # The swept settings first, as run names show them (tasks.tracking.naming.run_name).
            settings = point.settings | {key: value for key, value in overrides.items() if key not in point.settings}
            parameters = {**common, "overrides": settings, "sweep": SweepMember(run.run_id, point.index)}
            named = train_point.with_options(task_run_name=f"point {point.index}: {point.label()}")
            in_flight[runner.submit(named, {"parameters": parameters, "torch_threads": runner.torch_threads})] = point
        while in_flight:
            collect_one()
    _name_failed_points_runs(run, outcomes)
    return [outcomes[point.index] for point in points]


def _outcome(point: SweepPoint, result: PretrainSummary | BaseException) -> PointOutcome:
    if isinstance(result, BaseException):
        message = str(result) if isinstance(result, PointFailed) else f"{type(result).__name__}: {result}"
        return PointOutcome(point, "failed", error=" ".join(message.split()))
    return PointOutcome(
        point, "completed", mlflow_run_id=result.mlflow_run_id, val_loss=result.val_loss,
        perplexity=result.perplexity, parameters=result.parameters, tokens=result.tokens_seen, steps=result.steps,
        training=result.stages.get("pretrain"), trained_in_run=result.trained_in_run, elapsed_s=result.elapsed_s,
        eval_corpus_bits_per_byte=result.eval_corpus.loss.bits_per_byte if result.eval_corpus else None,
    )


def _name_failed_points_runs(run: PipelineRun, outcomes: dict[int, PointOutcome]) -> None:
    """A failed point's MLflow run (its id never came back from the worker), found by its tags."""
    failed = {index: outcome for index, outcome in outcomes.items() if outcome.status == "failed"}
    if not failed:
        return
    children = run.client.search_runs([run.experiment_id],
                                      filter_string=f"tags.`{MLFLOW_PARENT_RUN_TAG}` = '{run.run_id}'")
    for child in children:
        point = child.data.tags.get(SWEEP_POINT_TAG, "")
        if point.isdigit() and int(point) in failed:
            failed[int(point)].mlflow_run_id = child.info.run_id


def _log_comparison(run: PipelineRun, summary: SweepSummary, workspace: Workspace) -> None:
    """On the sweep's MLflow run: the table (its description, and ``sweep/points.csv``), val loss
    against each swept setting, every point's val-loss curve, the scaling fit; the best point tagged."""
    directory = workspace.store / "sweeps" / run.run_id
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "points.csv").write_text(csv_table(summary.outcomes))
    (directory / "points.md").write_text(summary.markdown(run.url_of))
    completed = [outcome for outcome in summary.outcomes if outcome.status == "completed"]
    if completed:
        plot_loss_against_settings(summary.outcomes, directory)
        curves = _val_loss_curves(run.client, completed)
        plot_loss_curves(curves, summary.best.point.label(), directory / "val_loss_curves.png")
    metrics = {"sweep/points_completed": len(completed), "sweep/points_failed": len(summary.failed)}
    best = summary.best
    if best is not None:
        # The best point's score under the metric it was chosen by: with an evaluation corpus its val
        # loss need not be the lowest, and a `best_val_loss` above another point's would mislead.
        ranked_by_eval_corpus = best.eval_corpus_bits_per_byte is not None
        metrics["sweep/best_eval_corpus_bits_per_byte" if ranked_by_eval_corpus else "sweep/best_val_loss"] = best.score
        run.set_tags({"gptflow.sweep.best_run": best.mlflow_run_id, "gptflow.sweep.best_point": best.point.label()})
        PipelineRun.attach(str(workspace.root), workspace.tracking_uri, best.mlflow_run_id).set_tags(
            {BEST_POINT_TAG: "true"})
    if summary.scaling is not None:
        metrics |= summary.scaling.metrics()
        plot_scaling_fit(summary.outcomes, summary.scaling, directory / "scaling_fit.png")
    run.log_metrics(metrics)
    run.log_artifact(directory, "sweep")
    prefect_url = flow_run_tags().get("prefect.flow_run_url")
    link = f"Prefect flow run: [{run.name}]({prefect_url})\n\n" if prefect_url else ""
    run.set_tags({"mlflow.note.content": link + summary.description()})


def _val_loss_curves(client: MlflowClient, completed: list[PointOutcome]) -> dict[str, list[tuple[int, float]]]:
    """Each point's ``val/loss`` history, from the run that trained it (a point trained by an
    earlier run has its curve there)."""
    curves = {}
    for outcome in completed:
        history = client.get_metric_history(outcome.trained_in_run, VAL_LOSS_METRIC)
        curves[outcome.point.label()] = sorted((metric.step, metric.value) for metric in history)
    return curves

