"""The plots on a sweep's MLflow run: each point's score against each swept setting, every point's
val-loss curve, the scaling law against the points (``tasks.sweep_plan`` decides what they show;
matplotlib is imported when a plot is drawn, with its Agg backend: no display, also in a worker)."""

from __future__ import annotations

from pathlib import Path

from gptflow.tasks.sweep_plan import (
    EVAL_CORPUS_BITS_PER_BYTE,
    FINAL_VAL_LOSS,
    VAL_LOSS_METRIC,
    PointOutcome,
    ScalingReport,
    is_whole_number,
    ranking_metric,
)


def plot_loss_against_settings(outcomes: list[PointOutcome], directory: Path) -> list[Path]:
    """``<metric>_vs_<setting>.png`` per swept setting: the completed points' score
    (``ranking_metric``: bits per byte on the evaluation corpus, or the final val loss) against its
    values, a line per combination of the other swept settings (log axis for numbers spanning 10x)."""
    plt = _pyplot()
    completed = [outcome for outcome in outcomes if outcome.status == "completed"]
    metric = ranking_metric(outcomes)
    swept = list(outcomes[0].point.settings)
    paths = []
    for key in swept:
        others = [other for other in swept if other != key]
        figure, axes = plt.subplots(figsize=(7, 4), dpi=110)
        values = [outcome.point.settings[key] for outcome in completed]
        numeric = all(_is_number(value) for value in values)
        order = sorted(set(values), key=float) if numeric else list(dict.fromkeys(values))
        groups: dict[str, list[PointOutcome]] = {}
        for outcome in completed:
            groups.setdefault(" ".join(f"{other.rpartition('.')[2]}={outcome.point.settings[other]}"
                                       for other in others), []).append(outcome)
        for group, members in groups.items():
            members.sort(key=lambda outcome: order.index(outcome.point.settings[key]))
            xs = [float(m.point.settings[key]) if numeric else order.index(m.point.settings[key]) for m in members]
            axes.plot(xs, [member.score for member in members], marker="o", label=group or None)
        if numeric and order and float(order[0]) > 0 and float(order[-1]) >= 10 * float(order[0]):
            axes.set_xscale("log")
        if not numeric:
            axes.set_xticks(range(len(order)), order)
        elif all(is_whole_number(value) for value in order):
            axes.set_xticks([float(value) for value in order], order)
        axes.set_xlabel(key)
        # The metric's own name says bits per byte; the val loss's needs its unit.
        axes.set_ylabel(metric if metric == EVAL_CORPUS_BITS_PER_BYTE
                        else f"{FINAL_VAL_LOSS}, final evaluation (nats/token)")
        axes.grid(alpha=0.3)
        if others and groups:
            axes.legend(fontsize=8)
        figure.tight_layout()
        path = directory / f"{metric.rpartition('/')[2]}_vs_{key}.png"
        figure.savefig(path)
        plt.close(figure)
        paths.append(path)
    return paths


def plot_loss_curves(curves: dict[str, list[tuple[int, float]]], best: str | None, path: Path) -> None:
    """Each point's validation curve during training (``val/loss``, label → (step, loss)) on one
    chart, the best one bold; its title says how the curve differs from the table's final ``eval/val_loss``."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=110)
    for label, series in curves.items():
        if series:
            steps, losses = zip(*series)
            axes.plot(steps, losses, marker="o", markersize=3, label=label + (" (best)" if label == best else ""),
                      linewidth=2.5 if label == best else 1.2)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(f"{VAL_LOSS_METRIC}, during training (nats/token)")
    axes.set_title(f"{VAL_LOSS_METRIC}: train.val_tokens tokens sampled over the val split. The table's "
                   f"{FINAL_VAL_LOSS} scores eval.eval_tokens\ntokens sampled alike after training: the last points "
                   "agree with it within sampling noise", fontsize=8)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2 if len(curves) > 8 else 1)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_scaling_fit(outcomes: list[PointOutcome], report: ScalingReport, path: Path) -> None:
    """Val loss against training tokens, a colour per model size: the points and the law's curves."""
    from gptflow.tasks.tracking.progress import human_count

    plt = _pyplot()
    completed = [outcome for outcome in outcomes if outcome.status == "completed"]
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=110)
    low = min(outcome.tokens for outcome in completed) / 1.5
    high = max(outcome.tokens for outcome in completed) * 1.5
    grid = [low * (high / low) ** (step / 49) for step in range(50)]
    for parameters in sorted({outcome.parameters for outcome in completed}):
        members = sorted((o for o in completed if o.parameters == parameters), key=lambda o: o.tokens)
        line = axes.plot(grid, [report.law.loss(parameters, tokens) for tokens in grid], linewidth=1)[0]
        axes.scatter([m.tokens for m in members], [m.val_loss for m in members], color=line.get_color(),
                     label=f"{human_count(parameters)} parameters", zorder=3)
    axes.set_xscale("log")
    axes.set_xlabel("training tokens")
    axes.set_ylabel(f"{FINAL_VAL_LOSS}, final evaluation (nats/token)")
    axes.set_title(report.law.describe().split(" (")[0], fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; and never pick an interactive backend inside a worker
    import matplotlib.pyplot as plt

    return plt


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
