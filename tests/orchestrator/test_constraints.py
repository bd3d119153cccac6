"""Hard limits in one convention (`orchestrator.space.constraints`), the sampler table
(`orchestrator.space.samplers`), and `pxd select`'s limits and ranking, which use the same convention."""

from __future__ import annotations

import math

import optuna
import pytest

from orchestrator.results.select import Limits, choose
from orchestrator.space.constraints import broken_before_training, constraint_values, is_feasible, violation
from orchestrator.space.samplers import SAMPLERS, Sampler
from orchestrator.space.spec import make_sampler, parse_spec
from pxd.errors import ConfigError
from pxd.metrics import Mode
from tests.orchestrator.test_spec import small_space


def test_a_limit_bounds_the_worse_side_of_its_metric():
    assert violation(Mode.MIN, 0.25, 0.5) == -0.25  # max_gmacs 0.5 at 0.25: met
    assert violation(Mode.MAX, 0.75, 0.6) == pytest.approx(-0.15)  # min_val_top1 0.6 at 0.75: met
    assert violation(Mode.MAX, 0.5, 0.6) == pytest.approx(0.1)
    assert violation(Mode.MIN, None, 0.5) == math.inf and violation(Mode.MIN, math.nan, 0.5) == math.inf


def test_a_space_and_its_search_section_are_judged_alike():
    raw = small_space()
    raw["search"]["constraints"] = {"max_gmacs": 0.5, "max_pixels": 300}
    spec = parse_spec(raw)
    metrics = {"gmacs": 0.75, "pixels": 256.0}
    assert constraint_values(spec, metrics) == constraint_values(spec.require_search(), metrics) == [0.25, -44.0]
    assert not is_feasible(spec, metrics) and is_feasible(spec, {"gmacs": 0.5, "pixels": 300.0})
    broken, values = broken_before_training(spec, {"gmacs": 0.75, "pixels": 256.0})
    assert broken == ["gmacs 0.75 > max_gmacs 0.5"] and values == [0.25, -44.0]


def test_a_new_sampler_is_one_row(monkeypatch):
    monkeypatch.setitem(SAMPLERS, "qmc", Sampler(optuna.samplers.QMCSampler, {"scramble": True}))
    raw = small_space()
    raw["search"]["sampler"] = {"name": "qmc", "options": {"qmc_type": "halton"}}
    sampler = make_sampler(parse_spec(raw))
    assert type(sampler) is optuna.samplers.QMCSampler and sampler._scramble and sampler._qmc_type == "halton"
    raw["search"]["sampler"] = {"name": "qmc", "options": {"populaton_size": 4}}
    with pytest.raises(ConfigError) as error:
        parse_spec(raw)
    assert error.value.field == "search.sampler.options.populaton_size"


def test_an_unknown_sampler_names_every_row():
    raw = small_space()
    raw["search"]["sampler"] = {"name": "cmaes"}
    with pytest.raises(ConfigError) as error:
        parse_spec(raw)
    assert error.value.field == "search.sampler.name" and all(name in error.value.message for name in SAMPLERS)


def _front(*points: tuple[str, float, float, float]) -> dict:
    rows = [{"run_id": run, "on_frontier": True, "metrics": {"val_top1": top1, "latency_ms": latency, "gmacs": gmacs,
                                                             "pixels": 256.0}, "params": {}}
            for run, top1, latency, gmacs in points]
    return {"rows": rows, "objectives": [{"name": "val_top1", "mode": "max"}, {"name": "gmacs", "mode": "min"}]}


def test_select_picks_the_best_primary_metric_among_the_points_meeting_every_limit():
    table = _front(("a", 0.9, 5.0, 2.0), ("b", 0.8, 2.0, 1.0), ("c", 0.8, 1.0, 1.5), ("d", 0.6, 0.5, 0.5))
    assert choose(table, Limits(), "latency_ms").row["run_id"] == "a"
    assert choose(table, Limits(max_gmacs=1.5), "latency_ms").row["run_id"] == "c"  # tie on top1: lower latency
    assert choose(table, Limits(max_gmacs=1.5, min_top1=0.7, max_latency_ms=1.5), "latency_ms").row["run_id"] == "c"
    with pytest.raises(ConfigError) as error:
        choose(table, Limits(min_top1=0.95), "latency_ms")
    assert error.value.field == "--min-top1" and "the best val_top1 on the frontier is 0.9" in error.value.message
