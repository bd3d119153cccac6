"""A sweep's budget (`search.trials`, `search.timeout_s`) as set by its latest launch.

Tune restores a resumed experiment's sample target and stopper from the first launch's pickles, so a
`--resume` that raises `search.trials` or `search.timeout_s` would otherwise run with the old budget.
Each launch writes the budget it runs under to `sweeps/<name>/budget.json`; the search generator and the
stopper below read it there, whatever Tune restored:

- `search.trials` counts every trial of the sweep, across launches (as Optuna's study does): raising it
  from 8 to 12 on resume runs 4 more.
- `search.timeout_s` is the budget of one launch, counted from its start (as Tune's own
  `time_budget_s`): a resumed launch gets the whole budget again.

`--resume` accepts a space that differs from the one the sweep started with only by a higher
`search.trials` or a higher (or removed) `search.timeout_s`; see `sweep._claim_sweep`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ray.tune import Stopper
from ray.tune.search import Searcher, SearchGenerator

from orchestrator.results import schema
from orchestrator.results.schema import OptunaAttr
from orchestrator.tracking import credentials
from orchestrator.tracking.server import restored_tracking_uri

logger = logging.getLogger(__name__)

__all__ = ["BUDGET_FILE", "LaunchBudget", "RecordedTrials", "SweepSearchGenerator", "read_budget", "write_budget", "raised_only"]

BUDGET_FILE = "budget.json"
RAISABLE = ("search.trials", "search.timeout_s")


def write_budget(sweep_dir: Path, *, trials: int, timeout_s: float | None) -> None:
    """Record the budget this launch runs under (atomically: the driver reads it while Tune runs)."""
    path = sweep_dir / BUDGET_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"trials": int(trials), "timeout_s": timeout_s, "started_at": time.time()}))
    os.replace(tmp, path)


def read_budget(path: str | Path) -> dict[str, Any]:
    try:
        return dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError):
        return {}


def raised_only(changes: dict[str, tuple[Any, Any]]) -> tuple[dict[str, tuple[Any, Any]], list[str]]:
    """Split space changes (`path → (before, after)`) into the budget raises `--resume` accepts and the
    rest, described for the error (`path: before → after`, with why a budget change is refused)."""
    accepted: dict[str, tuple[Any, Any]] = {}
    refused: list[str] = []
    for key, (before, after) in changes.items():
        if key in RAISABLE and _is_raise(key, before, after):
            accepted[key] = (before, after)
            continue
        note = " (a budget may only be raised on resume)" if key in RAISABLE else ""
        refused.append(f"{key}: {_shown(before)} → {_shown(after)}{note}")
    return accepted, refused


def _is_raise(key: str, before: Any, after: Any) -> bool:
    if key == "search.timeout_s":
        if after is None:  # no limit any more
            return True
        return before is not None and isinstance(after, (int, float)) and after > before
    return isinstance(before, int) and isinstance(after, int) and after > before


def _shown(value: Any) -> str:
    return "(unset)" if value is None else repr(value)


class SweepSearchGenerator(SearchGenerator):
    """Tune's search generator whose sample target follows the latest launch's `search.trials`.

    On resume Tune restores the generator's state, target included, from its last checkpoint; the
    target is then raised to the one in the sweep's budget file (never lowered below what ran)."""

    def __init__(self, searcher: Searcher, budget_path: str | Path, recorded: RecordedTrials | None = None) -> None:
        super().__init__(searcher)
        self._budget_path = str(budget_path)
        self._recorded = recorded

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        target = read_budget(self._budget_path).get("trials")
        if isinstance(target, int) and target > self._total_samples:
            self._total_samples = target

    def restore_from_dir(self, dirpath: str) -> None:
        super().restore_from_dir(dirpath)
        # trials that were created and finished after Tune's last snapshot (the driver died between):
        # Optuna or MLflow holds them, Tune's restored state does not; they count towards search.trials
        orphans = finished_after_snapshot(self.searcher, self._recorded)
        if orphans:
            logger.info("resume: %d trial(s) finished after Tune's last snapshot count towards search.trials: %s",
                        len(orphans), ", ".join(orphans))
            # the sampler's random state is the snapshot's: it would draw again what those trials drew
            # (the same students, twice on the frontier); a fresh one draws anew
            sampler = _study_sampler(self.searcher)
            if sampler is not None:
                sampler.reseed_rng()
        self._counter += len(orphans)


class RecordedTrials:
    """The Tune trial ids a sweep's MLflow runs record as COMPLETE (picklable; no password kept)."""

    def __init__(self, tracking_uri: str, parent_run_id: str) -> None:
        self.tracking_uri, self.parent_run_id = tracking_uri, parent_run_id

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "tracking_uri": credentials.without_password(self.tracking_uri)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({**state, "tracking_uri": restored_tracking_uri(state["tracking_uri"])})

    def complete(self) -> dict[str, str]:
        """Tune trial id → MLflow run id of its COMPLETE run."""
        from mlflow.tracking import MlflowClient  # mlflow: imported on first use (start-up cost)

        client = MlflowClient(self.tracking_uri)
        parent = client.get_run(self.parent_run_id)
        return {run.data.tags[schema.Tag.TRIAL_ID]: run.info.run_id
                for run in schema.trial_runs(client, parent, state="COMPLETE")}


def _study_sampler(searcher: Searcher) -> Any:
    """The Optuna sampler behind a (ConcurrencyLimiter-wrapped) OptunaSearch, or None."""
    while hasattr(searcher, "searcher"):
        searcher = searcher.searcher
    study = getattr(searcher, "_ot_study", None)
    return None if study is None else study.sampler


def finished_after_snapshot(searcher: Searcher, recorded: RecordedTrials | None = None) -> list[str]:
    """The trials created after the snapshot the searcher was restored from that finished: the study's
    finished trials (COMPLETE, PRUNED, FAIL) the restored searcher does not hold, and the COMPLETE MLflow
    runs of Tune trials it does not hold (a trial can finish in MLflow before the driver tells Optuna).
    Unwraps Tune's ConcurrencyLimiter."""
    import optuna  # imported on first use (start-up cost)

    while hasattr(searcher, "searcher"):
        searcher = searcher.searcher
    study = getattr(searcher, "_ot_study", None)
    if study is None:
        return []
    held = getattr(searcher, "_ot_trials", {})
    known = {trial.number for trial in held.values()}
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    # one key per trial: its MLflow run id once it has one (a told trial and its COMPLETE run count once)
    orphans = {str(t.user_attrs.get(OptunaAttr.MLFLOW_RUN_ID) or f"optuna trial {t.number}")
               for t in study.get_trials(deepcopy=False, states=finished) if t.number not in known}
    if recorded is not None:
        orphans |= {run_id for trial_id, run_id in recorded.complete().items() if trial_id not in held}
    return sorted(orphans)


class LaunchBudget(Stopper):
    """Stops every trial when this launch's `search.timeout_s` has run out (Tune's `time_budget_s`,
    read from the sweep's budget file so that a resume may raise it)."""

    def __init__(self, budget_path: str | Path) -> None:
        self._budget_path = str(budget_path)
        self._seen: tuple[float, float] | None = None  # (file mtime, deadline)

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        return time.time() >= self._deadline()

    def _deadline(self) -> float:
        try:
            mtime = os.stat(self._budget_path).st_mtime
        except OSError:
            return float("inf")
        if self._seen is None or self._seen[0] != mtime:
            budget = read_budget(self._budget_path)
            timeout = budget.get("timeout_s")
            deadline = float("inf") if timeout is None else float(budget.get("started_at", time.time())) + float(timeout)
            self._seen = (mtime, deadline)
        return self._seen[1]
