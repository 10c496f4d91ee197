"""A sweep's points: the grid's combinations or a seeded draw, each checked before any trains."""

from __future__ import annotations

import math

import pytest

from gptflow.tasks.settings import PretrainSettings, build_config
from gptflow.tasks.sweep_plan import (
    EVAL_CORPUS_BITS_PER_BYTE,
    PointOutcome,
    SweepError,
    SweepPoint,
    best_point,
    check_points,
    check_scaling,
    csv_table,
    markdown_table,
    parse_grid,
    plan_points,
    planned_tokens,
    ranking_metric,
    table_rows,
)


def test_a_grid_is_every_combination_with_the_first_setting_outermost():
    points = plan_points(parse_grid(["train.learning_rate=1e-3,3e-3", "model.n_layer=2,4,6"]))
    assert [point.index for point in points] == [1, 2, 3, 4, 5, 6]
    assert [point.label() for point in points[:4]] == [
        "learning_rate=1e-3 n_layer=2", "learning_rate=1e-3 n_layer=4", "learning_rate=1e-3 n_layer=6",
        "learning_rate=3e-3 n_layer=2",
    ]


def test_a_random_draw_is_distinct_repeatable_and_grows_by_adding_points():
    grid = {"train.learning_rate": ["1e-3", "3e-3", "1e-2"], "model.n_layer": ["2", "4", "6"]}
    four = plan_points(grid, draws=4, seed=7)
    assert len({tuple(point.settings.values()) for point in four}) == 4
    assert plan_points(grid, draws=4, seed=7) == four
    assert plan_points(grid, draws=5, seed=7)[:4] == four
    assert plan_points(grid, draws=4, seed=8) != four
    assert len(plan_points(grid, draws=9, seed=0)) == 9  # every point of the grid
    with pytest.raises(SweepError, match="the grid holds only 9 distinct points"):
        plan_points(grid, draws=10, seed=0)


def test_ranges_draw_log_uniform_decimals_and_uniform_whole_numbers():
    points = plan_points({"train.learning_rate": ["1e-4..1e-2"], "model.n_layer": ["2..8"]}, draws=200, seed=1)
    rates = [float(point.settings["train.learning_rate"]) for point in points]
    layers = {int(point.settings["model.n_layer"]) for point in points}
    assert all(1e-4 <= rate <= 1e-2 for rate in rates)
    # Log-uniform: about half the draws fall below the geometric middle, 1e-3.
    assert 0.35 < sum(rate < 1e-3 for rate in rates) / len(rates) < 0.65
    assert layers == set(range(2, 9))


@pytest.mark.parametrize(
    ("grid", "draws", "message"),
    [
        ({}, None, "A sweep needs at least one --grid"),
        ({"train.learning_rate": [""]}, None, "has an empty value"),
        ({"train.learning_rate": ["1e-3", "1e-3"]}, None, "lists a value twice"),
        ({"train.learning_rate": ["1e-4..1e-2"]}, None, "is drawn from with --random N"),
        ({"train.learning_rate": ["1e-4..1e-2", "1e-3"]}, 3, "stands alone"),
        ({"train.learning_rate": ["a..b"]}, 3, "two numbers"),
        ({"train.learning_rate": ["1e-2..1e-4"]}, 3, "LOW must be below HIGH"),
        ({"train.learning_rate": ["0..0.5"]}, 3, "both ends must be positive"),
    ],
)
def test_a_grid_that_cannot_be_planned_is_refused(grid, draws, message):
    with pytest.raises(SweepError, match=message):
        plan_points(grid, draws=draws)


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (["learning_rate=1e-3"], "must look like section.field=V1,V2"),
        (["train.learning_rate"], "must look like section.field=V1,V2"),
        (["train.learning_rate=1e-3", "train.learning_rate=3e-3"], "is given twice"),
    ],
)
def test_a_malformed_grid_flag_is_refused(pairs, message):
    with pytest.raises(SweepError, match=message):
        parse_grid(pairs)


@pytest.mark.parametrize(
    ("grid", "overrides", "message"),
    [
        ({"train.learning_rat": ["1e-3"]}, {},
         r"sweep point 1 \(learning_rat=1e-3\): .*train.learning_rat is not a setting"),
        ({"train.max_steps": ["100", "many"]}, {}, r"sweep point 2 \(max_steps=many\): .*is not a valid int"),
        ({"model.n_head": ["3"]}, {}, r"sweep point 1 \(n_head=3\)"),
        ({"train.max_steps": ["100"]}, {"train.max_steps": "50"}, "both swept \\(--grid\\) and set \\(--set\\)"),
        ({"train.learning_rate": ["1e-3", "0.001"]}, {}, "sweep points 1 .* and 2 .* are the same settings"),
    ],
)
def test_points_that_cannot_train_are_refused_before_any_trains(grid, overrides, message):
    with pytest.raises(SweepError, match=message):
        check_points(plan_points(grid), "tiny", None, overrides)


def test_a_scaling_sweep_needs_sizes_budgets_and_enough_points():
    def check(grid):
        points = plan_points(grid)
        check_scaling(points, check_points(points, "tiny", None, {}))

    check({"model.n_layer": ["1", "2", "3"], "train.max_steps": ["10", "20"]})
    with pytest.raises(SweepError, match="one of its token budgets"):
        check({"model.n_layer": ["1", "2", "3", "4", "5"]})
    with pytest.raises(SweepError, match="one of its model sizes"):
        check({"train.learning_rate": ["1e-3", "2e-3", "3e-3"], "train.max_steps": ["10", "20"]})
    with pytest.raises(SweepError, match="at least 5 points, this sweep has 4"):
        check({"model.n_layer": ["1", "2"], "train.max_steps": ["10", "20"]})


def test_planned_tokens_count_steps_batch_and_context():
    config = build_config(PretrainSettings, "tiny", None, {"train.max_steps": 10, "train.grad_accum_steps": 2})
    assert planned_tokens(config) == 10 * 8 * 2 * 64


def test_the_tables_name_every_point_its_outcome_and_the_best():
    points = plan_points({"train.learning_rate": ["1e-3", "3e-3", "1e-2"]})
    outcomes = [
        PointOutcome(points[0], "completed", "run-a", 5.2, 181.3, 135_000, 2560, 10, "executed", "run-a", 4.0),
        PointOutcome(points[1], "completed", "run-b", 4.9, 134.3, 135_000, 2560, 10, "cached", "run-old", 0.5),
        PointOutcome(points[2], "failed", "run-c", error="CorpusError: too few tokens | for this"),
    ]
    best = best_point(outcomes)
    assert best is outcomes[1]
    rows = table_rows(outcomes, best)
    assert [row["point"] for row in rows] == ["1", "2 (best)", "3"]
    assert rows[0]["training"] == "executed"
    # A point whose training an earlier run did names that run (its MLflow run links it).
    assert rows[1]["train.learning_rate"] == "3e-3" and rows[1]["training"] == "cached: trained by run run-old"
    assert rows[2]["eval/val_loss"] == "" and rows[2]["status"] == "failed"
    markdown = markdown_table(rows, list(rows[0])).splitlines()
    assert markdown[0].startswith(
        "| point | train.learning_rate | status | eval_corpus/bits_per_byte | eval/val_loss |")
    assert "too few tokens \\| for this" in markdown[4]  # a | in an error does not split its cell
    lines = csv_table(outcomes).splitlines()
    assert lines[0].split(",")[:5] == ["point", "train.learning_rate", "status", "mlflow_run_id", "val_loss"]
    assert lines[2].split(",")[:5] == ["2", "3e-3", "completed", "run-b", "4.9"]
    assert best_point([outcomes[2]]) is None
    assert math.isclose(float(lines[1].split(",")[4]), 5.2)
    assert ranking_metric(outcomes) == "eval/val_loss"


def test_with_an_evaluation_corpus_the_points_are_ranked_by_it_not_by_their_own_val_loss():
    points = plan_points({"data.quality": ["none", "fineweb"]})
    # Filtering left the fineweb point an easier val split of its own: a lower val loss, but more
    # bits per byte on the text both were scored on.
    outcomes = [PointOutcome(points[0], "completed", "run-a", val_loss=5.0, eval_corpus_bits_per_byte=1.9),
                PointOutcome(points[1], "completed", "run-b", val_loss=4.1, eval_corpus_bits_per_byte=2.2)]
    assert ranking_metric(outcomes) == EVAL_CORPUS_BITS_PER_BYTE
    assert best_point(outcomes) is outcomes[0]
    rows = table_rows(outcomes, best_point(outcomes))
    assert [(row["point"], row[EVAL_CORPUS_BITS_PER_BYTE]) for row in rows] == [("1 (best)", "1.9000"), ("2", "2.2000")]


def test_a_point_label_names_each_swept_setting_by_its_field():
    point = SweepPoint(3, {"train.learning_rate": "1e-3", "model.n_layer": "4"})
    assert point.label() == "learning_rate=1e-3 n_layer=4"
