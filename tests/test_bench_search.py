"""The search-quality benchmark's replays (bench/search_quality.py) on a hand-made table whose frontier is
known by construction: no training."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace as copy_with
from pathlib import Path

import numpy as np
import pytest

from bench.search_quality import (
    accuracy_reference,
    early_stopping_runs,
    paired_test,
    parse_sampler,
    replay_early_stopping,
    replay_sampler,
    sampler_replays,
    scoring_for,
    sign_test,
    spread,
    summarise,
    summarise_early,
)
from bench.search_table import (
    SearchTable,
    TablePoint,
    check_complete,
    grid_points,
    point_key,
    read_table,
    training_space,
)
from bench.table_gain import gains, report
from orchestrator.space.spec import load_spec
from pxd.errors import ConfigError

SPACE = Path(__file__).resolve().parents[1] / "bench" / "search_quality.yaml"
EPOCHS = 4  # the space's student epochs: MO-ASHA rungs at 1 and 3 (grace 1, η 3)
SEEDS = [0, 1, 2]
# blockwise_resnet is cheaper and more accurate than mobilenetv3_small_050 at every side: every mobilenet
# point is dominated, and only the best distillation weights (kd 0.9, isrd 10) reach the frontier
ARCHS = {"resnet10t": (0.015, 0.60), "mobilenetv3_small_050": (0.002, 0.45), "blockwise_resnet": (0.001, 0.50)}


@pytest.fixture(scope="module")
def spec():
    return load_spec(SPACE)


def _value(params: dict) -> float:
    side = params["student.resolution"]
    bonus = 0.04 * (params["distill.kd"] > 0) + 0.03 * (params["distill.isrd"] > 0)
    return ARCHS[params["student.arch"]][1] + side / 100 + bonus


def _point(params: dict) -> TablePoint:
    final, side = _value(params), params["student.resolution"]
    # seeds spread ±0.01 around the mean; curves rise linearly to each seed's final value
    finals = [final - 0.01, final, final + 0.01]
    curves = [[value * epoch / EPOCHS for epoch in range(1, EPOCHS + 1)] for value in finals]
    costs = {"gmacs": ARCHS[params["student.arch"]][0] * (side / 24) ** 2, "params_m": 1.0, "pixels": float(side * side)}
    return TablePoint(params=params, seeds=SEEDS, val_top1=finals, val_top1_curves=curves, costs=costs,
                      ce_val_top1=[ARCHS[params["student.arch"]][1] + side / 100 - 0.05] * 3)


@pytest.fixture(scope="module")
def table(spec):
    return SearchTable(points=[_point(params) for params in grid_points(spec)], space=training_space(spec),
                       seeds=SEEDS, dataset={"classes": 8}, wall_s=1.0)


@pytest.fixture(scope="module")
def scoring(spec, table):
    return scoring_for(table, spec, "chance")


def _frontier_by_construction(spec) -> set[str]:
    return {point_key(p) for p in grid_points(spec) if p["student.arch"] != "mobilenetv3_small_050"
            and p["distill.kd"] > 0 and p["distill.isrd"] > 0}


def test_grid_is_every_combination_once(spec):
    grid = grid_points(spec)
    assert len(grid) == 3 * 4 * 2 * 2
    assert len({point_key(p) for p in grid}) == len(grid)


def test_a_point_reads_its_mean_spread_and_mean_curve():
    point = _point({"student.arch": "resnet10t", "student.resolution": 8, "distill.kd": 0.9, "distill.isrd": 10.0})
    assert point.val_top1_mean == pytest.approx(0.6 + 0.08 + 0.07)
    assert point.val_top1_std == pytest.approx(0.01)  # sample standard deviation of ±0.01
    assert point.curve()[-1] == pytest.approx(point.val_top1_mean)
    assert point.curve(2) == point.val_top1_curves[2]
    assert point.metrics(0)["val_top1"] == point.val_top1[0] and point.metrics()["pixels"] == 64.0


def test_scoring_finds_the_frontier_built_into_the_table(spec, scoring):
    assert scoring.frontier == _frontier_by_construction(spec)
    assert 0 < scoring.grid_hypervolume < 1


def test_the_whole_grid_scores_one_and_a_frontier_subset_its_share(spec, table, scoring):
    assert scoring.hypervolume_curve(table.points)[-1] == pytest.approx(1.0)
    assert scoring.hypervolume_curve(table.points[::-1])[-1] == pytest.approx(1.0)
    assert scoring.recovered_curve(table.points)[-1] == 1.0
    front = [p for p in table.points if point_key(p.params) in scoring.frontier]
    dominated = [p for p in table.points if point_key(p.params) not in scoring.frontier]
    assert scoring.recovered_curve(front[:4])[-1] == pytest.approx(4 / len(front))
    assert scoring.recovered_curve(dominated)[-1] == 0.0
    assert scoring.hypervolume_curve(front)[-1] == pytest.approx(1.0)  # dominated points add nothing
    assert scoring.hypervolume_curve(front[:-1])[-1] < 1.0
    curve = scoring.hypervolume_curve(table.points)
    assert all(b >= a for a, b in itertools.pairwise(curve))


def test_grid_sampler_at_the_whole_grid_is_the_reference(spec, table, scoring):
    grid = parse_sampler("grid", spec)
    for seed in (0, 1):
        record = sampler_replays(table, spec, scoring, grid, [seed], len(table.points), noise=False)[0]
        assert record["hypervolume"][-1] == pytest.approx(1.0) and record["recovered"][-1] == 1.0
        assert record["distinct"] == len(table.points)


def test_replays_are_seeded_and_noise_changes_only_what_the_sampler_is_told(spec, table, scoring):
    tpe = parse_sampler("tpe", spec)
    first = replay_sampler(table, spec, tpe, seed=3, trials=10)
    assert [p.params for p in first] == [p.params for p in replay_sampler(table, spec, tpe, seed=3, trials=10)]
    noisy = sampler_replays(table, spec, scoring, tpe, [3], 10, noise=True)[0]
    assert noisy == sampler_replays(table, spec, scoring, tpe, [3], 10, noise=True)[0]
    assert all(0 <= value <= 1 + 1e-12 for value in noisy["hypervolume"])  # scored on the means


def test_a_sampler_variant_carries_its_options_and_a_bad_one_is_refused(spec):
    assert parse_sampler("tpe:n_startup_trials=4", spec).options == {"n_startup_trials": 4}
    assert parse_sampler("random", spec).options == {}
    with pytest.raises(ConfigError, match="options"):
        parse_sampler("tpe:no_such_option=1", spec)
    with pytest.raises(ConfigError, match="sampler"):
        parse_sampler("annealing", spec)


def test_paired_test_identical_samplers_and_a_clear_winner():
    same = paired_test([0.5, 0.7, 0.9] * 7, [0.5, 0.7, 0.9] * 7)
    assert same["p_value"] == 1.0 and same["ties"] == 21 and same["median_difference"] == 0.0
    better = paired_test([0.8 + 0.001 * i for i in range(20)], [0.5] * 20)
    assert better["p_value"] < 1e-3 and better["wins"] == 20 and better["median_difference"] > 0
    assert paired_test([0.5] * 20, [0.8 + 0.001 * i for i in range(20)])["p_value"] == pytest.approx(better["p_value"])
    assert sign_test(10, 0) == pytest.approx(2 * 0.5 ** 10)
    assert sign_test(5, 5) == 1.0


def test_spread_is_median_and_ordered_quartiles():
    cell = spread([0.1, 0.4, 0.2, 0.9, 0.3])
    assert cell == pytest.approx({"median": 0.3, "q25": 0.2, "q75": 0.4})
    assert cell["q25"] <= cell["median"] <= cell["q75"]


def test_summary_orders_quartiles_and_tests_each_sampler_against_random(spec, table, scoring):
    replays = list(range(6))
    runs = {name: sampler_replays(table, spec, scoring, parse_sampler(name, spec), replays, 12, noise=False)
            for name in ("tpe", "random")}
    runs["random_again"] = runs["random"]
    summary = summarise(runs, [6, 12])
    for cells in summary["samplers"].values():
        for cell in cells.values():
            for metric in ("hypervolume", "recovered"):
                assert cell[metric]["q25"] <= cell[metric]["median"] <= cell[metric]["q75"]
    assert summary["samplers"]["random_again"][12]["hypervolume_vs_random"]["p_value"] == 1.0
    assert "hypervolume_vs_random" not in summary["samplers"]["random"][12]
    assert set(summary["verdicts"]) == {6, 12}


def test_accuracy_reference_rules(spec, table):
    assert accuracy_reference(table, spec, "chance")["val_top1"] == pytest.approx(1 / 8)
    floor = min(float(np.mean(p.ce_val_top1)) for p in table.points)
    assert accuracy_reference(table, spec, "ce_floor")["val_top1"] == pytest.approx(floor)
    assert accuracy_reference(table, spec, "space")["val_top1"] == spec.require_search().reference_point["val_top1"]
    assert accuracy_reference(table, spec, "0.3")["val_top1"] == 0.3
    with pytest.raises(ConfigError, match="accuracy-reference"):
        accuracy_reference(table, spec, "median")
    without = SearchTable(points=[TablePoint(p.params, p.seeds, p.val_top1, p.val_top1_curves, p.costs)
                                  for p in table.points], space=table.space, dataset={"classes": 8})
    with pytest.raises(ConfigError, match="ce_control"):
        accuracy_reference(without, spec, "ce_floor")
    with pytest.raises(ConfigError, match="beats the reference"):
        scoring_for(table, spec, "0.99")
    # a reference at the CE floor scores less of the box than one at chance
    assert scoring_for(table, spec, "ce_floor").grid_hypervolume < scoring_for(table, spec, "chance").grid_hypervolume


def test_no_stopping_trains_every_epoch_and_keeps_the_grid(spec, table, scoring):
    plain = replay_early_stopping(table.points, spec, scoring, concurrency=2, stopping=False)
    assert plain["student_epochs"] == len(table.points) * EPOCHS
    assert len(plain["complete"]) == len(table.points)
    assert plain["hypervolume"] == pytest.approx(1.0) and plain["recovered"] == 1.0


@pytest.mark.parametrize("keep_front", [True, False])
def test_moasha_replay_never_trains_more_than_the_full_epochs(spec, table, scoring, keep_front):
    ordered = sorted(table.points, key=lambda p: p.val_top1_mean)
    for points in (ordered, ordered[::-1]):
        moasha = replay_early_stopping(points, spec, scoring, 2, stopping=True, keep_front=keep_front)
        assert moasha["student_epochs"] <= len(points) * EPOCHS
        assert moasha["hypervolume"] <= 1.0 + 1e-12
        assert set(moasha["complete"]) | set(moasha["stopped_at"]) == set(range(len(points)))
        assert set(moasha["stopped_at"].values()) <= {1, 3}  # the rungs of grace 1, η 3, 4 epochs
    best_first = replay_early_stopping(ordered[::-1], spec, scoring, 1, stopping=True, keep_front=keep_front)
    assert best_first["stopped_at"] and best_first["student_epochs"] < len(ordered) * EPOCHS
    assert 0 in best_first["complete"]  # the best trial arrives first and always completes


def test_early_stopping_runs_both_rules_on_the_same_seeds(spec, table, scoring):
    runs = early_stopping_runs(table, spec, scoring, [0, 1, 2], concurrency=2, noise=True)
    assert [run["seed"] for run in runs] == [0, 1, 2]
    for run in runs:
        assert run["none"]["student_epochs"] == len(table.points) * EPOCHS
        for rule in ("keep_front", "classic"):
            assert 0 < run[rule]["epoch_ratio"] <= 1 and run[rule]["hypervolume_kept"] <= 1 + 1e-12
    # classic MO-ASHA stops front points too: never more epochs than keep_front on the same order
    assert all(run["classic"]["student_epochs"] <= run["keep_front"]["student_epochs"] for run in runs)
    summary = summarise_early(runs)
    assert set(summary) == {"keep_front", "classic"}
    assert runs == early_stopping_runs(table, spec, scoring, [0, 1, 2], concurrency=2, noise=True)


def test_table_json_round_trip_and_an_old_table_is_refused(tmp_path, spec, table):
    path = tmp_path / "search_quality_table.json"
    path.write_text(json.dumps(table.to_json()))
    payload = json.loads(path.read_text())
    assert {"command", "dataset", "machine", "versions", "wall_s", "points"} <= set(payload)
    assert {"params", "seeds", "val_top1_mean", "val_top1_std", "gmacs", "params_m", "pixels",
            "val_top1_curves", "ce_val_top1"} <= set(payload["points"][0])
    again = read_table(path)
    assert [p.val_top1 for p in again.points] == [p.val_top1 for p in table.points]
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"space": {}, "points": [{"params": {}, "metrics": {}, "student_val_top1": []}]}))
    with pytest.raises(ConfigError, match="format"):
        read_table(old)


def test_a_table_missing_a_point_is_refused(spec, table):
    check_complete(table, spec)
    partial = SearchTable(points=table.points[1:], space=table.space, seeds=SEEDS, dataset={"classes": 8})
    with pytest.raises(ConfigError, match="no row"):
        check_complete(partial, spec)
    assert not math.isnan(scoring_for(partial, spec, "chance").grid_hypervolume)


def test_table_gain_pairs_every_student_with_its_control_per_distillation_setting(table):
    found = gains(table)
    # by construction: the control is 0.05 below the plain point; kd adds 0.04, isrd 0.03
    expected = {(0.0, 0.0): 0.05, (0.9, 0.0): 0.09, (0.0, 10.0): 0.08, (0.9, 10.0): 0.12}
    assert len(found) == 4
    for setting, row in found.items():
        weights = json.loads(setting)
        assert row["mean"] == pytest.approx(expected[(weights["distill.kd"], weights["distill.isrd"])])
        assert len(row["students"]) == 12 and row["gained"] == 12  # 3 architectures × 4 sides
        assert row["low"] == pytest.approx(row["mean"]) and set(row["by_side"]) == {8, 12, 16, 24}
    text = report(table, "hand-made")
    assert text.index('"distill.isrd": 10.0, "distill.kd": 0.9') < text.index('"distill.isrd": 0.0, "distill.kd": 0.0')


def test_table_gain_refuses_a_table_without_controls(table):
    bare = copy_with(table, points=[copy_with(point, ce_val_top1=[]) for point in table.points])
    with pytest.raises(SystemExit, match="no CE controls"):
        gains(bare)
