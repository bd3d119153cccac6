"""Trial attempts: a trial whose process is killed is run again up to `search.max_retries` times, then
recorded FAILED with the cause; an error that would repeat (a diverged loss) is never retried (the
sweep with diverging trials in `test_sweep.py` checks that with the default `search.max_retries`).

Real components: the session's local Ray and `mlflow server`, Optuna RDB studies, and `pxd sweep` as a
subprocess with its own local Ray where the test kills the trial's worker process (SIGKILL, as the
kernel's out-of-memory killer does).
"""

from __future__ import annotations

import os
import signal
import uuid

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator import schema
from orchestrator.attempts import lost_cause, will_repeat
from orchestrator.frontier import TrialRow
from orchestrator.spec import parse_spec
from orchestrator.sweep import trial_outcomes
from pxd.errors import ConfigError, DivergedError
from tests.orchestrator.conftest import tiny_space
from tests.orchestrator.test_faults import _env, _kill_group, _spawn, _sweep_command, _tails, _wait_for
from tests.orchestrator.test_faults import ray_tmp  # noqa: F401 - a fixture

OPTUNA_FAIL, OPTUNA_COMPLETE = optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE


# -- what is retried --------------------------------------------------------------------------------------
def test_max_retries_defaults_to_retrying_and_refuses_nonsense():
    assert parse_spec(tiny_space()).require_search().max_retries == 2
    assert parse_spec(tiny_space(max_retries=0)).require_search().max_retries == 0
    for bad in (-1, 1.5, "two", True):
        with pytest.raises(ConfigError) as error:
            parse_spec(tiny_space(max_retries=bad))
        assert error.value.field == "search.max_retries"


def test_errors_pxd_raises_on_purpose_would_repeat_and_others_may_not():
    assert will_repeat(DivergedError("loss is nan")) and will_repeat(ConfigError("student.arch", "unknown"))
    assert not will_repeat(OSError("No space left on device")) and not will_repeat(ConnectionError("reset"))
    from orchestrator.stage_store import StageUnavailable

    assert not will_repeat(StageUnavailable("stage store unreachable after 5 attempts"))  # transient: retried


def test_the_cause_of_a_lost_attempt_names_the_node_and_host():
    from ray.exceptions import ActorDiedError

    died = ActorDiedError()
    assert lost_cause(died, node_id="n1", hostname="h1", node_alive=True) == (
        "worker process died (killed or out of memory) on node n1 (host h1)")
    assert lost_cause(died, node_id="n1", hostname="h1", node_alive=False).startswith("its node died")
    assert "RuntimeError: boom" in lost_cause(RuntimeError("boom\nmore"), node_id="n1", hostname="h1", node_alive=True)


def test_a_retried_trial_counts_once_by_its_last_attempt():
    def row(trial_id: str, state: str) -> TrialRow:
        return TrialRow(trial_id=trial_id, run_id=f"{trial_id}-{state}", metrics={}, params={}, state=state)

    # newest first, as the tracking server returns them
    rows = [row("a", "COMPLETE"), row("a", "FAILED"), row("b", "FAILED"), row("b", "FAILED"), row("c", "PRUNED"),
            row("d", "FAILED"), row("d", "COMPLETE")]
    assert trial_outcomes(rows) == {"a": "COMPLETE", "b": "FAILED", "c": "PRUNED", "d": "COMPLETE"}


# -- a killed worker process is retried, then recorded FAILED ------------------------------------------------
def _running_attempt(client: MlflowClient, name: str, trial_id: str | None, killed: set[int]) -> tuple[str, int] | None:
    """(trial id, pid) of a RUNNING attempt that has started training (an epoch logged) and was not killed
    yet: of `trial_id`, or of any trial when None."""
    parent = schema.find_sweep_run(client, name)
    if parent is None:
        return None
    for run in schema.trial_runs(client, parent, state="RUNNING"):
        tags = run.data.tags
        pid = int(tags.get(schema.Tag.PID, 0))
        if pid and pid not in killed and run.data.metrics and trial_id in (None, tags[schema.Tag.TRIAL_ID]):
            return tags[schema.Tag.TRIAL_ID], pid
    return None


@pytest.mark.slow
@pytest.mark.long
def test_a_killed_trial_process_is_retried_then_recorded_failed_with_the_cause(mlflow_server, tmp_path, ray_tmp):
    retries = 1
    name = f"attempts-kill-{uuid.uuid4().hex[:6]}"
    raw = tiny_space(trials=2, max_concurrent=1, max_retries=retries)
    raw["seed"] = 32  # stage keys of its own
    raw["student"]["epochs"] = 20  # long enough to be killed mid-training
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    root = tmp_path / "root"
    env = _env(RAY_ADDRESS="local", RAY_TMPDIR=ray_tmp, PXD_STAGE_LEASE_TTL_S="3")
    client = MlflowClient(mlflow_server)
    log = tmp_path / "driver.log"
    driver = None
    killed: set[int] = set()
    try:
        driver = _spawn(_sweep_command(space, name, root, mlflow_server), log, env)
        target = None
        for _ in range(retries + 1):  # every attempt of the first trial dies mid-training
            target, pid = _wait_for(lambda: _running_attempt(client, name, target, killed), "a trial training",
                                    procs=(driver,), logs=(log,))
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        _wait_for(lambda: driver.poll() is not None, "the sweep to finish", logs=(log,))
        assert driver.returncode == 0, _tails((log,))
    finally:
        _kill_group(driver)

    parent = schema.find_sweep_run(client, name)
    runs = schema.trial_runs(client, parent)
    attempts = [r for r in runs if r.data.tags[schema.Tag.TRIAL_ID] == target]
    assert len(attempts) == retries + 1, "one run per attempt: the trial was run again after its process died"
    assert {int(r.data.tags[schema.Tag.PID]) for r in attempts} == killed
    for run in attempts:
        error = run.data.tags[schema.Tag.ERROR]
        assert run.info.status == "FAILED" and run.data.tags[schema.Tag.STATE] == "FAILED"
        assert error.startswith("worker process died (killed or out of memory) on node "), error
        assert f"(host {run.data.tags[schema.Tag.HOSTNAME]})" in error
    oldest, newest = attempts[-1], attempts[0]
    assert "runs the trial again" in oldest.data.tags[schema.Tag.ERROR]
    assert "not retried again" in newest.data.tags[schema.Tag.ERROR]
    others = [r for r in runs if r.data.tags[schema.Tag.TRIAL_ID] != target]
    assert [r.data.tags[schema.Tag.STATE] for r in others] == ["COMPLETE"], "the next trial ran untouched"

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'sweeps' / name / 'optuna.db'}")
    states = {t.user_attrs["tune_trial_id"]: t.state for t in study.trials}
    assert len(study.trials) == 2, "the retries are attempts of one Optuna trial, not new trials"
    assert states[target] == OPTUNA_FAIL and list(states.values()).count(OPTUNA_COMPLETE) == 1
    assert parent.data.metrics["trials_failed"] == 1 and parent.data.metrics["trials_complete"] == 1
