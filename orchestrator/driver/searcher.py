"""Ray Tune's OptunaSearch in multi-objective mode, with pxd's bookkeeping on completion."""

from __future__ import annotations

import math
import warnings
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

from orchestrator.results.schema import OptunaAttr, ReportKey, report_error, report_over_budget
from orchestrator.space.spec import SweepSpec, constraint_names, define_by_run, make_sampler
from orchestrator.tracking.credentials import PrivateRDBStorage

__all__ = ["ParetoOptunaSearch", "make_searcher"]


class ParetoOptunaSearch(OptunaSearch):
    """OptunaSearch that names the study's objectives, sets constraints on the trial before `tell`
    (Optuna ≥ 5 reads them there), records the trial's MLflow run id, and tells PRUNED (stopped) or FAIL
    (raised) for any trial without a complete final result, so no Optuna trial is left RUNNING or
    half-told and a partial result never reaches the sampler as a finished one."""

    def __init__(self, *args: Any, constraint_names: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._constraint_names = tuple(constraint_names)

    def _setup_study(self, mode: str | list) -> None:
        super()._setup_study(mode)
        metrics = self._metric if isinstance(self._metric, list) else [self._metric]
        if self._ot_study is not None and not self._ot_study.metric_names:
            # optuna-dashboard then shows val_top1, gmacs, ... instead of "Objective 0", "Objective 1"
            with warnings.catch_warnings():  # marked experimental; the user cannot act on it
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._ot_study.set_metric_names(list(metrics))

    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None:
            # the link from the study to Tune's trial and its MLflow run (tag pxd.trial_id)
            ot_trial.set_user_attr(OptunaAttr.TUNE_TRIAL_ID, trial_id)
        return config

    def _tell_no_values(self, ot_trial: optuna.Trial, state: optuna.trial.TrialState) -> None:
        """Tell PRUNED or FAIL. Optuna stores the state first; the grid sampler then calls `study.stop()`
        once its grid is used up, which raises outside `study.optimize` (Tune's own tell catches it too)."""
        try:
            self._ot_study.tell(ot_trial, None, state=state)
        except RuntimeError as exc:
            if "Study.stop" not in str(exc):
                raise

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return
        stored = next(t for t in self._ot_study.get_trials(deepcopy=False) if t.number == ot_trial.number)
        if stored.state.is_finished():
            # `--resume` re-reports a trial the study already holds as finished (the driver died after
            # telling Optuna and before Tune saved its own state): telling it again would raise
            self._completed_trials.add(trial_id)
            return
        if result and report_over_budget(result):
            # refused before training (a hard limit on gmacs/params/pixels): PRUNED, with its constraint values
            # so that constrained samplers (TPE) count the region as infeasible
            for name, value in zip(self._constraint_names, result.get(ReportKey.CONSTRAINTS) or []):
                ot_trial.set_constraint(name, value)
            ot_trial.set_user_attr(OptunaAttr.PRUNED, str(report_over_budget(result))[:1000])
            if result.get(ReportKey.MLFLOW_RUN_ID):
                ot_trial.set_user_attr(OptunaAttr.MLFLOW_RUN_ID, result[ReportKey.MLFLOW_RUN_ID])
            self._tell_no_values(ot_trial, optuna.trial.TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return
        metrics = self._metric if isinstance(self._metric, list) else [self._metric]
        values = [result.get(m) for m in metrics] if result else []
        complete = (
            not error and result is not None and bool(result.get(ReportKey.FINAL))
            and all(isinstance(v, (int, float)) and not math.isnan(v) for v in values)
        )
        if result and result.get(ReportKey.MLFLOW_RUN_ID):
            ot_trial.set_user_attr(OptunaAttr.MLFLOW_RUN_ID, result[ReportKey.MLFLOW_RUN_ID])
        if not complete:
            # Ray hands a stopped trial's last partial result to the searcher, marked `done`, as if it had
            # completed: only a report marked ReportKey.FINAL is a result. A trial that ended without error and
            # without it was stopped (early stopping, the time budget): PRUNED. One that raised: FAIL.
            stopped = (not error and result is not None and not result.get(ReportKey.FINAL)
                       and not report_error(result))  # an error that would repeat ends a trial with a report
            state = optuna.trial.TrialState.PRUNED if stopped else optuna.trial.TrialState.FAIL
            self._tell_no_values(ot_trial, state)
            self._completed_trials.add(trial_id)
            return
        for name, value in zip(self._constraint_names, result.get(ReportKey.CONSTRAINTS) or []):
            ot_trial.set_constraint(name, value)  # ≤ 0 means satisfied
        super().on_trial_complete(trial_id, result=result, error=False)


def make_searcher(spec: SweepSpec, study_name: str, storage_url: str) -> ParetoOptunaSearch:
    return ParetoOptunaSearch(
        space=define_by_run(spec),
        metric=list(spec.objective_metrics),
        mode=list(spec.objective_modes),
        sampler=make_sampler(spec),
        storage=PrivateRDBStorage(storage_url),  # Tune pickles the searcher: never its password
        study_name=study_name,
        constraint_names=constraint_names(spec),
    )
