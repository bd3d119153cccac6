"""Idle trial slots lend their CPUs to the trials still running, in a sweep's tail.

Once a sweep has started its last trial, every trial that ends leaves its slot idle: on the quickstart
the last trial often trains alone for tens of seconds while the other CPU waits. Ray Tune has no way to
give a running trial more CPUs, but a trial's intra-op threads can change between two training steps
(`pxd.train.train_stage(cpu_threads=...)`). So:

- `IdleCpuLending`, a Tune callback in the driver, works out at every trial start and end how many CPUs of
  the sweep's slots (`search.max_concurrent` × `search.resources.cpu`) no trial holds or is about to hold,
  once no trial is left to start, and writes each running trial's extra threads to `cpu-shares.json` in the
  sweep's folder (`cpu_shares`);
- `orchestrator.stages.threads.SharedThreads`, in the trial, reads that file (at most once a second) and answers base + extra.

A trial that waits for a shared stage another trial is training (`orchestrator.stages.store`: the first
trials of a new student architecture share its assistant) holds an idle CPU too: it says so in
`cpu-waits/<trial id>.json` (the stage key and its threads), and the trial training that stage adds those
threads while it does.

Only for a sweep on pxd's own local Ray (no `--ray-address`, one node): every trial then runs on this machine and
reads the driver's file, and the sweep owns every CPU of that Ray instance. Off with
`search.lend_idle_cpus: false`. A stage gives its lent threads back when it ends (latency is timed on the
trial's own threads), and records the time-weighted mean as `train_threads`. A different thread count
changes float summation order, so a tail trial's numbers can differ in the last digits from a run on one
thread.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ray
from ray import tune

from orchestrator.driver.budget import read_budget
from orchestrator.stages.threads import SHARES_FILE, WAITS_DIR, wait_path, write_shares

__all__ = ["IdleCpuLending", "cpu_shares"]

logger = logging.getLogger(__name__)

_RUNNING, _PENDING = "RUNNING", "PENDING"


def cpu_shares(statuses: Iterable[tuple[str, str]], *, budget: int, slot_cpus: float, cpu_per_trial: float
               ) -> dict[str, int]:
    """Extra threads for each running trial: `statuses` is (trial id, Tune status) for every trial of the
    sweep; nothing is lent while trials are still to be created (fewer than `budget`), since a new trial
    would then find its CPU taken. The CPUs of the slots (`slot_cpus`) that no running or pending trial
    holds are shared out evenly among the running trials, the first ones getting the remainder. Counted in
    threads: a trial runs at least one whatever its share of a CPU (Ray sets OMP_NUM_THREADS ≥ 1)."""
    statuses = list(statuses)
    if len(statuses) < budget:
        return {}
    running = [trial_id for trial_id, status in statuses if status == _RUNNING]
    holding = len(running) + sum(status == _PENDING for _, status in statuses)
    free = int(slot_cpus + 1e-9) - holding * max(1, int(cpu_per_trial + 1e-9))
    if not running or free <= 0:
        return {}
    each, remainder = divmod(free, len(running))
    shares = {trial_id: each + (index < remainder) for index, trial_id in enumerate(running)}
    return {trial_id: extra for trial_id, extra in shares.items() if extra > 0}


class IdleCpuLending(tune.Callback):
    """Writes `cpu_shares` for the sweep's trials to `sweep_dir/cpu-shares.json` whenever a trial starts or
    ends (the budget is read from the launch's budget file: a resume may raise it). The slots hold
    `max_concurrent × cpu_per_trial` CPUs within the local Ray's, counted when a launch starts (a resume
    restores this callback from the first launch's pickles, maybe on another machine). A file it cannot
    write lends nothing more and is logged; it never fails the trial Tune is calling back about."""

    def __init__(self, sweep_dir: Path, budget_path: Path, *, max_concurrent: int, cpu_per_trial: float) -> None:
        self.path = Path(sweep_dir) / SHARES_FILE
        self.budget_path = Path(budget_path)
        self.max_concurrent = max_concurrent
        self.cpu_per_trial = cpu_per_trial
        self.slot_cpus = 0.0
        self._written: dict[str, int] | None = None

    def setup(self, **info: Any) -> None:

        self.slot_cpus = min(self.cpu_per_trial * self.max_concurrent, float(ray.cluster_resources().get("CPU", 0.0)))
        self._written = None
        self._update([], ended=None)  # nothing lent from an earlier launch
        for wait in (self.path.parent / WAITS_DIR).glob("*.json"):
            self._withdraw(wait)

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._update(trials, ended=None)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._withdraw(wait_path(self.path.parent, str(trial.trial_id)))
        self._update(trials, ended=trial)

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        # its process died (it is run again): a wait it had written cannot be withdrawn by it
        self._withdraw(wait_path(self.path.parent, str(trial.trial_id)))
        self._update(trials, ended=None)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._withdraw(wait_path(self.path.parent, str(trial.trial_id)))
        self._update(trials, ended=trial)

    def _update(self, trials: list[Any], *, ended: Any) -> None:
        # Tune calls back before it sets a completing trial's status: that one no longer holds its slot
        statuses = [(t.trial_id, "TERMINATED" if t is ended else t.status) for t in trials]
        budget = int(read_budget(self.budget_path).get("trials", len(statuses) + 1))
        shares = cpu_shares(statuses, budget=budget, slot_cpus=self.slot_cpus, cpu_per_trial=self.cpu_per_trial)
        if shares != self._written:
            try:
                write_shares(self.path, shares)
                self._written = shares
            except OSError as error:
                logger.warning("idle CPUs not lent: cannot write %s: %s", self.path, error)

    @staticmethod
    def _withdraw(wait: Path) -> None:
        try:
            wait.unlink(missing_ok=True)
        except OSError as error:
            logger.warning("cannot withdraw a dead trial's wait %s: %s", wait, error)


