"""The MLflow stage store against a real `mlflow server`: incomplete stages resume where they stopped, and
only a missing or tampered checkpoint marks a stage corrupt (other read failures are retried, then fail
the trial and leave the stage alone)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from orchestrator.results.schema import STAGE_CHECKPOINT, Tag
from orchestrator.stages.io import StageUnavailable
from orchestrator.stages.leases import LocalLeases
from orchestrator.stages.listing import list_stages
from orchestrator.stages.memory import StageMemory
from orchestrator.stages.store import MlflowStageStore
from orchestrator.tracking.retries import install_body_retries
from orchestrator.worker.kept import WorkerState
from pxd.config import PipelineConfig
from pxd.pipeline import ResumableTraining, run_tas, stage_keys
from pxd.train import StageResult
from tests.orchestrator.conftest import free_port


class Interrupted(Exception):
    """Stands in for a killed trial: raised by the epoch callback."""


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setenv("PXD_STAGE_IO_ATTEMPTS", "3")
    monkeypatch.setenv("PXD_STAGE_IO_BACKOFF_S", "0.01")
    monkeypatch.setenv("PXD_STAGE_CHECKPOINT_INTERVAL_S", "0")  # every epoch


def _store(uri: str, memory: StageMemory | None = None) -> MlflowStageStore:
    """A fresh store, as a new trial process builds one (its own owner id); `memory`: what its worker
    process keeps between trials (None: a new process's)."""
    return MlflowStageStore(uri, leases=LocalLeases(), poll_s=0.1, wait_timeout_s=30, memory=memory)


def _unused_seed() -> int:
    """A seed no other test of the session used, so its stage keys are new to the shared server."""
    return 1000 + uuid.uuid4().int % 10**6


def _without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in record.items() if k != "epoch_seconds"} for record in history]


def test_an_interrupted_stage_resumes_from_its_last_epoch_with_the_same_result(mlflow_server, tiny_raw):
    tiny_raw["seed"] = _unused_seed()
    tiny_raw["teacher"]["epochs"] = 3
    tiny_raw["assistant"]["enabled"] = False
    cfg = PipelineConfig.from_dict(tiny_raw)
    uninterrupted = run_tas(cfg, measure_latency=False)
    key = stage_keys(cfg, _fingerprint(cfg))["teacher"]

    def stop_after_teacher_epoch_2(kind: str, epoch: int, _record: dict) -> None:
        if (kind, epoch) == ("teacher", 2):
            raise Interrupted

    first = _store(mlflow_server)
    with pytest.raises(Interrupted):
        run_tas(cfg, provider=first, on_epoch=stop_after_teacher_epoch_2, measure_latency=False)
    assert first.lookup(key) is None  # an incomplete stage is never a finished one
    [row] = [r for r in list_stages(mlflow_server) if r["key"] == key]
    assert row["state"] == "incomplete (epoch 2)"

    epochs: list[tuple[str, int]] = []
    resumed = run_tas(cfg, provider=_store(mlflow_server), on_epoch=lambda k, e, _r: epochs.append((k, e)),
                      measure_latency=False)

    assert epochs == [("teacher", 3), ("student", 1)]  # the teacher went on after epoch 2, not from epoch 1
    teacher = resumed.stages["teacher"]
    assert teacher.reused is False and teacher.ref == row["run_id"]  # the incomplete run, now complete
    run = MlflowClient(mlflow_server).get_run(teacher.ref)
    assert run.info.status == "FINISHED" and run.data.tags[Tag.STAGE_COMPLETE] == "true"
    assert run.data.tags[Tag.STAGE_RESUMED_FROM] == "2"
    assert _without_timing(teacher.result.history) == _without_timing(uninterrupted.stages["teacher"].result.history)
    for name, tensor in uninterrupted.student.state_dict().items():
        assert torch.equal(tensor, resumed.student.state_dict()[name]), name
    # and from now on it is a finished stage like any other
    again = run_tas(cfg, provider=_store(mlflow_server), measure_latency=False)
    assert again.stages["teacher"].reused and again.stages["teacher"].ref == teacher.ref


def _fingerprint(cfg: PipelineConfig) -> str:
    from pxd.data import load_dataset

    return load_dataset(cfg.dataset, cfg.seed).fingerprint


def _result(value: float) -> StageResult:
    return StageResult("teacher", state_dict={"w": torch.full((2,), value)}, metrics={"val_top1": 0.5})


def _stored(uri: str) -> tuple[str, str]:
    key = f"io-{uuid.uuid4().hex}"
    outcome = _store(uri).get_or_train("teacher", key, {"arch": "io-test"}, lambda: _result(1.0))
    return key, str(outcome.ref)


def _must_not_train() -> StageResult:
    raise AssertionError("a stage whose checkpoint could not be read was trained again")


def test_a_transient_download_error_is_retried_and_leaves_the_stage_alone(mlflow_server, monkeypatch):
    key, run_id = _stored(mlflow_server)
    store = _store(mlflow_server)
    real_download = store._download_file
    calls: list[str] = []

    def full_disk(*args, **kwargs):
        calls.append(args[1])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "_download_file", full_disk)
    with pytest.raises(StageUnavailable, match="after 3 attempts.*No space left on device"):
        store.get_or_train("teacher", key, {"arch": "io-test"}, _must_not_train)
    assert calls == [STAGE_CHECKPOINT] * 3
    tags = MlflowClient(mlflow_server).get_run(run_id).data.tags
    assert Tag.STAGE_CORRUPT not in tags and Tag.STAGE_CORRUPT_REASON not in tags

    # one failure, then the store is back: the retry loads the stage
    flaky = iter([OSError("connection reset")])

    def once_then_real(*args, **kwargs):
        error = next(flaky, None)
        if error is not None:
            raise error
        return real_download(*args, **kwargs)

    monkeypatch.setattr(store, "_download_file", once_then_real)
    outcome = store.get_or_train("teacher", key, {"arch": "io-test"}, _must_not_train)
    assert outcome.reused and outcome.ref == run_id
    assert torch.equal(outcome.result.state_dict["w"], torch.ones(2))


def test_an_unreachable_tracking_server_fails_the_load_without_marking_the_stage(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    key, run_id = _stored(mlflow_server)
    run = MlflowClient(mlflow_server).get_run(run_id)
    down = _store(f"http://127.0.0.1:{free_port()}")  # nothing listens there: the server is down
    with pytest.raises(StageUnavailable, match="after 3 attempts"):
        down.load(run)
    assert Tag.STAGE_CORRUPT not in MlflowClient(mlflow_server).get_run(run_id).data.tags
    assert _store(mlflow_server).get_or_train("teacher", key, {"arch": "io-test"}, _must_not_train).reused


def _artifact_file(results_root: Path, run_id: str, name: str) -> Path:
    [path] = [p for p in (results_root / "mlartifacts").rglob(name) if run_id in p.parts]
    return path


@pytest.mark.parametrize(("damage", "reason"), [("tampered", "sha256 mismatch"), ("deleted", "is missing")])
def test_only_a_missing_or_tampered_checkpoint_marks_the_stage_corrupt(mlflow_server, results_root, damage, reason):
    key, run_id = _stored(mlflow_server)
    path = _artifact_file(results_root, run_id, Path(STAGE_CHECKPOINT).name)
    if damage == "tampered":
        payload = path.read_bytes()
        path.write_bytes(payload[:-1] + bytes([payload[-1] ^ 0xFF]))  # one bit pattern changed, same size
    else:
        path.unlink()
    outcome = _store(mlflow_server).get_or_train("teacher", key, {"arch": "io-test"}, lambda: _result(2.0))
    assert outcome.reused is False and outcome.ref != run_id  # trained again
    tags = MlflowClient(mlflow_server).get_run(run_id).data.tags
    assert tags[Tag.STAGE_CORRUPT] == "true" and reason in tags[Tag.STAGE_CORRUPT_REASON]


def test_a_tampered_training_state_is_marked_corrupt_and_the_stage_starts_over(mlflow_server, results_root, tiny_raw):
    tiny_raw["seed"] = _unused_seed()
    tiny_raw["teacher"]["epochs"] = 2
    tiny_raw["assistant"]["enabled"] = False
    cfg = PipelineConfig.from_dict(tiny_raw)

    def stop_after_teacher_epoch_1(kind: str, epoch: int, _record: dict) -> None:
        if (kind, epoch) == ("teacher", 1):
            raise Interrupted

    with pytest.raises(Interrupted):
        run_tas(cfg, provider=_store(mlflow_server), on_epoch=stop_after_teacher_epoch_1, measure_latency=False)
    key = stage_keys(cfg, _fingerprint(cfg))["teacher"]
    [row] = [r for r in list_stages(mlflow_server) if r["key"] == key]
    partial = json.loads(MlflowClient(mlflow_server).get_run(row["run_id"]).data.tags[Tag.STAGE_PARTIAL])
    path = _artifact_file(results_root, row["run_id"], Path(partial["artifact"]).name)
    path.write_bytes(b"not a training state")

    epochs: list[tuple[str, int]] = []
    result = run_tas(cfg, provider=_store(mlflow_server), on_epoch=lambda k, e, _r: epochs.append((k, e)),
                     measure_latency=False)
    assert epochs[:2] == [("teacher", 1), ("teacher", 2)]  # from epoch 1: the damaged state was not used
    assert result.stages["teacher"].ref != row["run_id"]
    tags = MlflowClient(mlflow_server).get_run(row["run_id"]).data.tags
    assert tags[Tag.STAGE_CORRUPT] == "true" and "sha256 mismatch" in tags[Tag.STAGE_CORRUPT_REASON]


def _counting_searches(store: MlflowStageStore, searches: list[str], monkeypatch) -> MlflowStageStore:
    """The store, with each MLflow run search it makes (still made) appended to `searches`."""
    real_search = store.client.search_runs

    def search_runs(*args, **kwargs):
        searches.append(kwargs.get("filter_string", ""))
        return real_search(*args, **kwargs)

    monkeypatch.setattr(store.client, "search_runs", search_runs)
    return store


def test_a_kept_worker_process_searches_mlflow_for_a_stage_once(mlflow_server, monkeypatch):
    """A worker process that runs trial after trial (search.reuse_actors) finds a complete stage in
    MLflow once; its later trials take the verified copy it keeps. With the cuts off, every trial searches."""
    monkeypatch.delenv("PXD_OVERHEAD_CUTS", raising=False)
    key, run_id = _stored(mlflow_server)
    searches: list[str] = []
    kept = WorkerState.from_environment().stages  # one worker process
    for _ in range(3):  # three trials of one process, each with its own store, as run_trial builds
        store = _counting_searches(_store(mlflow_server, kept), searches, monkeypatch)
        outcome = store.get_or_train("teacher", key, {"arch": "io-test"}, _must_not_train)
        assert outcome.reused and outcome.ref == run_id
        assert torch.equal(outcome.result.state_dict["w"], torch.ones(2))
    assert len(searches) == 1

    monkeypatch.setenv("PXD_OVERHEAD_CUTS", "0")
    searches.clear()
    kept = WorkerState.from_environment().stages  # a worker process with the cuts off
    for _ in range(2):
        store = _counting_searches(_store(mlflow_server, kept), searches, monkeypatch)
        assert store.get_or_train("teacher", key, {"arch": "io-test"}, _must_not_train).ref == run_id
    assert len(searches) == 2


class _FinishedByAnotherTrial(LocalLeases):
    """The lease is free only once another trial has completed the stage (it held the lease until then)."""

    def __init__(self, uri: str, key: str) -> None:
        super().__init__()
        self.uri, self.key = uri, key
        self.other_run: str | None = None

    def acquire(self, key: str, owner: str, ttl_s: float) -> bool:
        if self.other_run is None:
            self.other_run = str(_store(self.uri).get_or_train("teacher", self.key, {"arch": "io-test"},
                                                               lambda: _result(2.0)).ref)
        return super().acquire(key, owner, ttl_s)


def test_a_stage_completed_just_before_the_lease_is_taken_is_reused_not_trained(mlflow_server, monkeypatch):
    """Between this trial's first look-up (a miss) and its lease, another trial finished the stage: the
    look-up under the lease (one search, also for incomplete runs) finds it, and nothing trains again."""
    key = f"io-{uuid.uuid4().hex}"
    leases = _FinishedByAnotherTrial(mlflow_server, key)
    store = _counting_searches(MlflowStageStore(mlflow_server, leases=leases, poll_s=0.1, wait_timeout_s=30),
                               [], monkeypatch)
    outcome = store.get_or_train("teacher", key, {"arch": "io-test"}, _must_not_train)
    assert outcome.reused and outcome.ref == leases.other_run
    assert torch.equal(outcome.result.state_dict["w"], torch.full((2,), 2.0))


def test_a_new_stage_is_searched_for_twice_before_it_trains(mlflow_server, monkeypatch):
    """A stage no trial has stored: one look-up before the lease, one under it (complete and incomplete runs
    at once), then it trains and is stored; its run's creation, answered at once, is not searched for again
    (`watch_retries`: only a creation sent twice can leave a second run)."""
    monkeypatch.delenv("PXD_OVERHEAD_CUTS", raising=False)
    install_body_retries()  # what lets the store see whether its creation was sent more than once
    key = f"io-{uuid.uuid4().hex}"
    searches: list[str] = []
    store = _counting_searches(_store(mlflow_server), searches, monkeypatch)
    outcome = store.get_or_train("teacher", key, {"arch": "io-test"}, ResumableTraining(lambda _checkpointing: _result(3.0)))
    look_ups = [search for search in searches if Tag.STAGE_KEY in search]
    created = [search for search in searches if Tag.CREATED_AS in search]
    assert not outcome.reused and len(look_ups) == 2 and created == []
    again = _store(mlflow_server).get_or_train("teacher", key, {"arch": "io-test"}, _must_not_train)
    assert again.reused and again.ref == outcome.ref
