"""Content-addressed stage store on MLflow, with single-flight training across trials and nodes.

A finished stage is an MLflow run in the experiment `pxd-stages`, tagged with its `pxd.stage_key`, its
checkpoint an artifact (`stage/checkpoint.pt`) whose sha256 is recorded in a tag. The run is marked
usable (`pxd.stage_complete = true`, status FINISHED) only after the artifact is uploaded, and a load
verifies the hash, so a half-written or corrupt stage is never used: it is tagged `pxd.stage_corrupt`
and trained again.

Single-flight: before training a missing stage a trial takes a lease on its key in a SQL lease table
(`SqlLeases`: a SQLite file under the results root by default; on a cluster the sweep's Postgres,
which every node reaches). The holder renews the lease
while it trains; the others poll the store. If the holder dies, its lease expires after
`PXD_STAGE_LEASE_TTL_S` seconds (default 60) and the next waiter takes over. Waiting is bounded by the
space's `search.stage_wait_timeout_s`, after which the trial fails with a clear error.

While it waits a trial sleeps: it has created its models on the CPU only and put nothing on the GPU,
but Tune still holds the trial's resource reservation. To keep that window short, `pxd sweep` trains
the sweep's teacher (the one stage every trial needs) before it launches trials; see docs/stages.md.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.schema import EXPERIMENT_KIND, KIND_STAGE, STAGE_CHECKPOINT, STAGES_EXPERIMENT, Tag, epoch_metric
from pxd.errors import PxdError

if TYPE_CHECKING:
    from mlflow.entities import Run

    from orchestrator.trial import TrialContext
    from pxd.pipeline import StageOutcome
    from pxd.train import StageResult

__all__ = [
    "STAGES_EXPERIMENT",
    "CHECKPOINT",
    "StageWaitTimeout",
    "MlflowStageStore",
    "LocalLeases",
    "SqlLeases",
    "make_provider",
    "list_stages",
]

CHECKPOINT = STAGE_CHECKPOINT


class StageWaitTimeout(PxdError, RuntimeError):
    """A trial waited longer than search.stage_wait_timeout_s for a stage another trial trains."""


def lease_ttl_s() -> float:
    return float(os.environ.get("PXD_STAGE_LEASE_TTL_S", "60"))


class LocalLeases:
    """Leases within one process (tests, `pxd train`); same contract as `SqlLeases`."""

    def __init__(self) -> None:
        self._table: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str, owner: str, ttl_s: float) -> bool:
        with self._lock:
            holder = self._table.get(key)
            now = time.monotonic()
            if holder is None or holder[0] == owner or holder[1] < now:
                self._table[key] = (owner, now + ttl_s)
                return True
            return False

    renew = acquire

    def release(self, key: str, owner: str) -> None:
        with self._lock:
            if self._table.get(key, ("",))[0] == owner:
                del self._table[key]

    def holder(self, key: str) -> str | None:
        with self._lock:
            holder = self._table.get(key)
            return holder[0] if holder and holder[1] >= time.monotonic() else None


class SqlLeases:
    """Leases in a SQL table every trial can reach: a SQLite file under the results root on one machine,
    the sweep's Postgres on a cluster. Acquire is one atomic upsert, so exactly one owner wins.

    Expiry uses wall-clock time: nodes must keep their clocks in sync (NTP) to well within the TTL.
    """

    TABLE = "pxd_stage_leases"

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        connect_args = {"timeout": 60} if url.startswith("sqlite") else {}
        self.url = url
        self._engine = sa.create_engine(url, connect_args=connect_args, pool_pre_ping=True)
        with self._engine.begin() as conn:
            conn.execute(sa.text(
                f"CREATE TABLE IF NOT EXISTS {self.TABLE} (key VARCHAR(128) PRIMARY KEY, "
                "owner VARCHAR(256) NOT NULL, expires_at DOUBLE PRECISION NOT NULL)"
            ))

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"])

    def acquire(self, key: str, owner: str, ttl_s: float) -> bool:
        import sqlalchemy as sa

        now = time.time()
        with self._engine.begin() as conn:
            conn.execute(sa.text(
                f"INSERT INTO {self.TABLE} (key, owner, expires_at) VALUES (:key, :owner, :expires) "
                f"ON CONFLICT (key) DO UPDATE SET owner = :owner, expires_at = :expires "
                f"WHERE {self.TABLE}.owner = :owner OR {self.TABLE}.expires_at < :now"
            ), {"key": key, "owner": owner, "expires": now + ttl_s, "now": now})
            holder = conn.execute(sa.text(f"SELECT owner FROM {self.TABLE} WHERE key = :key"), {"key": key}).scalar()
        return holder == owner

    def renew(self, key: str, owner: str, ttl_s: float) -> bool:
        return self.acquire(key, owner, ttl_s)

    def release(self, key: str, owner: str) -> None:
        import sqlalchemy as sa

        with self._engine.begin() as conn:
            conn.execute(sa.text(f"DELETE FROM {self.TABLE} WHERE key = :key AND owner = :owner"), {"key": key, "owner": owner})

    def holder(self, key: str) -> str | None:
        import sqlalchemy as sa

        with self._engine.begin() as conn:
            row = conn.execute(sa.text(f"SELECT owner, expires_at FROM {self.TABLE} WHERE key = :key"), {"key": key}).first()
        return str(row[0]) if row and row[1] >= time.time() else None


Leases = LocalLeases | SqlLeases  # one contract: acquire, renew, release, holder


class _Heartbeat:
    """Renews a lease in the background while the holder trains."""

    def __init__(self, leases: Leases, key: str, owner: str, ttl_s: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(leases, key, owner, ttl_s), daemon=True)

    def _run(self, leases: Leases, key: str, owner: str, ttl_s: float) -> None:
        while not self._stop.wait(ttl_s / 3):
            leases.renew(key, owner, ttl_s)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class MlflowStageStore:
    """`pxd.pipeline.StageProvider` backed by an MLflow tracking server."""

    def __init__(
        self,
        tracking_uri: str,
        *,
        leases: Leases,
        force_retrain: bool = False,
        wait_timeout_s: float = 3600.0,
        poll_s: float = 1.0,
        trial_run_id: str | None = None,
        sweep_name: str | None = None,
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.leases = leases
        self.force_retrain = force_retrain
        self.wait_timeout_s = wait_timeout_s
        self.poll_s = poll_s
        self.trial_run_id = trial_run_id
        self.sweep_name = sweep_name
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._experiment_id: str | None = None

    # -- lookup and load ---------------------------------------------------------------------------
    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            from mlflow.exceptions import MlflowException

            experiment = self.client.get_experiment_by_name(STAGES_EXPERIMENT)
            if experiment is None:
                try:
                    self._experiment_id = self.client.create_experiment(
                        STAGES_EXPERIMENT, tags={EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1]})
                except MlflowException:  # another trial created it first
                    self._experiment_id = self.client.get_experiment_by_name(STAGES_EXPERIMENT).experiment_id
            else:
                self._experiment_id = experiment.experiment_id
        return str(self._experiment_id)

    def lookup(self, key: str) -> Run | None:
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=(f"tags.`{Tag.STAGE_KEY}` = '{key}' and tags.`{Tag.STAGE_COMPLETE}` = 'true' "
                           "and attributes.status = 'FINISHED'"),
            order_by=["attributes.start_time DESC"],
            max_results=20,
        )
        return next((r for r in runs if r.data.tags.get(Tag.STAGE_CORRUPT) != "true"), None)

    def load(self, run: Run) -> StageResult | None:
        """The stage's result, or None (and the run tagged corrupt) when its checkpoint fails the hash."""
        import torch

        from pxd.train import StageResult

        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = self.client.download_artifacts(run.info.run_id, CHECKPOINT, tmp)
                payload = Path(path).read_bytes()
            except Exception as exc:  # noqa: BLE001 - a missing artifact is a corrupt stage, recorded below
                self.client.set_tag(run.info.run_id, Tag.STAGE_CORRUPT, "true")
                self.client.set_tag(run.info.run_id, Tag.STAGE_CORRUPT_REASON, f"artifact unreadable: {exc}"[:500])
                return None
        if hashlib.sha256(payload).hexdigest() != run.data.tags.get(Tag.CHECKPOINT_SHA256):
            self.client.set_tag(run.info.run_id, Tag.STAGE_CORRUPT, "true")
            self.client.set_tag(run.info.run_id, Tag.STAGE_CORRUPT_REASON, "checkpoint sha256 mismatch")
            return None
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        metrics = {k: v for k, v in run.data.metrics.items()}
        return StageResult(kind=run.data.tags[Tag.STAGE], state_dict=state, metrics=metrics)

    def _find(self, key: str) -> tuple[StageResult, str] | None:
        while True:
            run = self.lookup(key)
            if run is None:
                return None
            result = self.load(run)
            if result is not None:
                return result, run.info.run_id

    # -- save ------------------------------------------------------------------------------------------
    def save(self, kind: str, key: str, describe: dict[str, Any], result: StageResult) -> str:
        import torch

        buffer = io.BytesIO()
        torch.save(result.state_dict, buffer)
        payload = buffer.getvalue()
        tags = {Tag.KIND: KIND_STAGE, Tag.STAGE: kind, Tag.STAGE_KEY: key, Tag.STAGE_COMPLETE: "false",
                Tag.TRAINED_BY: self.owner}
        if self.sweep_name:
            tags[Tag.SWEEP] = self.sweep_name
        if self.trial_run_id:
            tags[Tag.TRAINED_FOR_RUN] = self.trial_run_id
        run = self.client.create_run(self.experiment_id, run_name=f"{kind}-{key[:10]}", tags=tags)
        run_id = run.info.run_id
        try:
            for name, value in describe.items():
                self.client.log_param(run_id, name, value)
            for name, value in result.metrics.items():
                self.client.log_metric(run_id, name, float(value))
            for record in result.history:
                step = int(record.get("epoch", 0))
                for name, value in record.items():
                    if name != "epoch":
                        self.client.log_metric(run_id, epoch_metric(kind, name), float(value), step=step)
            self.client.log_metric(run_id, "checkpoint_bytes", float(len(payload)))
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "checkpoint.pt"
                path.write_bytes(payload)
                self.client.log_artifact(run_id, str(path), "stage")
            # usable only from here on: the artifact is complete and its hash recorded
            self.client.set_tag(run_id, Tag.CHECKPOINT_SHA256, hashlib.sha256(payload).hexdigest())
            self.client.set_tag(run_id, Tag.STAGE_COMPLETE, "true")
            self.client.set_terminated(run_id, status="FINISHED")
        except BaseException:
            self.client.set_terminated(run_id, status="FAILED")
            raise
        return str(run_id)

    # -- the provider contract ---------------------------------------------------------------------
    def get_or_train(
        self, kind: str, key: str, describe: dict[str, Any], train: Callable[[], StageResult]
    ) -> StageOutcome:
        from pxd.pipeline import StageOutcome

        if self.force_retrain:  # no sharing at all: every caller trains its own copy, like a pipeline without a store
            result = train()
            return StageOutcome(result=result, key=key, reused=False, ref=self.save(kind, key, describe, result))
        found = self._find(key)
        if found is not None:
            return StageOutcome(result=found[0], key=key, reused=True, ref=found[1])
        deadline = time.monotonic() + self.wait_timeout_s
        ttl = lease_ttl_s()
        while True:
            if self.leases.acquire(key, self.owner, ttl):
                try:
                    found = self._find(key)  # finished while we polled
                    if found is not None:
                        return StageOutcome(result=found[0], key=key, reused=True, ref=found[1])
                    with _Heartbeat(self.leases, key, self.owner, ttl):
                        result = train()
                        run_id = self.save(kind, key, describe, result)
                    return StageOutcome(result=result, key=key, reused=False, ref=run_id)
                finally:
                    self.leases.release(key, self.owner)
            if time.monotonic() > deadline:
                raise StageWaitTimeout(
                    f"waited {self.wait_timeout_s:.0f}s for the {kind} stage {key[:12]} that "
                    f"{self.leases.holder(key) or 'another trial'} is training; raise search.stage_wait_timeout_s "
                    "or check that trial's MLflow run"
                )
            time.sleep(self.poll_s)
            found = self._find(key)
            if found is not None:
                return StageOutcome(result=found[0], key=key, reused=True, ref=found[1])


def make_provider(context: TrialContext, parent_run_id: str | None = None) -> MlflowStageStore:
    """The stage provider a trial uses: the MLflow store with leases in the sweep's lease database."""
    leases = SqlLeases(context.lease_url) if context.lease_url else LocalLeases()
    return MlflowStageStore(
        context.tracking_uri,
        leases=leases,
        force_retrain=context.force_retrain or not context.reuse_stages,
        wait_timeout_s=context.stage_wait_timeout_s,
        trial_run_id=parent_run_id,
        sweep_name=context.sweep_name,
    )


def list_stages(tracking_uri: str) -> list[dict[str, Any]]:
    """Every stored stage: key, kind, metrics, checkpoint size, state."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(STAGES_EXPERIMENT)
    if experiment is None:
        return []
    rows = []
    for run in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"], max_results=5000):
        tags = run.data.tags
        usable = tags.get(Tag.STAGE_COMPLETE) == "true" and tags.get(Tag.STAGE_CORRUPT) != "true" and run.info.status == "FINISHED"
        rows.append({
            "key": tags.get(Tag.STAGE_KEY, ""),
            "stage": tags.get(Tag.STAGE, ""),
            "arch": run.data.params.get("arch", ""),
            "resolution": run.data.params.get("resolution", ""),
            "val_top1": run.data.metrics.get("val_top1", float("nan")),
            "train_seconds": run.data.metrics.get("train_seconds", float("nan")),
            "size_mb": run.data.metrics.get("checkpoint_bytes", 0.0) / 1e6,
            "state": "ok" if usable else ("corrupt" if tags.get(Tag.STAGE_CORRUPT) == "true" else run.info.status.lower()),
            "run_id": run.info.run_id,
        })
    return rows
