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
import subprocess
import sys
import uuid

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.driver.attempts import lost_cause, will_repeat
from orchestrator.results import schema
from orchestrator.results.frontier import TrialRow, trial_outcomes
from orchestrator.space.spec import parse_spec
from pxd.errors import ConfigError, DivergedError
from tests.orchestrator.conftest import tiny_space
from tests.orchestrator.test_faults import (
    _env,
    _kill_group,
    _spawn,
    _sweep_command,
    _tails,
    _wait_for,
    ray_tmp,  # noqa: F401 - a fixture
)

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
    from orchestrator.stages.io import StageUnavailable

    assert not will_repeat(StageUnavailable("stage store unreachable after 5 attempts"))  # transient: retried


def test_the_cause_of_a_lost_attempt_names_the_node_and_host():
    from ray.exceptions import ActorDiedError

    died = ActorDiedError()
    assert lost_cause(died, node_id="n1", hostname="h1", node_alive=True) == (
        "worker process died (killed or out of memory) on node n1 (host h1)")
    assert lost_cause(died, node_id="n1", hostname="h1", node_alive=False).startswith("its node died")
    assert "RuntimeError: boom" in lost_cause(RuntimeError("boom\nmore"), node_id="n1", hostname="h1", node_alive=True)


def test_an_exception_raised_past_the_trials_own_handling_is_named_not_called_a_lost_process():
    from ray.exceptions import RayTaskError

    try:
        raise ValueError("RESOURCE_DOES_NOT_EXIST: run abc not found\ntraceback")
    except ValueError as exc:
        wrapped = RayTaskError("ImplicitFunc.train", "Traceback ...", exc)
    cause = lost_cause(wrapped, node_id="n1", hostname="h1", node_alive=True)
    assert cause == ("the trial raised ValueError outside its own error handling on node n1 (host h1): "
                     "RESOURCE_DOES_NOT_EXIST: run abc not found")


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


# -- a trial orphaned by its driver's death records nothing COMPLETE ---------------------------------------
_ACTOR_DRIVER = """
import sys, time
from pathlib import Path
import ray
ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level="ERROR")

@ray.remote(num_cpus=0)
class Trial:
    def watch(self, path):
        import os, threading
        from orchestrator.worker.trial import RayletWatch

        watch = RayletWatch()
        def loop():
            while True:  # what a trial would see at its end: is the node that started it still there?
                Path(path).write_text(f"{os.getpid()} {watch.gone()}")
                time.sleep(0.05)
        threading.Thread(target=loop, daemon=True).start()
        return os.getpid(), os.getpgid(0)

trial = Trial.remote()
print(*ray.get(trial.watch.remote(sys.argv[1])), flush=True)
time.sleep(3600)
"""


def _read_watch(path):
    try:
        pid, gone = path.read_text().split()
    except (OSError, ValueError):
        return None
    return int(pid), gone == "True"


def test_a_trial_process_outliving_its_killed_driver_knows_its_ray_node_is_gone(tmp_path, ray_tmp):  # noqa: F811
    """The premise of `RayletWatch`, on real Ray: killing a driver's process group (driver, raylet)
    leaves the trial's worker process in its own group; the watch then says gone, so the trial does
    not record its result COMPLETE (`trial._run`). A worker that dies first cannot record it either."""
    status = tmp_path / "watch.txt"
    log = tmp_path / "driver.log"
    driver = _spawn([sys.executable, "-c", _ACTOR_DRIVER, str(status)], log, _env(RAY_TMPDIR=ray_tmp))
    try:
        _wait_for(lambda: _read_watch(status) is not None, "the actor's first watch", procs=(driver,), logs=(log,))
        pid, gone = _read_watch(status)
        assert not gone, "the raylet that started the worker is alive"
        assert os.getpgid(pid) != os.getpgid(driver.pid), "Ray starts the worker in a process group of its own"
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait(timeout=60)

        def settled():
            seen = _read_watch(status)
            return not _alive(pid) or (seen is not None and seen[1])

        _wait_for(settled, "the orphaned worker to see its raylet gone (or to exit)", logs=(log,))
    finally:
        _kill_group(driver)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_the_raylet_watch_sees_its_parent_process_die(tmp_path):
    """Deterministic half of the above: a process whose parent dies is re-parented; the watch says so."""
    status = tmp_path / "watch.txt"
    child = (f"import os, time\nfrom pathlib import Path\nfrom orchestrator.worker.trial import RayletWatch\nw = RayletWatch()\n"
             f"p = Path({str(status)!r})\np.write_text(f'{{os.getpid()}} {{w.gone()}}')\n"
             "deadline = time.time() + 120\n"
             "while not w.gone() and time.time() < deadline:\n    time.sleep(0.05)\n"
             "p.write_text(f'{os.getpid()} {w.gone()}')\n")
    parent = (f"import subprocess, sys, time\nfrom pathlib import Path\n"
              f"subprocess.Popen([sys.executable, '-c', {child!r}])\n"
              f"while not Path({str(status)!r}).exists():\n    time.sleep(0.05)\n")  # then exits, leaving the child
    subprocess.run([sys.executable, "-c", parent], env=_env(), check=True, timeout=120)
    first = _read_watch(status)
    assert first is not None
    pid = first[0]
    _wait_for(lambda: not _alive(pid), "the child to notice its parent died", logs=())
    assert _read_watch(status)[1], "after its parent died the watch says gone"


def _alive(pid):
    from orchestrator.tracking.server import _pid_alive

    return _pid_alive(pid)
