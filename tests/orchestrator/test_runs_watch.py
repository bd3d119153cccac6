"""The driver reads a sweep's runs as they end (`RunsWatch`), so its end reads only the last few; what it
returns at the end is what one search at the end would return."""

from __future__ import annotations

import time
import uuid

from mlflow.tracking import MlflowClient

from orchestrator.tracking.watch import RunsWatch

FILTER = "tags.`pxd.kind` = 'trial'"


def _setup(mlflow_server: str) -> tuple[MlflowClient, str]:
    client = MlflowClient(mlflow_server)
    return client, client.create_experiment(f"runs-watch-{uuid.uuid4().hex[:6]}")


def _run(client: MlflowClient, experiment: str, kind: str = "trial") -> str:
    return client.create_run(experiment, tags={"pxd.kind": kind}).info.run_id


def test_the_watch_returns_every_run_of_its_filter_ended_or_running_as_one_search_would(mlflow_server):
    client, experiment = _setup(mlflow_server)
    watch = RunsWatch(client, lambda: experiment, FILTER, interval_s=3600)
    first = _run(client, experiment)
    client.set_tag(first, "pxd.state", "COMPLETE")
    client.set_terminated(first)
    _run(client, experiment, kind="stage")  # another filter's run
    watch.read_ended()
    assert set(watch.runs) == {first}
    running, later = _run(client, experiment), _run(client, experiment)
    client.log_metric(later, "val_top1", 0.5)
    client.set_terminated(later, status="FAILED")
    runs = watch.final()
    expected = client.search_runs([experiment], FILTER, order_by=["attributes.start_time DESC"])
    assert [r.info.run_id for r in runs] == [r.info.run_id for r in expected]
    by_id = {r.info.run_id: r for r in runs}
    assert by_id[running].info.status == "RUNNING"
    assert by_id[later].info.status == "FAILED" and by_id[later].data.metrics["val_top1"] == 0.5
    assert by_id[first].data.tags["pxd.state"] == "COMPLETE"


def test_a_run_ended_by_a_clock_slightly_behind_is_still_read_and_a_run_ended_again_is_read_again(mlflow_server):
    client, experiment = _setup(mlflow_server)
    watch = RunsWatch(client, lambda: experiment, FILTER, interval_s=3600, skew_ms=60_000)
    now = int(time.time() * 1000)
    ahead = _run(client, experiment)
    client.set_terminated(ahead, end_time=now)
    watch.read_ended()
    behind = _run(client, experiment)  # ends on a node whose clock is 30 s behind the first one's
    client.set_terminated(behind, end_time=now - 30_000)
    reopened = ahead
    client.set_tag(reopened, "pxd.state", "FAILED")  # a lost attempt closed again later, with its cause
    client.set_terminated(reopened, status="FAILED", end_time=now + 1_000)
    watch.read_ended()
    assert behind in watch.runs
    assert watch.runs[reopened].data.tags["pxd.state"] == "FAILED"


def test_the_watch_reads_in_its_thread_and_waits_for_an_experiment_that_does_not_exist_yet(mlflow_server):
    client = MlflowClient(mlflow_server)
    name = f"runs-watch-later-{uuid.uuid4().hex[:6]}"

    def experiment_id() -> str | None:
        found = client.get_experiment_by_name(name)
        return None if found is None else found.experiment_id

    watch = RunsWatch(MlflowClient(mlflow_server), experiment_id, FILTER, interval_s=0.2).start()
    time.sleep(0.5)  # reads while the experiment is missing: nothing, no error
    experiment = client.create_experiment(name)
    run = _run(client, experiment)
    client.set_terminated(run)
    deadline = time.monotonic() + 60
    while run not in watch.runs and time.monotonic() < deadline:
        time.sleep(0.1)
    assert run in watch.runs, "the thread read the run that ended"
    assert [r.info.run_id for r in watch.final()] == [run]
