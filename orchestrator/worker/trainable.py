"""The function Ray Tune runs for each trial: a trial an earlier launch already completed reports its recorded
result; any other runs (`orchestrator.worker.trial.run_trial`) with what its worker process keeps."""

from __future__ import annotations

from typing import Any

from mlflow.tracking import MlflowClient
from ray import tune

from orchestrator.results import schema
from orchestrator.space.spec import constraint_values
from orchestrator.worker.context import TrialContext
from orchestrator.worker.kept import WorkerState
from orchestrator.worker.trial import run_trial

__all__ = ["TuneTrial"]


class TuneTrial:
    """The trainable Tune runs for every trial of a sweep (wrapped by `tune.with_parameters`).

    Ray deserialises one instance per worker process (with the actor class Tune builds around it), and with
    `search.reuse_actors` that process runs trial after trial: the instance creates the process's
    `WorkerState` on its first trial and passes it to every trial it runs."""

    __name__ = "pxd_trial"  # Tune names the trainable after it

    def __init__(self) -> None:
        self.state: WorkerState | None = None

    def __call__(self, config: dict[str, Any], context: TrialContext) -> None:
        recorded = _completed_before(context)
        if recorded is not None:
            tune.report(recorded)  # finished before the driver died: keep that result, train nothing again
            return
        if self.state is None:
            self.state = WorkerState.from_environment()
        run_trial(config, context, self.state)

    def __getstate__(self) -> dict[str, Any]:
        return {"state": None}  # what a process keeps never travels to another one


def _completed_before(context: TrialContext) -> dict[str, Any] | None:
    """This Tune trial's final result if an earlier launch of the sweep already completed it, else None.

    `--resume` restores Tune's last experiment checkpoint, which can predate the end of a trial that
    MLflow already holds as COMPLETE (the driver died in between). Running it again would train it
    twice and put it in the frontier twice; reporting the recorded result finishes it instead.
    """

    client = MlflowClient(context.tracking_uri)
    runs = schema.trial_runs(client, (context.parent_run_id, context.experiment_id),
                             trial_id=str(tune.get_context().get_trial_id()), state="COMPLETE")
    if not runs:
        return None
    metrics = dict(runs[0].data.metrics)
    return schema.recorded_result(runs[0], constraint_values(context.spec, metrics)).report()
