"""The frontier of a sweep's rows: eligibility, order, hypervolume of rows, table files, live updates
(the dominance and hypervolume routines themselves: test_pareto.py)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from orchestrator.results.frontier import (
    TrialRow,
    eligible,
    format_table,
    frontier_table,
    hypervolume_of_rows,
    write_table,
)
from orchestrator.results.pareto import hypervolume

INF = math.inf
NAN = math.nan
OBJECTIVES = [("val_top1", "max"), ("gmacs", "min")]


def front_ids(rows, objectives) -> list[str]:
    """Trial ids on the frontier, in the table's order (best first on the first objective)."""
    return [r["trial_id"] for r in frontier_table(rows, objectives, None)["rows"] if r["on_frontier"]]


def row(trial_id: str, top1: float, gmacs: float, **kwargs) -> TrialRow:
    kwargs.setdefault("state", "COMPLETE")
    return TrialRow(
        trial_id=trial_id,
        run_id=f"run-{trial_id}",
        metrics={"val_top1": top1, "gmacs": gmacs, "pixels": 1024.0},
        params={"arch": "resnet18", "lr": 0.01},
        **kwargs,
    )


# --- frontier of rows ------------------------------------------------------------------------


def test_frontier_mixes_max_and_min_and_sorts_best_first() -> None:
    rows = [
        row("cheap", 0.60, 0.1),
        row("accurate", 0.90, 1.0),
        row("middle", 0.80, 0.5),
        row("worse", 0.70, 0.6),  # dominated by middle: less accurate and more expensive
        row("twin", 0.80, 0.5),  # identical to middle: both stay
    ]
    assert front_ids(rows, OBJECTIVES) == ["accurate", "middle", "twin", "cheap"]


def test_ineligible_rows_never_on_frontier_even_if_they_would_dominate() -> None:
    good = row("good", 0.8, 0.5)
    dominating = dict(top1=0.99, gmacs=0.01)
    rows = [
        good,
        row("failed", **dominating, state="FAILED"),
        row("pruned", **dominating, state="PRUNED"),
        row("running", **dominating, state="RUNNING"),
        row("infeasible", **dominating, feasible=False),
        row("nan", NAN, 0.01),
    ]
    missing = row("missing", 0.99, 0.01)
    del missing.metrics["gmacs"]
    rows.append(missing)
    assert [r.trial_id for r in eligible(rows, OBJECTIVES)] == ["good"]
    assert front_ids(rows, OBJECTIVES) == ["good"]


def test_frontier_of_nothing_eligible_is_empty() -> None:
    assert front_ids([row("x", 0.5, 1.0, state="FAILED")], OBJECTIVES) == []


# --- hypervolume -----------------------------------------------------------------------------


def test_hypervolume_max_and_min_in_original_units() -> None:
    # (top1 0.8, gmacs 0.5) covers top1 in [0, 0.8] x gmacs in [0.5, 1] = 0.4;
    # (0.6, 0.2) covers 0.6 * 0.8 = 0.48; their overlap [0, 0.6] x [0.5, 1] = 0.3. Total 0.58.
    points = np.array([[0.8, 0.5], [0.6, 0.2]])
    assert hypervolume(points, ["max", "min"], [0.0, 1.0]) == pytest.approx(0.58)
    rows = [row("a", 0.8, 0.5), row("b", 0.6, 0.2), row("failed", 1.0, 0.0, state="FAILED")]
    reference = {"val_top1": 0.0, "gmacs": 1.0}
    assert hypervolume_of_rows(rows, OBJECTIVES, reference) == pytest.approx(0.58)


def test_infinite_metric_is_eligible_and_compared() -> None:
    rows = [row("unmeasured", 0.9, INF), row("cheap", 0.5, 0.1), row("worse", 0.4, INF)]
    assert front_ids(rows, OBJECTIVES) == ["unmeasured", "cheap"]


def test_reference_must_be_finite_and_complete() -> None:
    with pytest.raises(ValueError, match="reference_point"):
        hypervolume(np.array([[1.0, 1.0]]), ["min", "min"], [INF, 2.0])
    with pytest.raises(ValueError, match="reference_point.gmacs"):
        hypervolume_of_rows([row("a", 0.5, 0.5)], OBJECTIVES, {"val_top1": 0.0})


# --- table -----------------------------------------------------------------------------------


def sweep_rows() -> list[TrialRow]:
    return [
        row("dominated", 0.70, 1.2),  # accurate is better on both
        row("cheap", 0.60, 0.1),
        row("accurate", 0.90, 1.0),
        row("failed", 0.99, 0.01, state="FAILED"),
    ]


def test_frontier_table_marks_and_orders_rows() -> None:
    table = frontier_table(sweep_rows(), OBJECTIVES, {"val_top1": 0.0, "gmacs": 2.0})
    assert table["n_eligible"] == 3 and table["n_frontier"] == 2
    assert [(r["trial_id"], r["on_frontier"]) for r in table["rows"]] == [
        ("accurate", True),
        ("cheap", True),
        ("dominated", False),
    ]
    # accurate covers 0.9 x [1, 2] = 0.9; cheap covers 0.6 x [0.1, 2] = 1.14; overlap 0.6 x 1 = 0.6.
    assert table["hypervolume"] == pytest.approx(0.9 + 1.14 - 0.6)
    assert table["rows"][0]["run_id"] == "run-accurate"
    assert table["rows"][0]["params"] == {"arch": "resnet18", "lr": 0.01}


def test_write_table_csv_and_json_are_readable(tmp_path) -> None:
    rows = sweep_rows()
    rows[1].metrics["latency_ms"] = INF  # strict JSON has no Infinity: must still be readable
    table = frontier_table(rows, OBJECTIVES, {"val_top1": 0.0, "gmacs": 2.0})
    paths = write_table(table, tmp_path / "out")
    assert sorted(p.name for p in paths) == ["frontier.csv", "frontier.json"]

    with (tmp_path / "out" / "frontier.csv").open(newline="") as handle:
        lines = list(csv.DictReader(handle))
    assert [(line["trial_id"], line["on_frontier"]) for line in lines] == [
        ("accurate", "True"),
        ("cheap", "True"),
        ("dominated", "False"),
    ]
    assert float(lines[1]["val_top1"]) == 0.60 and float(lines[1]["latency_ms"]) == INF
    assert lines[0]["params.arch"] == "resnet18" and lines[0]["run_id"] == "run-accurate"

    text = (tmp_path / "out" / "frontier.json").read_text()
    loaded = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard {name}"))
    assert loaded["hypervolume"] == pytest.approx(table["hypervolume"])
    assert [r["trial_id"] for r in loaded["rows"] if r["on_frontier"]] == ["accurate", "cheap"]
    assert float(loaded["rows"][1]["metrics"]["latency_ms"]) == INF


def test_table_without_reference_has_no_hypervolume() -> None:
    table = frontier_table(sweep_rows(), OBJECTIVES, None)
    assert table["hypervolume"] is None and table["n_frontier"] == 2
    assert "no reference point" in format_table(table)


def test_format_table_marks_frontier_rows_and_truncates() -> None:
    table = frontier_table(sweep_rows(), OBJECTIVES, {"val_top1": 0.0, "gmacs": 2.0})
    lines = format_table(table).splitlines()
    assert lines[0].split()[:4] == ["trial_id", "run_id", "val_top1", "gmacs"]
    assert lines[1].startswith("*") and "accurate" in lines[1]
    assert lines[2].startswith("*") and "cheap" in lines[2]
    assert not lines[3].startswith("*") and "dominated" in lines[3]
    # Fixed width: every column starts at the same offset on every line.
    assert len({line.index("run-") for line in lines[1:4]}) == 1
    short = format_table(table, max_rows=1)
    assert "1 more" not in short and "2 more eligible trials not shown" in short
    assert "dominated" not in short


# --- incremental updates ------------------------------------------------------------------------


def test_incremental_frontier_equals_the_table_after_every_trial():
    from orchestrator.results.frontier import IncrementalFrontier

    objectives = [("val_top1", "max"), ("gmacs", "min"), ("pixels", "min")]
    reference = {"val_top1": 0.0, "gmacs": 1.0, "pixels": 4096.0}
    ideal = {"val_top1": 1.0, "gmacs": 0.0, "pixels": 0.0}
    rng = np.random.default_rng(0)
    live = IncrementalFrontier(objectives, reference, ideal)
    rows = []
    for index in range(150):
        metrics = {"val_top1": float(rng.integers(0, 20)) / 20, "gmacs": float(rng.integers(1, 12)) / 10,
                   "pixels": float(rng.choice([256, 1024, 2304, 4096, 5000]))}
        rows.append(TrialRow(str(index), None, metrics, {}, "COMPLETE"))
        live.add(metrics)
        table = frontier_table(rows, objectives, reference, ideal)
        assert live.size == table["n_frontier"]
        assert live.hypervolume == pytest.approx(table["hypervolume"])
        assert live.normalised == pytest.approx(table["hypervolume_normalised"])
    assert 0 < live.normalised < 1


def test_normalised_hypervolume_is_the_fraction_of_the_reference_to_ideal_box():
    rows = [row("a", 0.8, 0.5), row("b", 0.6, 0.2)]
    table = frontier_table(rows, OBJECTIVES, {"val_top1": 0.0, "gmacs": 1.0}, {"val_top1": 1.0, "gmacs": 0.0})
    assert table["hypervolume_normalised"] == pytest.approx(0.58)  # the box is 1 × 1
    table = frontier_table(rows, OBJECTIVES, {"val_top1": 0.0, "gmacs": 2.0}, {"val_top1": 1.0, "gmacs": 0.0})
    assert table["hypervolume_normalised"] == pytest.approx(table["hypervolume"] / 2.0)


def test_the_sweep_summary_says_failed_and_stopped_trials_count_toward_the_budget():
    from orchestrator.driver.finish import summary
    from orchestrator.driver.launch import SweepOutcome

    objectives = [("val_top1", "max"), ("gmacs", "min")]
    rows = [row("a", 0.8, 0.2), row("b", 0.0, 0.0, state="FAILED"), row("c", 0.5, 0.1, state="PRUNED"),
            row("d", 0.6, 0.1)]
    table = frontier_table(rows, objectives, {"val_top1": 0.0, "gmacs": 1.0}, {"val_top1": 1.0, "gmacs": 0.0})
    text = summary(SweepOutcome("qs-1", "p", "1", "http://127.0.0.1:5000", table, rows, "mlflow ui", trials_budget=4))
    assert "1 failed · 1 stopped" in text
    assert "to run 2 more, resume with it raised by as many (--resume --name qs-1 --set search.trials=6)" in text
    clean = summary(SweepOutcome("qs-2", "p", "1", "http://127.0.0.1:5000", table, [rows[0], rows[3]], "mlflow ui",
                                 trials_budget=2))
    assert "resume with it raised" not in clean
