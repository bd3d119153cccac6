"""Multi-objective early stopping (MO-ASHA: Schmucker et al. 2021; Salinas et al. 2022, Syne Tune's
`moasha.py`), as a Ray Tune scheduler.

Rungs are student epochs `grace_period × η^k` (below the student's epochs). When a trial's student
reaches a rung, its point is recorded there: its current primary metric, `val_top1` (the student
stage's per-epoch validation accuracy, `pxd.metrics.primary_metric`) and its cost objectives known before training (`gmacs`, `params_m`, `pixels`, which
trials report from their first epoch). Among the points recorded at that rung so far, the trial goes on
if it is within the best `ceil(n / η)` by non-dominated sorting (Pareto rank, ties broken by crowding
distance, as NSGA-II does; both from `orchestrator.results.pareto`), or — with `keep_front` (the default) — if no other point at the rung
dominates it; otherwise it is stopped. So only the dominated fraction is stopped: a trial on the rung's
current Pareto front is, on the evidence so far, a frontier point, and stopping it can only lose
hypervolume (classic MO-ASHA, `keep_front=False`, stops front points too once the front holds more than
1/η of the rung). Objectives known only after training (`latency_ms`) are not part of the ranking.

A stopped trial has no final result: the searcher tells Optuna PRUNED (Ray hands the searcher a stopped
trial's last partial result; pxd's searcher only takes a report marked `done`), its MLflow run is tagged
with the reason now and recorded PRUNED when the sweep ends, and it never enters the frontier. The rung
records live in `sweeps/<name>/early_stopping.json`, so a resumed sweep keeps them (Tune does not save
a scheduler's state).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from orchestrator.results import schema
from orchestrator.results.pareto import crowding_distance, dominates, nondominated_ranks
from orchestrator.results.schema import ReportKey
from orchestrator.tracking import credentials
from orchestrator.tracking.server import restored_tracking_uri
from pxd.metrics import Mode, primary_metric

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

    from orchestrator.space.search import EarlyStoppingConfig

__all__ = ["MOASHA", "STATE_FILE", "rungs", "keep_best", "goes_on"]

STATE_FILE = "early_stopping.json"


def rungs(grace_period: int, reduction_factor: int, max_t: int) -> list[int]:
    """Rung epochs `grace × η^k` strictly below `max_t` (a trial at max_t is finished, not judged)."""
    levels, level = [], grace_period
    while level < max_t:
        levels.append(level)
        level *= reduction_factor
    return levels


def keep_best(points: Sequence[Sequence[float]], fraction: float) -> set[int]:
    """Indices of the best `ceil(n × fraction)` points: by Pareto rank, then larger crowding distance,
    then order of arrival (earlier first)."""
    n = len(points)
    if n == 0:
        return set()
    ranks = nondominated_ranks(points)
    crowding: dict[int, float] = {}
    for rank in set(ranks):
        members = [i for i in range(n) if ranks[i] == rank]
        crowding.update(zip(members, crowding_distance([points[i] for i in members])))
    order = sorted(range(n), key=lambda i: (ranks[i], -crowding[i], i))
    return set(order[:max(1, math.ceil(n * fraction))])


def goes_on(points: Sequence[Sequence[float]], index: int, fraction: float, keep_front: bool) -> bool:
    """Whether the point at `index` among a rung's `points` goes on: among the best `ceil(n × fraction)`
    (`keep_best`), or, with `keep_front`, not dominated by any other point there."""
    if index in keep_best(points, fraction):
        return True
    return keep_front and not any(dominates(other, points[index]) for j, other in enumerate(points) if j != index)


class MOASHA(FIFOScheduler):
    """Asynchronous successive halving on Pareto ranks. `objectives`: [(metric, mode), ...] of the
    space; the primary metric (`val_top1`) is read from the student's per-epoch report, the other
    (known-before-training) ones from the trial's reports."""

    def __init__(self, objectives: Sequence[tuple[str, str]], *, grace_period: int, reduction_factor: int,
                 max_t: int, state_path: str | Path, tracking_uri: str | None = None,
                 keep_front: bool = True) -> None:
        super().__init__()
        self._keep_front = bool(keep_front)
        self._objectives = [tuple(pair) for pair in objectives]
        self._eta = int(reduction_factor)
        self._rungs = rungs(int(grace_period), self._eta, int(max_t))
        self._state_path = str(state_path)
        self._tracking_uri = tracking_uri
        self._records: dict[str, dict[str, list[float]]] | None = None  # rung → trial id → point

    @classmethod
    def from_config(cls, objectives: Sequence[tuple[str, str]], early: EarlyStoppingConfig, *, max_t: int,
                    state_path: str | Path, tracking_uri: str | None = None) -> MOASHA:
        """The scheduler a space's `search.early_stopping` section describes."""
        return cls(objectives, grace_period=early.grace_period, reduction_factor=early.reduction_factor,
                   max_t=max_t, keep_front=early.keep_front, state_path=state_path, tracking_uri=tracking_uri)

    # -- state, kept beside the sweep so that a resume continues with it
    def _load(self) -> dict[str, dict[str, list[float]]]:
        if self._records is None:
            try:
                self._records = json.loads(Path(self._state_path).read_text())["rungs"]
            except (OSError, ValueError, KeyError):
                self._records = {}
        return self._records

    def _save(self) -> None:
        tmp = f"{self._state_path}.tmp"
        Path(tmp).write_text(json.dumps({"rungs": self._records, "eta": self._eta, "levels": self._rungs}))
        os.replace(tmp, self._state_path)

    def _point(self, result: dict[str, Any]) -> list[float] | None:
        """The trial's point to minimise, or None when a coordinate is missing."""
        point = []
        for metric, mode in self._objectives:
            value = result.get(schema.epoch_metric("student") if metric == primary_metric() else metric)
            if not isinstance(value, (int, float)) or math.isnan(value):
                return None
            point.append(Mode(mode).sign * float(value))
        return point

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        if result.get(ReportKey.STAGE) != "student" or result.get(ReportKey.FINAL):
            return TrialScheduler.CONTINUE
        epoch = result.get(ReportKey.EPOCH)
        if not isinstance(epoch, int) or epoch not in self._rungs:
            return TrialScheduler.CONTINUE
        point = self._point(result)
        if point is None:
            return TrialScheduler.CONTINUE
        records = self._load().setdefault(str(epoch), {})
        records[trial.trial_id] = point
        self._save()
        ids = list(records)
        if goes_on([records[i] for i in ids], ids.index(trial.trial_id), 1.0 / self._eta, self._keep_front):
            return TrialScheduler.CONTINUE
        self._tag_stopped(result, epoch, len(ids))
        return TrialScheduler.STOP

    def _tag_stopped(self, result: dict[str, Any], epoch: int, n: int) -> None:
        """Say why on the trial's run now; the sweep records it PRUNED (status KILLED) when it ends."""
        run_id = result.get(ReportKey.MLFLOW_RUN_ID)
        if not self._tracking_uri or not run_id:
            return
        from mlflow.tracking import MlflowClient  # mlflow: imported on first use (start-up cost)

        keep = max(1, math.ceil(n / self._eta))
        reason = (f"stopped early by MO-ASHA at student epoch {epoch}: not among the best {keep} of {n} trials "
                  f"at that rung by Pareto rank on {', '.join(m for m, _ in self._objectives)}"
                  + (", and dominated there" if self._keep_front else ""))
        try:
            MlflowClient(self._tracking_uri).set_tag(run_id, schema.Tag.STOPPED_REASON, reason)
        except Exception:  # noqa: BLE001 - a tag is bookkeeping; the stop itself must happen
            pass

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles the scheduler into the sweep's folder (tuner.pkl): no password from the tracking URL
        uri = self._tracking_uri and credentials.without_password(self._tracking_uri)
        return {**self.__dict__, "_tracking_uri": uri, "_records": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        uri = state["_tracking_uri"]
        self.__dict__.update({"_keep_front": True, **state, "_tracking_uri": uri and restored_tracking_uri(uri)})

    def debug_string(self) -> str:
        front = " and the rung's Pareto front" if self._keep_front else ""
        return f"MO-ASHA: rungs at student epochs {self._rungs}, keep 1/{self._eta}{front}"
