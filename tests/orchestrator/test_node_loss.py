"""A Ray worker node dies mid-trial: its trial runs again on the surviving node, and nothing is lost or
left running. Native topology, real processes: Postgres (a fresh MLflow database and a fresh Optuna +
lease database), `mlflow server` on Postgres, a Ray head that runs no trials and two worker nodes with
1 CPU each (`ray start` processes with their own temp dir, ports and auth token), `pxd sweep` as its own
driver. The test kills every process of the node a trial is training on (its `ray start`, raylet and
workers: a node lost to a spot preemption or a kernel panic looks the same to Ray).

Every process started here is stopped by its own pid / process group. ~3-5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator import schema
from tests.orchestrator.conftest import free_port, tiny_space
from tests.orchestrator.test_cluster import (
    _cluster_env,
    _descendants,
    _healthy,
    _kill_tree,
    _pg_url,
    _ray_started,
    _tail,
    _tool,
    _wait_for,
    databases,  # noqa: F401 - a fixture: fresh MLflow and Optuna databases
)

pytestmark = pytest.mark.slow

SWEEP = "node-loss"
TRIALS = 3
SWEEP_TIMEOUT_S = 600.0  # a guard against hanging forever; nothing asserts on durations


@dataclass
class Nodes:
    ray_address: str
    tracking_uri: str
    optuna_storage: str
    env: dict[str, str]
    workdir: Path
    workers: list[subprocess.Popen]
    processes: list[subprocess.Popen] = field(default_factory=list)


@pytest.fixture(scope="module")
def nodes(databases) -> Iterator[Nodes]:  # noqa: F811 - the imported fixture
    ray_cli, mlflow_cli = _tool("ray"), _tool("mlflow")
    workdir = Path(tempfile.mkdtemp(prefix="pxdnl-"))  # short: Ray's unix socket paths
    env = _cluster_env(secrets.token_hex(32))
    env.update(
        PXD_STAGE_LEASE_TTL_S="5",  # a lease held on the dead node frees quickly
        # the head notices a silent node within ~3 s instead of Ray's default ~30 s
        RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000", RAY_health_check_failure_threshold="3",
    )
    ray_port, dashboard_port, mlflow_port = free_port(), free_port(), free_port()
    result = Nodes(ray_address=f"127.0.0.1:{ray_port}", tracking_uri=f"http://127.0.0.1:{mlflow_port}",
                   optuna_storage=_pg_url(databases["optuna"]), env=env, workdir=workdir, workers=[])

    def start(command: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as handle:
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=workdir,
                                       start_new_session=True)
        result.processes.append(process)
        return process

    common = ["--disable-usage-stats", "--temp-dir", str(workdir / "ray"), "--block"]
    try:
        head_log = workdir / "ray-head.log"
        # 0 CPUs: no trial runs on the head, which the driver attaches to and which must survive
        head = start([*ray_cli, "start", "--head", "--port", str(ray_port), "--num-cpus", "0",
                      "--include-dashboard=false", "--dashboard-port", str(dashboard_port), *common], head_log)
        server_log = workdir / "mlflow.log"
        server = start([*mlflow_cli, "server", "--backend-store-uri", _pg_url(databases["mlflow"]),
                        "--serve-artifacts", "--artifacts-destination", str(workdir / "artifacts"),
                        "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"], server_log)
        _wait_for(lambda: _ray_started(head_log), head, "the Ray head", head_log)
        for index in range(2):
            log = workdir / f"ray-worker-{index}.log"
            worker = start([*ray_cli, "start", "--address", result.ray_address, "--num-cpus", "1", *common], log)
            _wait_for(lambda log=log: _ray_started(log), worker, f"Ray worker node {index}", log)
            result.workers.append(worker)
        _wait_for(lambda: _healthy(result.tracking_uri), server, "mlflow server", server_log)
        yield result
    finally:
        for process in reversed(result.processes):
            _kill_tree(process)
        shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class Loss:
    returncode: int
    stderr: str
    dead_node: str  # the Ray node id of the killed node
    dead_run: str  # the MLflow run of the attempt that was training there


def _training_attempt(client: MlflowClient, workers: list[subprocess.Popen]) -> tuple[subprocess.Popen, str, str] | None:
    """(worker node process, node id, run id) of a trial attempt that has started training on a worker."""
    parent = schema.find_sweep_run(client, SWEEP)
    if parent is None:
        return None
    for run in schema.trial_runs(client, parent, state="RUNNING"):
        pid = int(run.data.tags.get(schema.Tag.PID, 0))
        if not run.data.metrics:  # no epoch logged yet
            continue
        for worker in workers:
            if pid in _descendants(worker.pid):
                return worker, run.data.tags[schema.Tag.NODE_ID], run.info.run_id
    return None


@pytest.fixture(scope="module")
def loss(nodes: Nodes) -> Loss:
    """`pxd sweep` on the cluster (3 trials, 2 at a time); one worker node killed while a trial trains on it."""
    space = nodes.workdir / "space.yaml"
    raw = tiny_space(trials=TRIALS, max_concurrent=2, max_retries=2)
    raw["seed"] = 51
    raw["student"]["epochs"] = 10  # long enough to be caught mid-training
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    command = [*_tool("pxd"), "sweep", str(space), "--ray-address", nodes.ray_address,
               "--tracking-uri", nodes.tracking_uri, "--optuna-storage", nodes.optuna_storage,
               "--root", str(nodes.workdir / "root"), "--name", SWEEP, "--quiet"]
    log = nodes.workdir / "sweep.log"
    with open(log, "ab") as handle:
        driver = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=nodes.env, cwd=nodes.workdir,
                                  start_new_session=True)
    nodes.processes.append(driver)
    client = MlflowClient(nodes.tracking_uri)
    deadline = time.monotonic() + SWEEP_TIMEOUT_S
    found = None
    while found is None and time.monotonic() < deadline and driver.poll() is None:
        found = _training_attempt(client, nodes.workers)
        time.sleep(0.5)
    assert found is not None, f"no trial was caught training on a worker node:\n{_tail(log, 60)}"
    worker, dead_node, dead_run = found
    _kill_tree(worker)
    try:
        driver.wait(timeout=max(deadline - time.monotonic(), 1.0))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the sweep did not finish after the node died:\n{_tail(log, 60)}")
    return Loss(driver.returncode, _tail(log, 60), dead_node, dead_run)


def _trial_runs(nodes: Nodes) -> list:
    client = MlflowClient(nodes.tracking_uri)
    return schema.trial_runs(client, schema.find_sweep_run(client, SWEEP))


def test_a_trial_on_a_dead_node_runs_again_on_the_surviving_node(nodes, loss):
    assert loss.returncode == 0, loss.stderr
    runs = _trial_runs(nodes)
    complete = [r for r in runs if r.data.tags[schema.Tag.STATE] == "COMPLETE"]
    trial_ids = [r.data.tags[schema.Tag.TRIAL_ID] for r in complete]
    assert len(complete) == TRIALS and len(set(trial_ids)) == TRIALS, "one COMPLETE run per planned trial"
    dead = next(r for r in runs if r.info.run_id == loss.dead_run)
    retry = next(r for r in complete if r.data.tags[schema.Tag.TRIAL_ID] == dead.data.tags[schema.Tag.TRIAL_ID])
    assert retry.data.tags[schema.Tag.NODE_ID] != loss.dead_node, "the retry ran on the surviving node"
    assert retry.data.tags[schema.Tag.PARAMS] == dead.data.tags[schema.Tag.PARAMS], "same trial, same config"


def test_the_dead_attempt_is_recorded_failed_with_the_cause_and_nothing_is_left_running(nodes, loss):
    assert loss.returncode == 0, loss.stderr
    runs = _trial_runs(nodes)
    dead = next(r for r in runs if r.info.run_id == loss.dead_run)
    assert dead.info.status == "FAILED" and dead.data.tags[schema.Tag.STATE] == "FAILED"
    error = dead.data.tags[schema.Tag.ERROR]
    assert error.startswith("its node died") and loss.dead_node in error, error
    assert f"(host {dead.data.tags[schema.Tag.HOSTNAME]})" in error and "runs the trial again" in error
    assert [r.info.run_id for r in runs if r.data.tags[schema.Tag.STATE] not in ("COMPLETE",)] == [loss.dead_run]
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_the_optuna_study_holds_exactly_the_planned_complete_trials(nodes, loss):
    assert loss.returncode == 0, loss.stderr
    study = optuna.load_study(study_name=SWEEP, storage=nodes.optuna_storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * TRIALS
    complete = {r.info.run_id for r in _trial_runs(nodes) if r.data.tags[schema.Tag.STATE] == "COMPLETE"}
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == complete


def test_the_frontier_and_counts_ignore_the_dead_attempt(nodes, loss):
    assert loss.returncode == 0, loss.stderr
    complete = [r for r in _trial_runs(nodes) if r.data.tags[schema.Tag.STATE] == "COMPLETE"]
    points = {r.info.run_id: (r.data.metrics["val_top1"], r.data.metrics["pixels"]) for r in complete}

    def dominated(run_id: str) -> bool:
        top1, pixels = points[run_id]
        return any(t >= top1 and p <= pixels and (t, p) != (top1, pixels) for t, p in points.values())

    tagged = {r.info.run_id for r in complete if r.data.tags.get(schema.Tag.ON_FRONTIER) == "true"}
    assert tagged == {run_id for run_id in points if not dominated(run_id)}
    client = MlflowClient(nodes.tracking_uri)
    metrics = schema.find_sweep_run(client, SWEEP).data.metrics
    assert metrics["trials_complete"] == TRIALS and metrics["trials_failed"] == 0
