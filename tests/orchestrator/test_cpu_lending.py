"""Idle trial slots lend their CPUs to the trials still running, once no trial is left to start."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from orchestrator.driver.budget import write_budget
from orchestrator.driver.lending import IdleCpuLending, cpu_shares
from orchestrator.stages.threads import SHARES_FILE, WAITS_DIR, SharedThreads


def _statuses(*pairs: str) -> list[tuple[str, str]]:
    return [(f"t{index}", status) for index, status in enumerate(pairs)]


@pytest.mark.parametrize(("statuses", "budget", "slots", "cpu", "expected"), [
    # trials still to be created: a new one would find its CPU taken
    (_statuses("RUNNING", "TERMINATED"), 3, 2.0, 1.0, {}),
    # the tail of the quickstart: the last trial alone gets the other slot's CPU
    (_statuses("TERMINATED", "RUNNING", "TERMINATED"), 3, 2.0, 1.0, {"t1": 1}),
    # every slot busy: nothing to lend
    (_statuses("RUNNING", "RUNNING"), 2, 2.0, 1.0, {}),
    # a pending trial is about to take a slot
    (_statuses("RUNNING", "PENDING", "TERMINATED"), 3, 2.0, 1.0, {}),
    # 8 slots, 3 running: 5 idle CPUs, shared out evenly, the first ones getting the remainder
    (_statuses("RUNNING", "RUNNING", "RUNNING", "TERMINATED", "ERROR"), 5, 8.0, 1.0, {"t0": 2, "t1": 2, "t2": 1}),
    # 2-CPU trials: one running of four slots leaves 6 CPUs
    (_statuses("RUNNING", "TERMINATED"), 2, 8.0, 2.0, {"t0": 6}),
    # fractional trials (4 × 0.5 CPU on 2 CPUs) still run a whole thread each: one running lends it one more,
    (_statuses("RUNNING", "TERMINATED", "TERMINATED", "TERMINATED"), 4, 2.0, 0.5, {"t0": 1}),
    # two running hold both CPUs already
    (_statuses("RUNNING", "RUNNING", "TERMINATED", "TERMINATED"), 4, 2.0, 0.5, {}),
    # nothing running
    (_statuses("TERMINATED", "TERMINATED"), 2, 2.0, 1.0, {}),
    # a resume that raised the budget: its new trials are still to come
    (_statuses("TERMINATED", "RUNNING"), 4, 2.0, 1.0, {}),
])
def test_cpu_shares(statuses, budget, slots, cpu, expected):
    assert cpu_shares(statuses, budget=budget, slot_cpus=slots, cpu_per_trial=cpu) == expected


def _trial(trial_id: str, status: str) -> SimpleNamespace:
    """What the callback reads of a Tune trial: its id and status."""
    return SimpleNamespace(trial_id=trial_id, status=status)


def test_the_driver_lends_as_trials_end_and_the_trial_reads_it(ray_local, tmp_path):
    """Statuses as Tune has them when it calls back: a starting trial is still PENDING, a completing one
    still RUNNING (its stop is scheduled after the callback)."""
    write_budget(tmp_path, trials=3, timeout_s=None)
    (tmp_path / SHARES_FILE).write_text(json.dumps({"a": 5}))  # left by an earlier launch
    (tmp_path / WAITS_DIR).mkdir()
    (tmp_path / WAITS_DIR / "z.json").write_text(json.dumps({"key": "k", "threads": 1}))  # a killed waiter's
    lending = IdleCpuLending(tmp_path, tmp_path / "budget.json", max_concurrent=2, cpu_per_trial=1.0)
    reads = SharedThreads(tmp_path / SHARES_FILE, "b", base=1, interval_s=0.0)

    lending.setup()  # the local Ray has 2 CPUs: two slots of one
    assert json.loads((tmp_path / SHARES_FILE).read_text()) == {}, "an earlier launch's shares are dropped"
    assert not list((tmp_path / WAITS_DIR).glob("*.json")), "and its waits"
    a, b = _trial("a", "RUNNING"), _trial("b", "PENDING")
    lending.on_trial_start(iteration=1, trials=[a, b], trial=b)
    b.status = "RUNNING"
    c = _trial("c", "PENDING")
    lending.on_trial_start(iteration=2, trials=[a, b, c], trial=c)
    lending.on_trial_complete(iteration=3, trials=[a, b, c], trial=a)
    assert reads() == 1, "c is about to take a's slot: b keeps its own thread"
    a.status, c.status = "TERMINATED", "RUNNING"
    lending.on_trial_complete(iteration=4, trials=[a, b, c], trial=c)  # the tail: c ends, still RUNNING to Tune
    assert json.loads((tmp_path / SHARES_FILE).read_text()) == {"b": 1}
    assert reads() == 2, "the last trial running gets the idle slot's CPU"

    SharedThreads(tmp_path / SHARES_FILE, "b", base=1).start_waiting("k")  # b's process dies while it waits
    lending.on_trial_recover(iteration=5, trials=[a, b, c], trial=b)
    assert not list((tmp_path / WAITS_DIR).glob("*.json")), "a dead attempt's wait is withdrawn for it"

    write_budget(tmp_path, trials=4, timeout_s=None)  # a resume raised the budget: one more trial to come
    lending.on_trial_start(iteration=6, trials=[a, b, c], trial=b)
    assert reads() == 1


def test_a_trial_reads_the_shares_at_most_once_per_interval(tmp_path):
    path = tmp_path / SHARES_FILE
    reads = SharedThreads(path, "t0", base=2, interval_s=3600.0)
    assert reads() == 2, "no file yet: the trial's own threads"
    path.write_text(json.dumps({"t0": 2}))
    assert reads() == 2, "not read again within the interval"
    fresh = SharedThreads(path, "t0", base=2, interval_s=0.0)
    assert fresh() == 4
    path.write_text("{not json")
    os.utime(path, ns=(1, 1))
    assert fresh() == 2, "a file it cannot read lends nothing"


def test_a_trial_waiting_for_a_stage_lends_its_threads_to_the_trial_training_it(mlflow_server, tmp_path):
    """Two trials need one new assistant: the one that trains it gets the waiting trial's thread until it is
    stored, and the waiter withdraws once it has the stage (real MLflow server, one lease table)."""
    import threading
    import uuid

    import torch

    from orchestrator.stages.leases import LocalLeases
    from orchestrator.stages.store import MlflowStageStore
    from pxd.train import StageResult

    shares = tmp_path / SHARES_FILE
    leases = LocalLeases()
    trainer_threads = SharedThreads(shares, "trainer_00000", base=1, interval_s=0.0)
    waiter_threads = SharedThreads(shares, "waiter_00001", base=1, interval_s=0.0)
    trainer = MlflowStageStore(mlflow_server, leases=leases, poll_s=0.05, wait_timeout_s=60, lending=trainer_threads)
    waiter = MlflowStageStore(mlflow_server, leases=leases, poll_s=0.05, wait_timeout_s=60, lending=waiter_threads)
    key = f"lend-{uuid.uuid4().hex}"
    training, seen, outcomes = threading.Event(), [], {}

    def train() -> StageResult:
        training.set()
        for _ in range(400):  # until the waiter's thread arrives (or 20 s)
            seen.append(trainer_threads())
            if seen[-1] == 2:
                break
            threading.Event().wait(0.05)
        return StageResult("assistant", {"w": torch.ones(2)}, {"val_top1": 0.5, "train_seconds": 0.1})

    first = threading.Thread(target=lambda: outcomes.setdefault("trainer", trainer.get_or_train(
        "assistant", key, {"arch": "lend-test"}, train)))
    first.start()
    assert training.wait(30)
    second = threading.Thread(target=lambda: outcomes.setdefault("waiter", waiter.get_or_train(
        "assistant", key, {"arch": "lend-test"}, train)))
    second.start()
    first.join(60)
    second.join(60)
    assert seen[0] == 1 and seen[-1] == 2, "the trainer got the waiting trial's thread"
    assert not outcomes["trainer"].reused and outcomes["waiter"].reused
    assert list((tmp_path / WAITS_DIR).glob("*.json")) == [], "the waiter withdrew"
    assert trainer_threads() == 1, "the lent thread goes back once the stage is stored"
