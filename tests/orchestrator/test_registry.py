"""The metric registry: adding a metric is one row, and every part of a sweep picks it up.

The extra metric goes through the real path of a trial (the spec, `run_trial` against a real MLflow
server, the final result, the frontier read back from MLflow), in this process: a registration in the
test process does not reach Ray workers (a plugin registers its metrics in a module they import).
"""

from __future__ import annotations

import os
import uuid

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.driver.finish import finish_sweep
from orchestrator.driver.parent_run import ensure_experiment, open_parent_run
from orchestrator.results import schema
from orchestrator.space.spec import constraint_names, parse_spec
from orchestrator.worker.context import TrialContext
from orchestrator.worker.trial import run_trial
from pxd import metrics as registry
from pxd.errors import ConfigError
from tests.orchestrator.conftest import tiny_space


@pytest.fixture
def energy_metric():
    # a made-up energy model: joules grow with multiply-accumulates (nothing else in pxd knows this name)
    metric = registry.register(registry.Metric(
        name="energy_mj", mode="min", unit="mJ", description="energy per image (test model)",
        from_cost=lambda cost: 1000.0 * cost.gmacs * 4.6e-3,
    ))
    yield metric
    registry.unregister("energy_mj")


def _space(**search):
    raw = tiny_space(**search)
    raw["seed"] = 41  # stages of its own: the stage store is shared with the other sweep tests
    raw["student"]["arch"] = "resnet10t"
    del raw["student"]["depths"], raw["student"]["widths"]
    raw["student"]["resolution"] = {"choice": [8, 24]}
    return raw


def test_unregistered_metric_is_refused_by_the_spec():
    with pytest.raises(ConfigError) as error:
        parse_spec(_space(objectives=[{"metric": "val_top1"}, {"metric": "energy_mj"}], reference_point={"energy_mj": 1}))
    assert error.value.field == "search.objectives.1.metric"


def test_a_registered_metric_is_accepted_recorded_constrained_and_on_the_frontier(energy_metric, mlflow_server):
    raw = _space(objectives=[{"metric": "val_top1"}, {"metric": "energy_mj"}],
                 reference_point={"energy_mj": 10.0}, constraints={"max_energy_mj": 1e6})
    spec = parse_spec(raw, source_path="energy.yaml")
    search = spec.require_search()
    assert search.objective_pairs == [("val_top1", "max"), ("energy_mj", "min")]  # mode from the registry
    assert constraint_names(spec) == ("max_energy_mj",)
    assert "energy_mj" in registry.final_metrics() and "energy_mj" in registry.summary_metrics()

    client = MlflowClient(mlflow_server)
    experiment_id = ensure_experiment(client, "registry-test")
    parent = open_parent_run(client, experiment_id, "registry-test-sweep", spec, "sqlite:///unused.db", resume=False)
    context = TrialContext(spec=spec, sweep_name="registry-test-sweep", tracking_uri=mlflow_server,
                           experiment_id=experiment_id, parent_run_id=parent)
    before = os.environ.get("MLFLOW_TRACKING_URI")
    results = [run_trial({"student.resolution": resolution}, context) for resolution in (8, 24)]
    assert os.environ.get("MLFLOW_TRACKING_URI") == before  # an in-process trial leaves the process's URI alone
    for result in results:
        recorded = client.get_run(result.run_id).data.metrics
        assert recorded["energy_mj"] == pytest.approx(1000.0 * recorded["gmacs"] * 4.6e-3)
        assert result.constraints == [pytest.approx(recorded["energy_mj"] - 1e6)]
        assert result.feasible
    table, rows = finish_sweep(client, parent)
    assert [o["name"] for o in table["objectives"]] == ["val_top1", "energy_mj"]
    cheaper = min(results, key=lambda r: r.metrics["energy_mj"])
    on_front = {row["run_id"] for row in table["rows"] if row["on_frontier"]}
    assert cheaper.run_id in on_front  # the cheapest point on a new axis is always on the frontier
    assert client.get_run(cheaper.run_id).data.tags[schema.Tag.ON_FRONTIER] == "true"


def test_a_constraint_on_the_registered_metric_makes_trials_infeasible(energy_metric, mlflow_server):
    raw = _space(objectives=[{"metric": "val_top1"}, {"metric": "energy_mj"}],
                 reference_point={"energy_mj": 10.0}, constraints={"max_energy_mj": 1e-9})
    spec = parse_spec(raw, source_path="energy.yaml")
    client = MlflowClient(mlflow_server)
    experiment_id = ensure_experiment(client, "registry-test")
    parent = open_parent_run(client, experiment_id, "registry-test-infeasible", spec, "sqlite:///unused.db", resume=False)
    context = TrialContext(spec=spec, sweep_name="registry-test-infeasible", tracking_uri=mlflow_server,
                           experiment_id=experiment_id, parent_run_id=parent)
    result = run_trial({"student.resolution": 8}, context)
    assert not result.feasible
    table, _ = finish_sweep(client, parent)
    assert table["n_eligible"] == 0


def test_hardware_latencies_are_registered_but_never_computed_by_a_trial():
    from pxd.cost import Cost
    from pxd.metrics import hardware_metric, metrics_from_cost

    metric = hardware_metric("probe-hw")
    try:
        cost = Cost(params_m=1.0, gmacs=0.1, pixels=256, latency_ms=2.0, throughput_ips=10.0, batch_size=4,
                    device="cpu", dtype="float32", threads=1, warmup=1, repeats=2)
        values = metrics_from_cost(cost, {"val_top1": 0.5})
        assert metric.name not in values and values["latency_ms"] == 2.0 and values["val_top1"] == 0.5
    finally:
        registry.unregister(metric.name)


class _RacedClient(MlflowClient):
    """A client whose first look-up of an experiment misses it while another sweep creates it right after."""

    def get_experiment_by_name(self, name):
        found = super().get_experiment_by_name(name)
        if found is None and not getattr(self, "raced", False):
            self.raced = True
            MlflowClient(self.tracking_uri).create_experiment(name)  # the other sweep, a moment later
        return found


def test_two_sweeps_of_one_space_creating_its_experiment_at_once_share_it(mlflow_server):
    name = f"raced-{uuid.uuid4().hex[:6]}"
    experiment_id = ensure_experiment(_RacedClient(mlflow_server), name)
    assert experiment_id == MlflowClient(mlflow_server).get_experiment_by_name(name).experiment_id
