"""A Ray worker node dies mid-trial: its trial runs again on the surviving node, and nothing is lost or
left running. Native topology, real processes: Postgres (a fresh MLflow database and a fresh Optuna +
lease database), `mlflow server` on Postgres, a Ray head that runs no trials and two worker nodes with
1 CPU each (`ray start` processes with their own temp dir, ports and auth token), `pxd sweep` as its own
driver. The test kills every process of the node a trial is training on (its `ray start`, raylet and
workers: a node lost to a spot preemption or a kernel panic looks the same to Ray).

Every process started here is stopped by its own pid / process group. ~3-5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.results import schema
from tests.orchestrator.conftest import tiny_space
from tests.orchestrator.test_cluster import (
    REPO,
    Cluster,
    _descendants,
    _kill_tree,
    _tail,
    _tool,
    databases,  # noqa: F401 - a fixture: fresh MLflow and Optuna databases
    running_cluster,
)

pytestmark = [pytest.mark.slow, pytest.mark.long]

SWEEP = "node-loss"
TRIALS = 3
SWEEP_TIMEOUT_S = 600.0  # a guard against hanging forever; nothing asserts on durations


@pytest.fixture(scope="module")
def nodes(databases) -> Iterator[Cluster]:  # noqa: F811 - the imported fixture
    """A head that runs no trials (the driver attaches to it, and it must survive) and two 1-CPU workers."""
    env_extra = {
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),  # this checkout
        "PXD_STAGE_LEASE_TTL_S": "5",  # a lease held on the dead node frees quickly
        # the head notices a silent node within ~3 s instead of Ray's default ~30 s
        "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
    }
    with running_cluster(databases, head_cpus=0, worker_cpus=(1, 1), env_extra=env_extra) as cluster:
        yield cluster


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
def loss(nodes: Cluster) -> Loss:
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


def _trial_runs(nodes: Cluster) -> list:
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
