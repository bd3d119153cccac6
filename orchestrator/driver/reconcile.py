"""When a sweep ends, Optuna and MLflow agree: no study trial and no trial run stays RUNNING."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import optuna

from orchestrator.results import schema
from orchestrator.results.frontier import TrialRow
from orchestrator.results.schema import OptunaAttr, Tag
from orchestrator.space.spec import constraint_names, constraint_values

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from orchestrator.space.spec import SweepSpec

__all__ = ["close_optuna_trials", "close_lost_trials"]


def close_optuna_trials(study_name: str, storage_url: str, *, stopped: bool, spec: SweepSpec,
                         client: MlflowClient, parent_run_id: str) -> set[str]:
    """No study trial stays RUNNING once the sweep is over. A trial whose MLflow run is COMPLETE (it
    recorded its result, then its driver died before telling Optuna, after Tune's last snapshot) is told
    COMPLETE with the recorded values and constraints, so the study and MLflow agree. A trial Tune still
    ran when the time budget ran out is told PRUNED (stopped, like the searcher tells a trial that ended
    without its final result); any other (its driver was killed before Tune saved its state, and resume
    did not rerun it) is told FAIL. Returns the Tune trial ids of the study's PRUNED trials."""

    study = optuna.load_study(study_name=study_name, storage=storage_url)
    state = optuna.trial.TrialState.PRUNED if stopped else optuna.trial.TrialState.FAIL
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    recorded: dict[str, Any] = {}
    if running:  # Tune trial id → its COMPLETE MLflow run
        parent = client.get_run(parent_run_id)
        recorded = {run.data.tags[Tag.TRIAL_ID]: run for run in schema.trial_runs(client, parent, state="COMPLETE")}
    for trial in running:
        run = recorded.get(str(trial.user_attrs.get(OptunaAttr.TUNE_TRIAL_ID, "")))
        if run is not None and _tell_recorded(study, trial, run, spec):
            continue
        study.tell(trial.number, state=state)
    return {str(t.user_attrs[OptunaAttr.TUNE_TRIAL_ID]) for t in study.get_trials(deepcopy=False)
            if t.state == optuna.trial.TrialState.PRUNED and t.user_attrs.get(OptunaAttr.TUNE_TRIAL_ID)}


def _tell_recorded(study: Any, trial: Any, run: Any, spec: SweepSpec) -> bool:
    """Tell the study a trial's recorded MLflow result (as the searcher would have); False if incomplete."""

    metrics = dict(run.data.metrics)
    values = [metrics.get(metric) for metric in spec.objective_metrics]
    if not all(isinstance(v, float) and math.isfinite(v) for v in values):
        return False
    live = optuna.trial.Trial(study, trial._trial_id)
    for name, value in zip(constraint_names(spec), constraint_values(spec, metrics)):
        live.set_constraint(name, value)
    live.set_user_attr(OptunaAttr.MLFLOW_RUN_ID, run.info.run_id)
    study.tell(live, values)
    return True


def close_lost_trials(client: MlflowClient, rows: list[TrialRow], stopped: dict[str, str]) -> None:
    """When the sweep ends no trial runs. A run still RUNNING was either stopped (Optuna holds its trial
    as PRUNED: recorded PRUNED with the reason, so Optuna and MLflow agree) or lost its process (a node
    died, a driver was killed and the trial restarted on resume): recorded FAILED."""
    for row in rows:
        if row.state != "RUNNING" or not row.run_id:
            continue
        if row.trial_id in stopped:
            # early stopping said why when it stopped the trial; otherwise the sweep's reason (the time budget)
            reason = client.get_run(row.run_id).data.tags.get(Tag.STOPPED_REASON) or stopped[row.trial_id]
            schema.log_trial_failure(client, row.run_id, reason, "", state="PRUNED")
            client.set_terminated(row.run_id, status="KILLED")
            row.state = "PRUNED"
        else:
            schema.log_trial_failure(client, row.run_id, "trial process lost (its node died or its driver was killed); "
                                     "no final result", "")
            client.set_terminated(row.run_id, status="FAILED")
            row.state = "FAILED"
