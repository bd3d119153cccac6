"""Trial attempts: which failures are retried, and closing the runs of attempts whose process died.

Ray Tune runs a failed trial again, with the same trial id and config, up to `search.max_retries`
times (`FailureConfig(max_failures=...)`), and tells the searcher only once, when the trial finally
completes or fails: one Optuna trial per Tune trial, whatever the number of attempts. Each attempt
opens its own MLflow run (tag `pxd.trial_id` shared).

- **Retried**: an attempt whose worker process or node died (SIGKILL, the kernel's or Ray's out-of-memory
  killer, a node preempted or shut down: Ray's `RayActorError`), and any exception pxd did not raise on
  purpose (it may be transient: a network error, a full disk).
- **Not retried**: errors that would repeat, `WILL_REPEAT` (a bad config, a diverged loss, a stage wait
  that timed out: `pxd.errors.PxdError`). The trial records the error on its run and ends with a final
  report that carries it (`schema.failed_report`); Tune sees a finished trial and the searcher tells FAIL.

An attempt whose process died cannot close its own run: `LostAttempts`, a Tune callback in the driver,
closes it as FAILED with the cause (`pxd.error`: the node and host it ran on, process or node death)
as soon as Tune reports the failure.
"""

from __future__ import annotations

import pickle
import socket
import sys
from typing import Any

import cloudpickle
import ray
from ray import tune
from ray.exceptions import RayActorError, RayTaskError

from orchestrator.results import schema
from orchestrator.tracking import credentials
from orchestrator.tracking.server import restored_tracking_uri
from orchestrator.worker.failures import WILL_REPEAT, will_repeat

__all__ = ["WILL_REPEAT", "will_repeat", "lost_cause", "LostAttempts"]



def lost_cause(error: BaseException | None, *, node_id: str, hostname: str, node_alive: bool | None) -> str:
    """Why an attempt ended without closing its run, in the user's words."""
    where = f"node {node_id} (host {hostname})"
    if node_alive is False:
        return f"its node died (shut down, preempted or lost): {where}"
    if isinstance(error, RayActorError):
        return f"worker process died (killed or out of memory) on {where}"
    raised = getattr(error, "cause", None) if isinstance(error, RayTaskError) else None
    if isinstance(raised, BaseException):  # the attempt raised past its own error handling: name what it raised
        return f"the trial raised {type(raised).__name__} outside its own error handling on {where}: {_first_line(raised)}"
    return f"trial process lost on {where}: {type(error).__name__}: {_first_line(error)}"


def _first_line(error: BaseException | None) -> str:
    return str(error).strip().splitlines()[0] if error is not None and str(error).strip() else "unknown error"


def _trial_error(trial: Any) -> BaseException | None:
    """The error Tune recorded for the trial's last failure (callbacks are not handed it): the pickled
    exception Tune writes in the trial's local folder, before it is synced to the storage path."""
    try:
        with open(trial.pickled_error_file, "rb") as handle:
            return cloudpickle.load(handle)
    except (OSError, TypeError, pickle.UnpicklingError, AttributeError, EOFError):
        pass
    try:
        return trial.get_pickled_error()
    except Exception as exc:  # noqa: BLE001 - an unreadable error file still leaves a cause to record
        return exc


def _node_alive(node_id: str) -> bool | None:
    """Whether the Ray node still runs; None if Ray does not know it. Ray marks a node dead only after
    its health checks fail (~30 s), often after Tune reported the attempt's failure, so a node it still
    lists as alive must also answer on its raylet's port."""
    node = next((n for n in ray.nodes() if n["NodeID"] == node_id), None)
    if node is None or not node["Alive"]:
        return None if node is None else False
    try:
        socket.create_connection((node["NodeManagerAddress"], int(node["NodeManagerPort"])), timeout=3).close()
    except OSError:
        return False
    return True


class LostAttempts(tune.Callback):
    """Closes, as FAILED with the cause, the MLflow runs of a trial's attempt whose process died."""

    def __init__(self, tracking_uri: str, parent_run_id: str, max_retries: int) -> None:
        self.tracking_uri = tracking_uri
        self.parent_run_id = parent_run_id
        self.max_retries = max_retries

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks into the sweep's folder (tuner.pkl): no password in there
        return {**self.__dict__, "tracking_uri": credentials.without_password(self.tracking_uri)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({**state, "tracking_uri": restored_tracking_uri(state["tracking_uri"])})

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, f"; Tune runs the trial again (attempt {trial.num_failures + 1} of at most "
                           f"{self.max_retries + 1}, search.max_retries = {self.max_retries})")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, f"; not retried again (search.max_retries = {self.max_retries} used up)")

    def _close(self, trial: Any, outcome: str) -> None:
        try:
            self._close_runs(trial, outcome)
        except Exception as exc:  # noqa: BLE001 - the sweep goes on; its end records the run as lost instead
            print(f"[pxd] warning: could not record the lost attempt of trial {trial.trial_id} on its MLflow run "
                  f"({credentials.scrub(str(exc))}); it is recorded FAILED when the sweep ends", file=sys.stderr, flush=True)

    def _close_runs(self, trial: Any, outcome: str) -> None:
        from mlflow.tracking import MlflowClient  # start-up cost

        client = MlflowClient(self.tracking_uri)
        lost = schema.trial_runs(client, client.get_run(self.parent_run_id), trial_id=str(trial.trial_id), state="RUNNING")
        if not lost:
            return  # the attempt raised and closed its run itself
        error = _trial_error(trial)
        for run in lost:
            tags = run.data.tags
            node_id = tags.get(schema.Tag.NODE_ID, "?")
            cause = lost_cause(error, node_id=node_id, hostname=tags.get(schema.Tag.HOSTNAME, "?"),
                               node_alive=_node_alive(node_id))
            schema.log_trial_failure(client, run.info.run_id, cause + outcome, f"{cause}\n\nRay reported:\n{error}")
            client.set_terminated(run.info.run_id, status="FAILED")
