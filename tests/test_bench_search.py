"""The search-quality benchmark's logic (bench/search_quality.py) on a hand-made table: no training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.search_quality import (
    hypervolume_curve,
    quality_targets,
    replay_early_stopping,
    sampler_curve,
    summarise_curves,
)
from bench.search_table import SearchTable, TablePoint, check_complete, grid_points, point_key, training_space
from orchestrator.space.spec import load_spec
from pxd.errors import ConfigError

SPACE = Path(__file__).resolve().parents[1] / "bench" / "search_quality.yaml"
ARCH_GMACS = {"resnet10t": 0.015, "mobilenetv3_small_050": 0.004, "blockwise_resnet": 0.001}
EPOCHS = 4  # the space's student epochs: MO-ASHA rungs at 1 and 3 (grace 1, η 3)


@pytest.fixture(scope="module")
def spec():
    return load_spec(SPACE)


def _point(params: dict, final: float) -> TablePoint:
    # rises linearly to `final`, so a trial's rank at a rung is its final rank
    curve = [final * (epoch / EPOCHS) for epoch in range(1, EPOCHS + 1)]
    side = params["student.resolution"]
    return TablePoint(params=params, metrics={"val_top1": final, "gmacs": ARCH_GMACS[params["student.arch"]] * side / 24,
                                              "params_m": 1.0, "pixels": float(side * side)},
                      student_val_top1=curve)


@pytest.fixture(scope="module")
def table(spec):
    points = []
    for params in grid_points(spec):
        arch_bonus = {"resnet10t": 0.2, "mobilenetv3_small_050": 0.1, "blockwise_resnet": 0.0}[params["student.arch"]]
        final = 0.3 + arch_bonus + params["student.resolution"] / 60 + (0.05 if params["distill.temperature"] == 1.0 else 0)
        points.append(_point(params, final))
    return SearchTable(points=points, space=training_space(spec))


def test_grid_is_every_combination_once(spec):
    grid = grid_points(spec)
    assert len(grid) == 3 * 4 * 2
    assert len({point_key(p) for p in grid}) == len(grid)


def test_whole_grid_reaches_its_own_hypervolume_in_any_order(spec, table):
    forward = hypervolume_curve(table.points, spec)
    backward = hypervolume_curve(table.points[::-1], spec)
    assert forward[-1] == pytest.approx(backward[-1])
    assert 0 < forward[-1] < 1
    # a strict subset that leaves out a frontier point is below it
    best = max(table.points, key=lambda p: p.metrics["val_top1"])
    assert hypervolume_curve([p for p in table.points if p is not best], spec)[-1] < forward[-1]


def test_random_search_curve_is_a_nondecreasing_fraction(spec, table):
    curve = sampler_curve(table, spec, "random", seed=0, trials=len(table.points))
    assert len(curve) == len(table.points)
    assert all(b >= a for a, b in zip(curve, curve[1:]))
    assert 0 < curve[0] and curve[-1] <= 1.0 + 1e-12


def test_same_seed_same_curve_and_tpe_uses_the_table(spec, table):
    first = sampler_curve(table, spec, "tpe", seed=3, trials=8)
    assert first == sampler_curve(table, spec, "tpe", seed=3, trials=8)


def test_summary_reads_medians_and_quartiles_at_the_budgets():
    curves = {"tpe": [[0.1, 0.5, 0.9], [0.2, 0.6, 1.0], [0.3, 0.7, 0.8]],
              "random": [[0.1, 0.2, 0.3], [0.1, 0.4, 0.5], [0.1, 0.3, 0.4]]}
    summary = summarise_curves(curves, [2, 3])
    assert summary["tpe"][2]["median"] == pytest.approx(0.6)
    assert summary["tpe"][3] == pytest.approx({"median": 0.9, "q25": 0.85, "q75": 0.95})
    targets = quality_targets(summary, "tpe", grid_size=9)  # 1/3 of 9 = budget 3
    assert targets["budget"] == 3 and targets["reaches_90"] and targets["margin_90"] == pytest.approx(0.0)
    assert targets["beats_random"] and targets["margin_vs_random"][3] == pytest.approx(0.5)
    missed = quality_targets(summarise_curves({"tpe": [[0.2, 0.3, 0.4]], "random": [[0.5, 0.6, 0.7]]}, [3]), "tpe", 9)
    assert not missed["reaches_90"] and not missed["beats_random"] and missed["margin_90"] == pytest.approx(-0.5)


def test_no_stopping_trains_every_epoch_and_keeps_the_grid(spec, table):
    plain = replay_early_stopping(table.points, spec, concurrency=2, stopping=False)
    assert plain["student_epochs"] == len(table.points) * EPOCHS
    assert len(plain["complete"]) == len(table.points)
    assert plain["hypervolume"] == pytest.approx(hypervolume_curve(table.points, spec)[-1])


def test_moasha_replay_stops_dominated_trials_and_never_trains_more(spec, table):
    # worst first, best last: every later trial beats the earlier ones, so little is stopped;
    # best first: later (dominated) trials are stopped at the first rung
    ordered = sorted(table.points, key=lambda p: p.metrics["val_top1"])
    for points in (ordered, ordered[::-1]):
        plain = replay_early_stopping(points, spec, concurrency=2, stopping=False)
        moasha = replay_early_stopping(points, spec, concurrency=2, stopping=True)
        assert moasha["student_epochs"] <= plain["student_epochs"]
        assert moasha["hypervolume"] <= plain["hypervolume"] + 1e-12
        assert set(moasha["complete"]) | set(moasha["stopped_at"]) == set(range(len(points)))
        assert set(moasha["stopped_at"].values()) <= {1, 3}  # the rungs of grace 1, η 3, 4 epochs
    best_first = replay_early_stopping(ordered[::-1], spec, concurrency=1, stopping=True)
    assert best_first["stopped_at"]  # something was stopped
    assert best_first["student_epochs"] < len(points) * EPOCHS
    # the best trial arrives first and always completes
    assert 0 in best_first["complete"]


def test_a_table_missing_a_point_is_refused(spec, table):
    check_complete(table, spec)
    partial = SearchTable(points=table.points[1:], space=table.space)
    with pytest.raises(ConfigError, match="no row"):
        check_complete(partial, spec)
    assert not math.isnan(hypervolume_curve(partial.points, spec)[-1])
