"""A trial records where its time outside training went, and reuses a latency measurement of its sweep."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.driver.parent_run import ensure_experiment, open_parent_run
from orchestrator.results import schema
from orchestrator.space.spec import parse_spec
from orchestrator.worker.context import TrialContext
from orchestrator.worker.kept import WorkerState
from orchestrator.worker.trainable import TuneTrial
from orchestrator.worker.trial import OVERHEAD_CUTS_ENV, TRIAL_SECTIONS, run_trial
from pxd.pipeline import TIMED_SECTIONS
from tests.orchestrator.conftest import tiny_space


def _context(mlflow_server: str, name: str) -> tuple[TrialContext, MlflowClient]:
    raw = tiny_space()
    raw["seed"] = 43  # stages of its own: the stage store is shared with the other sweep tests
    raw["student"]["arch"] = "resnet10t"
    del raw["student"]["depths"], raw["student"]["widths"]
    spec = parse_spec(raw, source_path="overhead.yaml")
    client = MlflowClient(mlflow_server)
    experiment_id = ensure_experiment(client, "overhead-test")
    parent = open_parent_run(client, experiment_id, name, spec, "sqlite:///unused.db", resume=False)
    return TrialContext(spec=spec, sweep_name=name, tracking_uri=mlflow_server, experiment_id=experiment_id,
                        parent_run_id=parent), client


@pytest.fixture
def fresh_trial_processes(monkeypatch, tmp_path):
    """Each trial as in a new process (a fresh `WorkerState`: no measurement held in memory), the cache on
    disk under tmp_path."""
    monkeypatch.setenv("PXD_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(OVERHEAD_CUTS_ENV, raising=False)
    return WorkerState.from_environment


def test_a_second_trial_of_the_same_student_reuses_the_latency_and_says_so(mlflow_server, fresh_trial_processes):
    context, client = _context(mlflow_server, "overhead-test-reuse")
    runs = []
    for resolution in (8, 8, 16):
        runs.append(client.get_run(run_trial({"student.resolution": resolution}, context, fresh_trial_processes()).run_id))
    metrics = [run.data.metrics for run in runs]
    reused = [m[schema.SweepMetric.LATENCY_REUSED] for m in metrics]
    assert reused == [0.0, 1.0, 0.0]  # the same architecture and input reuse it; another resolution re-measures
    assert metrics[1]["latency_ms"] == metrics[0]["latency_ms"]
    for recorded in metrics:
        for section in [*(s for s in TIMED_SECTIONS if s != "training"), *TRIAL_SECTIONS]:
            assert recorded[schema.SweepMetric.overhead(section)] >= 0.0
    # the first trial trained the teacher, the assistant and its student; the second reused all three
    assert metrics[0][schema.SweepMetric.STAGE_SECONDS_TRAINED] > 0.0
    assert metrics[1][schema.SweepMetric.STAGE_SECONDS_TRAINED] == 0.0
    first = runs[0]
    assert (first.info.end_time - first.info.start_time) / 1000 >= metrics[0][schema.SweepMetric.STAGE_SECONDS_TRAINED]


def test_latency_reuse_can_be_turned_off(mlflow_server, fresh_trial_processes, monkeypatch):
    monkeypatch.setenv(OVERHEAD_CUTS_ENV, "0")
    context, client = _context(mlflow_server, "overhead-test-no-reuse")
    reused = []
    for _ in range(2):
        result = run_trial({"student.resolution": 8}, context, fresh_trial_processes())
        reused.append(client.get_run(result.run_id).data.metrics[schema.SweepMetric.LATENCY_REUSED])
    assert reused == [0.0, 0.0]


def test_a_kept_worker_process_loads_the_dataset_once(monkeypatch):
    """With search.reuse_actors a worker process runs trial after trial: the second trial of the same
    dataset gets the splits already in memory; another dataset replaces them; cuts off loads every time."""
    monkeypatch.delenv(OVERHEAD_CUTS_ENV, raising=False)
    spec = parse_spec(tiny_space(), source_path="overhead.yaml")
    config = spec.base
    state = WorkerState.from_environment()
    first = state.dataset(config)
    assert state.dataset(config) is first
    other = dataclasses.replace(config, dataset=dataclasses.replace(config.dataset, train_per_class=4))
    assert state.dataset(other) is not first and len(state.datasets) == 1
    assert len(state.dataset(other).train) == 4 * first.num_classes
    monkeypatch.setenv(OVERHEAD_CUTS_ENV, "0")
    assert WorkerState.from_environment().dataset(config) is None  # the pipeline loads it itself


def test_the_trainable_keeps_one_worker_state_per_process_and_never_ships_it():
    """Tune ships the trainable to each worker process by pickling it: what a process keeps stays there, and
    each process starts with none (it creates its own `WorkerState` on its first trial)."""
    trainable = TuneTrial()
    trainable.state = WorkerState.from_environment()
    trainable.state.datasets[("kept", 0)] = object()
    shipped = pickle.loads(pickle.dumps(trainable))
    assert shipped.state is None
    assert trainable.state.datasets  # the sender's own state is untouched
