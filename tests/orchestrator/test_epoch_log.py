"""A trial's epochs reach its MLflow run while it trains: the first at once (a person watching the run, or a
fault test waiting for a trial to be training, sees it), later ones batched by time."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from orchestrator.driver.parent_run import ensure_experiment
from orchestrator.worker.trial import EpochLog


def _history(client: MlflowClient, run_id: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, "val_top1")]


def test_the_first_epoch_is_on_the_run_at_once_and_later_ones_wait_for_the_interval(mlflow_server):
    client = MlflowClient(mlflow_server)
    run_id = client.create_run(ensure_experiment(client, "epoch-log-test")).info.run_id
    log = EpochLog(client, run_id, interval_s=3600.0)
    log.add({"val_top1": 0.25}, step=0)
    assert _history(client, run_id) == [0], "the first epoch is sent as soon as it ends"
    log.add({"val_top1": 0.5}, step=1)
    log.add({"val_top1": 0.75}, step=2)
    assert _history(client, run_id) == [0], "later epochs wait for the interval"
    taken = log.take()
    assert [(m.step, m.value) for m in taken] == [(1, 0.5), (2, 0.75)]
    assert log.take() == []


def test_an_epoch_that_ends_after_the_interval_goes_at_once(mlflow_server):
    client = MlflowClient(mlflow_server)
    run_id = client.create_run(ensure_experiment(client, "epoch-log-test")).info.run_id
    log = EpochLog(client, run_id, interval_s=0.0)
    for step in range(3):
        log.add({"val_top1": step / 4}, step=step)
        assert _history(client, run_id) == list(range(step + 1))
