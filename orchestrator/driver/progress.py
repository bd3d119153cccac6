"""Live sweep progress on the terminal: trials done / running / failed, frontier size, hypervolume, and
one line per epoch of every stage a trial trains (`epoch_line`, also the teacher warm-up's)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ray import tune

from orchestrator.results.frontier import IncrementalFrontier, TrialRow, trial_outcomes
from orchestrator.results.schema import ReportKey, epoch_metric, report_error
from orchestrator.space.spec import materialize
from pxd.metrics import primary_metric

if TYPE_CHECKING:
    from orchestrator.space.spec import SweepSpec

__all__ = ["EPOCH_SECONDS", "SweepProgress", "epoch_line"]

# an epoch's seconds in `pxd.train`'s per-epoch record; a trial reports them to Tune, as it logs them to
# MLflow, under `epoch_metric(stage, EPOCH_SECONDS)` (`orchestrator.worker.trial`)
EPOCH_SECONDS = "epoch_seconds"

_LAUNCH: list[SweepProgress] = []  # the progress of the sweep launch this driver runs, while it runs


class SweepProgress(tune.Callback):
    """A Tune callback that prints one status line per event: a trial started, finished, failed or lost,
    and each epoch a trial's stage trained (`epoch_line`, after the trial's id: trials run side by side).

    Tune pickles its callbacks with the first launch (tuner.pkl) and a resume restores them from there: a
    pickled SweepProgress comes back as the progress of the launch that resumes (`reporting`), which
    starts from the trials the sweep already finished (`resume_from`), so its counts and clock are this
    launch's, and the line `close` prints is the one that heard the events."""

    def __init__(self, spec: SweepSpec, *, total: int, quiet: bool = False, stream: Any = None) -> None:
        search = spec.require_search()
        self.spec = spec
        # updated per completed trial, not recomputed over every trial (orchestrator.results.frontier)
        self.front = IncrementalFrontier(search.objective_pairs, search.reference_point, search.ideal_point)
        self.total = total
        self.quiet = quiet
        self.stream = stream  # None: sys.stderr at print time (Tune pickles callbacks)
        self.started = time.monotonic()
        self.stage_epochs: dict[str, dict[str, int]] = {}  # trial id → each stage's epochs (its config's)
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
        elif ReportKey.STAGE in result and not self.quiet:  # a per-epoch report (`orchestrator.worker.trial`)
            stage = str(result[ReportKey.STAGE])
            self._print(f"trial {trial.trial_id} " + epoch_line(
                stage, int(result[ReportKey.EPOCH]), self._stage_epochs(trial).get(stage), result[epoch_metric(stage)],
                result[epoch_metric(stage, EPOCH_SECONDS)]))

    def _stage_epochs(self, trial: Any) -> dict[str, int]:
        """The epochs of the pipeline's stages in the trial's config (its sampled values in the space), read once
        per trial; a stage beside the pipeline (the CE control) has none here."""
        if trial.trial_id not in self.stage_epochs:
            config = materialize(self.spec, trial.config)
            self.stage_epochs[trial.trial_id] = {"teacher": config.teacher.epochs,
                                                 "assistant": config.assistant_epochs,
                                                 "student": config.student_epochs}
        return self.stage_epochs[trial.trial_id]

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.discard(trial.trial_id)
        self.stage_epochs.pop(trial.trial_id, None)
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
        print(f"{self.status()}  | {event}", file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        self._print("sweep finished")


def epoch_line(stage: str, epoch: int, epochs: int | None, top1: float, seconds: float) -> str:
    """One trained epoch of a stage as the progress lines show it: `student epoch 3/10: val_top1 0.512 in
    4.1s` (the epoch's own seconds, as the stage measured them); `epochs` None: a stage of no known length."""
    of = f"/{epochs}" if epochs is not None else ""
    return f"{stage} epoch {epoch}{of}: {primary_metric()} {top1:.3f} in {seconds:.1f}s"


def _launch_progress() -> tune.Callback:
    """What an unpickled SweepProgress becomes: the running launch's, else a callback that does nothing."""
    return _LAUNCH[-1] if _LAUNCH else tune.Callback()
