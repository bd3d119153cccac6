"""Faults lose no finished result: real processes killed mid-work, corrupt checkpoints, a dead sweep
driver resumed, a tracking server restarted mid-sweep.

Everything here is real: OS processes sharing a SQL lease table, the session's `mlflow server` over
HTTP, `pxd sweep` as a subprocess with its own local Ray (own temp dir, `RAY_ADDRESS=local`, so it
never attaches to the test session's Ray or to another cluster on this machine).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.driver.searcher import make_searcher
from orchestrator.results.schema import FINAL_REPORT, STAGES_EXPERIMENT, find_sweep_run
from orchestrator.results.schema import STAGE_CHECKPOINT as CHECKPOINT
from orchestrator.space.spec import parse_spec
from orchestrator.stages.store import MlflowStageStore, SqlLeases
from orchestrator.tracking.server import EmbeddedServer
from pxd.train import StageResult
from tests.orchestrator.conftest import free_port, tiny_space

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LEASE_TTL_S = 3  # short, so a dead holder's lease expires quickly; heartbeats renew every TTL/3
SAFETY_TIMEOUT_S = 420  # only a guard against hanging forever; nothing asserts on durations


# -- helpers -------------------------------------------------------------------------------------------
def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(RAY_USAGE_STATS_ENABLED="0", MLFLOW_ENABLE_ASYNC_LOGGING="false", TQDM_DISABLE="1")
    env.update(extra)
    return env


def _spawn(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start a process in its own session (so its whole group can be killed), output to `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _kill_group(proc: subprocess.Popen | None) -> None:
    """SIGKILL a process we started in its own session, and everything in its process group."""
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def _wait_for(check: Callable[[], Any], what: str, *, procs: tuple[subprocess.Popen, ...] = (),
              logs: tuple[Path, ...] = (), poll_s: float = 0.3) -> Any:
    deadline = time.monotonic() + SAFETY_TIMEOUT_S
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"process {proc.args!r} exited ({proc.returncode}) before {what}\n{_tails(logs)}")
        time.sleep(poll_s)
    raise AssertionError(f"gave up waiting for {what}\n{_tails(logs)}")


def _tails(logs: tuple[Path, ...]) -> str:
    return "\n".join(f"--- {p.name}:\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())


@pytest.fixture
def ray_tmp() -> Iterator[str]:
    """A short temp dir for a subprocess's own Ray (Ray's unix socket paths must stay short)."""
    path = tempfile.mkdtemp(prefix="pxdray")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _stage_runs(client: MlflowClient, key: str) -> list[Any]:
    experiment = client.get_experiment_by_name(STAGES_EXPERIMENT)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], f"tags.`pxd.stage_key` = '{key}'")


def _usable(run: Any) -> bool:
    tags = run.data.tags
    return (tags.get("pxd.stage_complete") == "true" and tags.get("pxd.stage_corrupt") != "true"
            and run.info.status == "FINISHED")


def _result(value: float = 1.0) -> StageResult:
    return StageResult("teacher", state_dict={"w": torch.full((2,), value)},
                       metrics={"val_top1": 0.5, "train_seconds": 1.0})


def _store(uri: str, lease_url: str) -> MlflowStageStore:
    return MlflowStageStore(uri, leases=SqlLeases(lease_url), poll_s=0.2, wait_timeout_s=60)


# -- 1. a process training a shared stage is killed; another completes it ------------------------------
# Each process: build a store on the shared lease table, call get_or_train on the same key. The train
# function marks (with a timestamp) that it started; A's then blocks forever, B's returns a result.
_STAGE_PROCESS = r"""
import json, sys, time
from pathlib import Path
import torch
from orchestrator.stages.store import MlflowStageStore, SqlLeases
from pxd.train import StageResult

uri, lease_url, key, marks, name, mode, after = sys.argv[1:8]
marks = Path(marks)
while after != "-" and not (marks / after).exists():  # imports done; ask only once the other holds the lease
    time.sleep(0.1)

def train():
    (marks / f"{name}.train_started").write_text(repr(time.time()))
    while mode == "block":
        time.sleep(1)
    return StageResult("teacher", state_dict={"w": torch.ones(2)}, metrics={"val_top1": 0.5, "train_seconds": 1.0})

store = MlflowStageStore(uri, leases=SqlLeases(lease_url), poll_s=0.2, wait_timeout_s=120)
(marks / f"{name}.ready").write_text(repr(time.time()))
outcome = store.get_or_train("teacher", key, {"arch": "fault-test"}, train)
(marks / f"{name}.outcome.json").write_text(json.dumps({"reused": outcome.reused, "ref": outcome.ref}))
"""


def test_a_killed_stage_trainer_is_taken_over_by_a_waiting_process(mlflow_server, tmp_path):
    key = f"fault-kill-{uuid.uuid4().hex}"
    lease_url = f"sqlite:///{tmp_path / 'leases.db'}"
    marks = tmp_path / "marks"
    marks.mkdir()
    env = _env(PXD_STAGE_LEASE_TTL_S=str(LEASE_TTL_S))
    logs = (tmp_path / "a.log", tmp_path / "b.log")

    def start(name: str, mode: str, after: str, log: Path) -> subprocess.Popen:
        command = [sys.executable, "-c", _STAGE_PROCESS, mlflow_server, lease_url, key, str(marks), name, mode, after]
        return _spawn(command, log, env)

    a = b = None
    try:
        a = start("a", "block", "-", logs[0])
        b = start("b", "return", "a.train_started", logs[1])  # B asks once A is training, i.e. holds the lease
        _wait_for(lambda: (marks / "a.train_started").exists(), "A started training", procs=(a, b), logs=logs)
        _wait_for(lambda: (marks / "b.ready").exists(), "B is about to ask for the stage", procs=(a, b), logs=logs)
        # B now waits on A's lease. Give it several TTLs: A's heartbeat must keep the lease, so B
        # must neither train a duplicate nor give up while A is alive.
        time.sleep(2 * LEASE_TTL_S)
        assert not (marks / "b.train_started").exists(), "B trained a duplicate while A was alive and holding the lease"
        assert b.poll() is None, f"B exited while A still held the lease\n{_tails(logs)}"
        killed_at = time.time()
        os.killpg(a.pid, signal.SIGKILL)
        a.wait(timeout=30)

        _wait_for(lambda: (marks / "b.outcome.json").exists(), "B to finish the stage", procs=(b,), logs=logs)
        assert b.wait(timeout=60) == 0, _tails(logs)
    finally:
        _kill_group(a)
        _kill_group(b)

    outcome = json.loads((marks / "b.outcome.json").read_text())
    assert outcome["reused"] is False, "B must have trained the stage itself"
    assert float((marks / "b.train_started").read_text()) > killed_at, "B started training before A was killed"
    client = MlflowClient(mlflow_server)
    runs = _stage_runs(client, key)
    assert [r.info.run_id for r in runs if _usable(r)] == [outcome["ref"]], "exactly one usable stage run: B's"
    assert len(runs) == 1, "A (killed while training) must not have left a stage run behind"

    # a third caller reuses B's stage and never trains
    def must_not_train() -> StageResult:
        raise AssertionError("a finished stage was trained again")

    third = _store(mlflow_server, lease_url).get_or_train("teacher", key, {"arch": "fault-test"}, must_not_train)
    assert third.reused is True and third.ref == outcome["ref"]
    assert torch.equal(third.result.state_dict["w"], torch.ones(2))


# -- 2. a corrupt or half-written stage is never used ----------------------------------------------------
def _checkpoint_file(results_root: Path, run_id: str) -> Path:
    found = [p for p in (results_root / "mlartifacts").rglob(Path(CHECKPOINT).name) if run_id in p.parts]
    assert len(found) == 1, f"one checkpoint of run {run_id} under {results_root / 'mlartifacts'}, found {found}"
    return found[0]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "deleted"])
def test_a_corrupt_stage_checkpoint_is_flagged_and_trained_again(mlflow_server, results_root, tmp_path, damage):
    key = f"fault-corrupt-{uuid.uuid4().hex}"
    lease_url = f"sqlite:///{tmp_path / 'leases.db'}"
    first = _store(mlflow_server, lease_url).get_or_train("teacher", key, {"arch": "fault-test"}, lambda: _result(1.0))
    assert first.reused is False
    path = _checkpoint_file(results_root, first.ref)
    payload = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * (len(payload) // 16 + 1))
    elif damage == "truncated":  # a half-written upload
        path.write_bytes(payload[: len(payload) // 2])
    else:
        path.unlink()

    trained: list[int] = []

    def train_again() -> StageResult:
        trained.append(1)
        return _result(2.0)

    second = _store(mlflow_server, lease_url).get_or_train("teacher", key, {"arch": "fault-test"}, train_again)
    assert trained == [1] and second.reused is False and second.ref != first.ref
    assert torch.equal(second.result.state_dict["w"], torch.full((2,), 2.0))
    client = MlflowClient(mlflow_server)
    assert client.get_run(first.ref).data.tags.get("pxd.stage_corrupt") == "true"
    # from now on the good copy is the one reused
    third = _store(mlflow_server, lease_url).get_or_train("teacher", key, {"arch": "fault-test"}, train_again)
    assert trained == [1] and third.reused is True and third.ref == second.ref
    assert torch.equal(third.result.state_dict["w"], torch.full((2,), 2.0))


@pytest.mark.parametrize("status", ["RUNNING", "FINISHED"])
def test_a_stage_run_not_marked_complete_is_never_used(mlflow_server, tmp_path, status):
    """A writer that died between uploading and marking the run complete leaves exactly this: tags as
    `MlflowStageStore.save` sets them before the upload, and here even a valid checkpoint and hash."""
    key = f"fault-half-{uuid.uuid4().hex}"
    client = MlflowClient(mlflow_server)
    store = _store(mlflow_server, f"sqlite:///{tmp_path / 'leases.db'}")
    tags = {"pxd.kind": "stage", "pxd.stage": "teacher", "pxd.stage_key": key, "pxd.stage_complete": "false",
            "pxd.trained_by": "a-writer-that-died"}
    half = client.create_run(store.experiment_id, run_name=f"teacher-{key[:10]}", tags=tags).info.run_id
    buffer = io.BytesIO()
    torch.save({"w": torch.full((2,), 7.0)}, buffer)
    (tmp_path / "checkpoint.pt").write_bytes(buffer.getvalue())
    client.log_artifact(half, str(tmp_path / "checkpoint.pt"), "stage")
    client.set_tag(half, "pxd.checkpoint_sha256", hashlib.sha256(buffer.getvalue()).hexdigest())
    if status == "FINISHED":
        client.set_terminated(half, status="FINISHED")

    trained: list[int] = []

    def train() -> StageResult:
        trained.append(1)
        return _result(1.0)

    outcome = store.get_or_train("teacher", key, {"arch": "fault-test"}, train)
    assert trained == [1] and outcome.reused is False and outcome.ref != half
    assert torch.equal(outcome.result.state_dict["w"], torch.ones(2))
    again = store.get_or_train("teacher", key, {"arch": "fault-test"}, train)
    assert trained == [1] and again.reused is True and again.ref == outcome.ref


# -- 3. the sweep driver dies; --resume finishes the sweep -------------------------------------------------
def _space_file(tmp_path: Path, *, seed: int, **search: Any) -> Path:
    raw = tiny_space(**search)
    raw["seed"] = seed  # stage keys of their own: nothing shared with the other sweep tests
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _sweep_command(space: Path, name: str, root: Path, uri: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "sweep", str(space), "--name", name, "--root", str(root),
            "--tracking-uri", uri, "--quiet", *extra]


def _children(client: MlflowClient, parent: Any) -> list[Any]:
    return client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")


def _complete_children(client: MlflowClient, name: str) -> list[Any]:
    parent = find_sweep_run(client, name)
    if parent is None:
        return []
    return [r for r in _children(client, parent) if r.data.tags.get("pxd.state") == "COMPLETE"]


def _mid_sweep(client: MlflowClient, name: str, complete: int) -> bool:
    """At least `complete` trials COMPLETE in MLflow and another trial RUNNING (its run started)."""
    parent = find_sweep_run(client, name)
    states = [] if parent is None else [r.data.tags.get("pxd.state") for r in _children(client, parent)]
    return states.count("COMPLETE") >= complete and "RUNNING" in states


def test_a_trial_finished_before_the_crash_is_not_told_twice_on_resume(tmp_path):
    """The resume race in miniature, deterministic: Tune's last state snapshot (searcher included) was
    taken while a trial ran; the trial then finished and was told to Optuna; the driver died. On
    `--resume` the restored searcher hears that trial's result again and must take it as already told."""
    spec = parse_spec(tiny_space(), source_path="tiny.yaml")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = make_searcher(spec, "resume-race", storage)
    params = searcher.suggest("t1")
    searcher.save(str(tmp_path / "searcher.pkl"))  # the last snapshot before the crash
    result = {"val_top1": 0.5, "pixels": float(params["student.resolution"]) ** 2, FINAL_REPORT: True,
              "mlflow_run_id": "run-1", "constraints": []}
    searcher.on_trial_complete("t1", result)

    restored = make_searcher(spec, "resume-race", storage)
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_complete("t1", result)  # the resumed trial reports its recorded result

    trials = optuna.load_study(study_name="resume-race", storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE]
    assert trials[0].values == [0.5, result["pixels"]] and trials[0].user_attrs["mlflow_run_id"] == "run-1"


def test_a_resume_does_not_draw_again_what_trials_after_tunes_snapshot_drew(tmp_path):
    """Tune's last snapshot holds the searcher, sampler state included, from before trial t2 was drawn; t2
    then ran and finished, and the driver died. The restored sampler must not replay t2's draw for the
    next trial (the same student twice on the frontier)."""
    from orchestrator.driver.budget import SweepSearchGenerator

    raw = tiny_space(sampler={"name": "random", "seed": 3}, trials=8)
    raw["distill"]["isrd"] = {"uniform": [0.0, 2.0]}
    spec = parse_spec(raw, source_path="tiny.yaml")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    budget = tmp_path / "budget.json"
    generator = SweepSearchGenerator(make_searcher(spec, "replay", storage), budget)
    generator.searcher.suggest("t1")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    generator.save_to_dir(str(snapshot), session_str="s")  # the last snapshot before the crash
    drawn_after = generator.searcher.suggest("t2")
    generator.searcher.on_trial_complete("t2", {"val_top1": 0.5, "pixels": 256.0, FINAL_REPORT: True,
                                                "mlflow_run_id": "run-2", "constraints": []})

    restored = SweepSearchGenerator(make_searcher(spec, "replay", storage), budget)
    restored.restore_from_dir(str(snapshot))
    assert restored.searcher.suggest("t3") != drawn_after


def test_a_resumed_launch_reports_progress_from_what_earlier_launches_finished():
    """Tune restores its callbacks from the first launch's pickle: the restored progress is the resuming
    launch's own, counting the trials already finished, each once, and the closing line is the one that heard the events."""
    import pickle

    from orchestrator.driver.progress import SweepProgress
    from orchestrator.results.frontier import TrialRow

    spec = parse_spec(tiny_space(), source_path="tiny.yaml")
    first = SweepProgress(spec, total=6, quiet=True)
    pickled = pickle.dumps(first)  # what tuner.pkl holds
    resuming = SweepProgress(spec, total=6, quiet=True)
    done = TrialRow(trial_id="a", run_id="r-a", metrics={"val_top1": 0.5, "pixels": 256.0}, params={}, state="COMPLETE")
    lost_attempt = TrialRow(trial_id="a", run_id="r-a0", metrics={}, params={}, state="FAILED")  # "a" was retried
    resuming.resume_from([done, lost_attempt, TrialRow(trial_id="b", run_id="r-b", metrics={}, params={}, state="FAILED")])
    with resuming.reporting():
        restored = pickle.loads(pickled)
    assert restored is resuming
    assert "1/6 done · 0 running · 1 failed" in resuming.status()

    class Trial:
        trial_id = "a"

    # the resumed trial "a" reports its recorded result again: still one done, one frontier point
    resuming.on_trial_result(0, [], Trial(), {**done.metrics, FINAL_REPORT: True, "mlflow_run_id": "r-a"})
    assert len(resuming.done) == 1 and resuming.front.size == 1
    assert not isinstance(pickle.loads(pickled), SweepProgress)  # outside a launch: a callback that does nothing


def test_a_killed_sweep_driver_resumes_without_losing_finished_trials(mlflow_server, tmp_path, ray_tmp, capsys):
    trials = 4
    name = f"faults-resume-{uuid.uuid4().hex[:6]}"
    space = _space_file(tmp_path, seed=11, trials=trials, max_concurrent=2)
    root = tmp_path / "root"
    # a short lease TTL: stages the killed trials were training are free again quickly on resume
    env = _env(RAY_ADDRESS="local", RAY_TMPDIR=ray_tmp, PXD_STAGE_LEASE_TTL_S="5")
    client = MlflowClient(mlflow_server)
    logs = (tmp_path / "driver.log", tmp_path / "resume.log")

    driver = resumed = None
    try:
        # Tune snapshots its experiment state (trial statuses, searcher) at most every ~10 s; here only
        # once, when the first two trials are queued, so the crash always lands in the worst window:
        # trials finished in MLflow and told to Optuna, but still unfinished in Tune's snapshot
        first_env = {**env, "TUNE_GLOBAL_CHECKPOINT_S": "3600"}
        driver = _spawn(_sweep_command(space, name, root, mlflow_server), logs[0], first_env)
        # kill mid-trial: 2 trials done and another one running
        _wait_for(lambda: _mid_sweep(client, name, 2), "2 complete trials and a running one",
                  procs=(driver,), logs=logs)
        os.killpg(driver.pid, signal.SIGKILL)  # the driver, its Ray and every trial process
        killed_at = time.time() * 1000
        driver.wait(timeout=30)
        before = {r.info.run_id: r for r in _complete_children(client, name)}
        assert 2 <= len(before) < trials, "the driver must die mid-sweep"

        resumed = _spawn(_sweep_command(space, name, root, mlflow_server, "--resume"), logs[1], env)
        _wait_for(lambda: resumed.poll() is not None, "the resumed sweep to finish", logs=logs)
        assert resumed.returncode == 0, _tails(logs)
    finally:
        _kill_group(driver)
        _kill_group(resumed)

    # the trials finished before the crash are untouched
    for run_id, old in before.items():
        now = client.get_run(run_id)
        assert now.info.status == "FINISHED" and now.data.tags["pxd.state"] == "COMPLETE"
        assert now.data.metrics == old.data.metrics and now.data.params == old.data.params

    parent = find_sweep_run(client, name)
    assert parent.info.status == "FINISHED"
    left_running = [r.info.run_id for r in _children(client, parent) if r.data.tags.get("pxd.state") == "RUNNING"]
    assert not left_running, "the run of a trial killed with the driver must not stay RUNNING"
    complete = _complete_children(client, name)
    trial_ids = [r.data.tags["pxd.trial_id"] for r in complete]
    detail = [(r.data.tags["pxd.trial_id"], r.info.start_time, r.info.end_time, r.info.run_id in before) for r in complete]
    assert len(complete) == trials and len(set(trial_ids)) == trials, f"one COMPLETE run per trial, got {detail} killed at {killed_at}; {_tails(logs)}"
    assert set(before) <= {r.info.run_id for r in complete}
    combos = {(r.data.params["student.arch"], r.data.params["student.resolution"]) for r in complete}
    assert len(combos) == trials, "the grid sampler must not repeat a point across the resume"

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'sweeps' / name / 'optuna.db'}")
    told = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(told) == trials
    assert {t.user_attrs["mlflow_run_id"] for t in told} == {r.info.run_id for r in complete}

    capsys.readouterr()
    assert main(["frontier", name, "--tracking-uri", mlflow_server, "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["n_eligible"] == trials
    assert {row["run_id"] for row in table["rows"]} == {r.info.run_id for r in complete}
    assert parent.data.metrics["trials_complete"] == trials


def test_a_trial_recorded_complete_after_tunes_snapshot_is_told_to_optuna_when_the_sweep_ends(mlflow_server, tmp_path):
    """The driver died after a trial recorded its result in MLflow and before it told Optuna (after Tune's
    last snapshot, so the resume does not rerun it): at the end the study gets the recorded values, as
    the searcher would have told them; a trial with no recorded result is told FAIL."""
    from orchestrator.driver.reconcile import close_optuna_trials
    from orchestrator.results import schema

    spec = parse_spec(tiny_space(constraints={"max_pixels": 300}))
    name = f"faults-told-{uuid.uuid4().hex[:6]}"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name=name, storage=storage, directions=["maximize", "minimize"])
    recorded, lost = study.ask(), study.ask()
    recorded.set_user_attr("tune_trial_id", "aaaa0001")
    lost.set_user_attr("tune_trial_id", "aaaa0002")
    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment(name)
    parent = client.create_run(experiment, tags={schema.Tag.KIND: "sweep", schema.Tag.SWEEP: name})
    run = client.create_run(experiment, tags={schema.Tag.PARENT_RUN: parent.info.run_id, schema.Tag.KIND: schema.KIND_TRIAL,
                                              schema.Tag.TRIAL_ID: "aaaa0001", schema.Tag.STATE: "COMPLETE"})
    client.log_metric(run.info.run_id, "val_top1", 0.375)
    client.log_metric(run.info.run_id, "pixels", 256.0)
    client.set_terminated(run.info.run_id)

    close_optuna_trials(name, storage, stopped=False, spec=spec, client=client, parent_run_id=parent.info.run_id)

    trials = {t.number: t for t in optuna.load_study(study_name=name, storage=storage).trials}
    told = trials[recorded.number]
    assert told.state == optuna.trial.TrialState.COMPLETE and told.values == [0.375, 256.0]
    assert told.user_attrs["mlflow_run_id"] == run.info.run_id
    assert told.constraints == {"max_pixels": -44.0}  # 256 pixels under the limit of 300: satisfied (≤ 0)
    assert trials[lost.number].state == optuna.trial.TrialState.FAIL


# -- 4. the tracking server restarts mid-sweep -----------------------------------------------------------
def _crash(server: EmbeddedServer) -> None:
    """SIGKILL a server this test started (and its workers): a crash, not a clean shutdown. Then the
    test stops using it (its registration as a user goes; nothing else is stopped)."""
    _kill_group(server.process)
    server.process = None
    server.stop()


def test_a_sweep_survives_a_tracking_server_restart(tmp_path, ray_tmp):
    trials = 3
    name = f"faults-restart-{uuid.uuid4().hex[:6]}"
    space = _space_file(tmp_path, seed=12, trials=trials, max_concurrent=2)
    store_root = tmp_path / "server"
    store_root.mkdir()
    port = free_port()
    env = _env(RAY_ADDRESS="local", RAY_TMPDIR=ray_tmp)
    logs = (tmp_path / "driver.log", store_root / "mlflow-server.log")

    server = EmbeddedServer(store_root, port=port)
    restarted = None
    driver = None
    try:
        uri = server.start()
        client = MlflowClient(uri)
        driver = _spawn(_sweep_command(space, name, tmp_path / "root", uri), logs[0], env)
        # crash the server while trials are talking to it: one trial done, another one running
        _wait_for(lambda: _mid_sweep(client, name, 1), "a complete trial and a running one", procs=(driver,), logs=logs)
        done_before = len(_complete_children(client, name))
        _crash(server)
        assert done_before < trials and driver.poll() is None, "the server must go down mid-sweep"
        restarted = EmbeddedServer(store_root, port=port)
        assert restarted.start() == uri
        _wait_for(lambda: driver.poll() is not None, "the sweep to finish", logs=logs)
        assert driver.returncode == 0, _tails(logs)

        client = MlflowClient(uri)
        parent = find_sweep_run(client, name)
        assert parent.info.status == "FINISHED"
        children = _children(client, parent)
        assert len(children) == trials, [(r.data.tags.get("pxd.state"), r.data.tags.get("pxd.error"), r.data.tags.get("pxd.traceback", "")[-1500:]) for r in children]
        for run in children:
            assert run.info.status == "FINISHED" and run.data.tags["pxd.state"] == "COMPLETE"
            assert {"val_top1", "pixels", "gmacs"} <= set(run.data.metrics)
            assert run.data.tags.get("pxd.model_uri")
        assert parent.data.metrics["trials_complete"] == trials
    finally:
        _kill_group(driver)
        _crash(server)
        if restarted is not None:
            _crash(restarted)
