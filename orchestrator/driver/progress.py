"""Live sweep progress on the terminal: trials done / running / failed, frontier size, hypervolume."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ray import tune

from orchestrator.results.frontier import IncrementalFrontier, TrialRow, trial_outcomes
from orchestrator.results.schema import ReportKey, epoch_metric, report_error
from pxd.metrics import primary_metric

if TYPE_CHECKING:
    from orchestrator.space.spec import SweepSpec

__all__ = ["SweepProgress"]

_LAUNCH: list[SweepProgress] = []  # the progress of the sweep launch this driver runs, while it runs


class SweepProgress(tune.Callback):
    """A Tune callback that prints one status line per event (and at most every `every_s` otherwise).

    Tune pickles its callbacks with the first launch (tuner.pkl) and a resume restores them from there: a
    pickled SweepProgress comes back as the progress of the launch that resumes (`reporting`), which
    starts from the trials the sweep already finished (`resume_from`), so its counts and clock are this
    launch's, and the line `close` prints is the one that heard the events."""

    def __init__(self, spec: SweepSpec, *, total: int, quiet: bool = False, every_s: float = 15.0, stream: Any = None) -> None:
        search = spec.require_search()
        # updated per completed trial, not recomputed over every trial (orchestrator.results.frontier)
        self.front = IncrementalFrontier(search.objective_pairs, search.reference_point, search.ideal_point)
        self.total = total
        self.quiet = quiet
        self.every_s = every_s
        self.stream = stream  # None: sys.stderr at print time (Tune pickles callbacks)
        self.started = time.monotonic()
        self.last_print = 0.0
        self.running: set[str] = set()
        self.done: dict[str, TrialRow] = {}
        self.failed: set[str] = set()
        self.stopped: set[str] = set()

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_launch_progress, ())

    def __deepcopy__(self, memo: dict) -> SweepProgress:
        return self  # one live printer per launch

    def __copy__(self) -> SweepProgress:
        return self

    @contextmanager
    def reporting(self) -> Iterator[SweepProgress]:
        """While the launch runs: what a restored (unpickled) SweepProgress resolves to."""
        _LAUNCH.append(self)
        try:
            yield self
        finally:
            _LAUNCH.remove(self)

    def resume_from(self, rows: Iterable[TrialRow]) -> None:
        """Count the trials earlier launches finished (MLflow's rows), as if this launch had heard them; a
        trial with a run per attempt counts by how it ended (`frontier.trial_outcomes`)."""
        rows = list(rows)
        outcomes = trial_outcomes(rows)
        for row in rows:
            outcome = outcomes[row.trial_id]
            if outcome == "COMPLETE" and row.state == "COMPLETE" and primary_metric() in row.metrics:
                self._record_done(row)
            elif outcome == "FAILED":
                self.failed.add(row.trial_id)
            elif outcome == "PRUNED":
                self.stopped.add(row.trial_id)

    def _record_done(self, row: TrialRow) -> None:
        first = row.trial_id not in self.done
        self.done[row.trial_id] = row
        if first and row.feasible:  # a resumed trial that reports its recorded result again is counted once
            self.front.add(row.metrics)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.add(trial.trial_id)
        self._print(f"trial {trial.trial_id} started")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if report_error(result):
            self.failed.add(trial.trial_id)  # an error that would repeat: finished, not retried
        elif result.get(ReportKey.FINAL) and primary_metric() in result:
            self.failed.discard(trial.trial_id)
            self._record_done(TrialRow(
                trial_id=trial.trial_id, run_id=result.get(ReportKey.MLFLOW_RUN_ID),
                metrics={k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                params={}, state="COMPLETE", feasible=bool(result.get(ReportKey.FEASIBLE, True)),
            ))
        elif time.monotonic() - self.last_print > self.every_s:
            stage = str(result.get(ReportKey.STAGE, ""))
            self._print(f"trial {trial.trial_id} {stage} epoch {result.get(ReportKey.EPOCH, '?')}: "
                        f"{primary_metric()} {result.get(epoch_metric(stage), float('nan')):.3f}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.discard(trial.trial_id)
        if trial.trial_id in self.failed:
            self._print(f"trial {trial.trial_id} FAILED, not retried: the error would repeat (its MLflow run holds it)")
            return
        row = self.done.get(trial.trial_id)
        if row is None:
            self.stopped.add(trial.trial_id)  # ended without its final result: stopped (time budget)
        primary = primary_metric()
        detail = f"{primary} {row.metrics[primary]:.3f}" if row else "stopped before its final result"
        self._print(f"trial {trial.trial_id} finished ({detail})")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.discard(trial.trial_id)
        self._print(f"trial {trial.trial_id} lost its process or node (attempt {trial.num_failures}); running it again")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.discard(trial.trial_id)
        self.failed.add(trial.trial_id)
        self.done.pop(trial.trial_id, None)
        self._print(f"trial {trial.trial_id} FAILED (its MLflow run holds the error)")

    def status(self) -> str:
        elapsed = time.monotonic() - self.started
        stopped = f" · {len(self.stopped)} stopped" if self.stopped else ""
        normalised = self.front.normalised
        return (f"[pxd] {len(self.done)}/{self.total} done · {len(self.running)} running · {len(self.failed)} failed"
                f"{stopped} · frontier {self.front.size} · hypervolume {normalised:.4f} · {elapsed:5.0f}s")

    def _print(self, event: str) -> None:
        if self.quiet:
            return
        self.last_print = time.monotonic()
        print(f"{self.status()}  | {event}", file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        self._print("sweep finished")


def _launch_progress() -> tune.Callback:
    """What an unpickled SweepProgress becomes: the running launch's, else a callback that does nothing."""
    return _LAUNCH[-1] if _LAUNCH else tune.Callback()
