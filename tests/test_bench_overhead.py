"""bench/overhead.py's split of a sweep's slot time: its parts add up to wall × concurrency, and each part
is what the benchmark says it is."""

from __future__ import annotations

import pytest

from bench.overhead import SLOT_USES, _share, _slot_seconds


def _run(wall: float, trained: float, stages: float) -> dict[str, float]:
    return {"wall_s": wall, "trained_s": trained, "stages": stages}


def test_the_slot_time_split_adds_up_and_names_each_part():
    # 2 slots: start-up 10 s, teacher warm-up 30 s (the teacher trained 24 s), trial phase 50 s, wind-down 2 s
    phases = {"start_up": 10.0, "teacher_warm_up": 30.0, "trial_phase": 50.0, "wind_down": 2.0}
    rows = [_run(20.0, 15.0, 3.0), _run(25.0, 22.0, 0.5), _run(40.0, 36.0, 1.0)]
    stage_seconds = 24.0 + 15.0 + 22.0 + 36.0
    parts = _slot_seconds(rows, phases, stage_seconds, concurrency=2)
    assert list(parts) == list(SLOT_USES)
    assert sum(parts.values()) == pytest.approx(sum(phases.values()) * 2)
    assert parts["training"] == stage_seconds
    assert parts["warm_up_idle"] == pytest.approx(30.0 * 2 - 24.0)
    assert parts["stage_waits"] == pytest.approx(4.5)
    assert parts["run_overhead"] == pytest.approx((85.0 - 73.0) - 4.5)
    assert parts["idle_slots"] == pytest.approx(50.0 * 2 - 85.0)
    result = {"slot_seconds": parts}
    assert sum(_share(result, use) for use in SLOT_USES) == pytest.approx(1.0)
    assert _share(result, "training") == pytest.approx(stage_seconds / 184.0)


def test_a_sweep_without_trials_has_no_split():
    assert _slot_seconds([], {}, 0.0, concurrency=2) == {}
