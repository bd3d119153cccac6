"""Content-addressed stage store on MLflow, with single-flight training across trials and nodes.

A finished stage is an MLflow run in the experiment `pxd-stages`, tagged with its `pxd.stage_key`, its
checkpoint an artifact (`stage/checkpoint.pt`) whose sha256 is recorded in a tag. The run is marked
usable (`pxd.stage_complete = true`, status FINISHED) only after the artifact is uploaded, and a load
verifies the hash, so a half-written or corrupt stage is never used: a hash mismatch or a missing
artifact tags it `pxd.stage_corrupt` and it is trained again. Any other failure to read it (a timeout,
a full temp disk, the artifact store down) is retried with backoff, then fails the trial and leaves the
stage untouched (`StageUnavailable`).

A stage still training saves its training state at epoch boundaries, every
`PXD_STAGE_CHECKPOINT_INTERVAL_S` seconds (default 300), into its run as an incomplete stage
(`pxd.stage_partial`); the next holder of the stage's lease resumes from it.

Single-flight: before training a missing stage a trial takes a lease on its key
(`orchestrator.stages.leases`). The holder renews the lease while it trains; the others poll the store.
If the holder dies, its lease expires after `PXD_STAGE_LEASE_TTL_S` seconds (default 60) and the next
waiter takes over. Waiting is bounded by the space's `search.stage_wait_timeout_s`, after which the
trial fails with a clear error.

While it waits a trial sleeps: it has created its models on the CPU only and put nothing on the GPU,
but Tune still holds the trial's resource reservation. To keep that window short, `pxd sweep` trains
the sweep's teacher (the one stage every trial needs) before it launches trials; see docs/stages.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from orchestrator.results.run_creation import drop_duplicate_runs, new_run_token
from orchestrator.results.schema import (
    EXPERIMENT_KIND,
    KIND_STAGE,
    STAGE_CHECKPOINT,
    STAGES_EXPERIMENT,
    Tag,
    epoch_metric,
)
from orchestrator.stages.checkpoints import IncompleteStage
from orchestrator.stages.io import StageUnavailable, checkpoint_interval_s, with_retries
from orchestrator.stages.leases import Heartbeat, Leases, LocalLeases, SqlLeases, lease_ttl_s
from orchestrator.stages.memory import StageMemory
from orchestrator.tracking.artifacts import run_artifacts, upload_bytes
from orchestrator.tracking.retries import watch_retries
from pxd.errors import PxdError
from pxd.pipeline import ResumableTraining, StageOutcome
from pxd.train import TRAINING_STATE_VERSION, Checkpointing, StageResult

if TYPE_CHECKING:
    from mlflow.entities import Run

    from orchestrator.stages.threads import SharedThreads

__all__ = [
    "STAGES_EXPERIMENT",
    "CHECKPOINT",
    "StageWaitTimeout",
    "StageUnavailable",
    "MlflowStageStore",
    "LocalLeases",
    "SqlLeases",
]

CHECKPOINT = STAGE_CHECKPOINT
logger = logging.getLogger(__name__)
_BATCH = 1000  # MLflow's limit of metrics per log_batch request
class StageWaitTimeout(PxdError, RuntimeError):
    """A trial waited longer than search.stage_wait_timeout_s for a stage another trial trains."""


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
        lending: SharedThreads | None = None,
        memory: StageMemory | None = None,
    ) -> None:
        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        self.leases = leases
        self.force_retrain = force_retrain
        self.wait_timeout_s = wait_timeout_s
        self.poll_s = poll_s
        self.trial_run_id = trial_run_id
        self.sweep_name = sweep_name
        # a waiting trial lends its threads to the one training the stage (`orchestrator.driver.lending`)
        self.lending = lending
        # what this worker process keeps between trials; a store of its own keeps it for its own life only
        self.memory = memory if memory is not None else StageMemory()
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._artifact_uris: dict[str, str] = {}  # run id → artifact location, of the runs this store created

    # -- lookup and load ---------------------------------------------------------------------------
    @property
    def experiment_id(self) -> str:
        """The stages experiment's id (created if needed), looked up once per worker process (`StageMemory`)."""
        known = self.memory.experiments.get(self.tracking_uri)
        if known is None:
            experiment = self.client.get_experiment_by_name(STAGES_EXPERIMENT)
            if experiment is None:
                try:
                    known = self.client.create_experiment(STAGES_EXPERIMENT,
                                                          tags={EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1]})
                except MlflowException:  # another trial created it first
                    known = self.client.get_experiment_by_name(STAGES_EXPERIMENT).experiment_id
            else:
                known = experiment.experiment_id
            known = self.memory.experiments[self.tracking_uri] = str(known)
        return known

    def lookup(self, key: str) -> Run | None:
        """The newest usable (complete, FINISHED, not corrupt) run of the stage."""
        usable = self._runs(f"tags.`{Tag.STAGE_COMPLETE}` = 'true' and attributes.status = 'FINISHED'", key)
        return usable[0] if usable else None

    @staticmethod
    def _usable(run: Run) -> bool:
        """What `lookup` searches for, checked on a run at hand."""
        return run.data.tags.get(Tag.STAGE_COMPLETE) == "true" and run.info.status == "FINISHED"

    def _runs(self, condition: str, key: str, max_results: int = 20) -> list[Run]:
        """The stage's runs that meet `condition` and are not marked corrupt, newest first."""
        return self._not_corrupt(self._search(condition, key, max_results))

    def _search(self, condition: str, key: str, max_results: int) -> list[Run]:
        """The stage's newest `max_results` runs that meet `condition` (all: ""), newest first."""
        return list(self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{Tag.STAGE_KEY}` = '{key}'" + (f" and {condition}" if condition else ""),
            order_by=["attributes.start_time DESC"], max_results=max_results,
        ))

    @staticmethod
    def _not_corrupt(runs: list[Run]) -> list[Run]:
        return [r for r in runs if r.data.tags.get(Tag.STAGE_CORRUPT) != "true"]

    def load(self, run: Run) -> StageResult | None:
        """The stage's result, or None (and the run tagged corrupt) when its checkpoint is missing or fails
        the hash. Raises `StageUnavailable` when it cannot be read for any other reason."""

        sha256 = run.data.tags.get(Tag.CHECKPOINT_SHA256)
        kept = self.memory.loaded_result(run.info.run_id, sha256 or "")
        if kept is not None:
            return kept
        payload = self._verified(run, CHECKPOINT, sha256)
        if payload is None:
            return None
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        metrics = {k: v for k, v in run.data.metrics.items()}
        return self.memory.keep_loaded(run.info.run_id, sha256 or "",
                                       StageResult(kind=run.data.tags[Tag.STAGE], state_dict=state, metrics=metrics))

    def _verified(self, run: Run, artifact: str, sha256: str | None) -> bytes | None:
        """The artifact's bytes when they match `sha256`; None after tagging the run corrupt when the
        artifact is missing or does not match, the only two failures that say the stage itself is bad."""
        run_id = run.info.run_id
        payload = with_retries(lambda: self._download(run, artifact),
                               f"download {artifact} of the {run.data.tags.get(Tag.STAGE)} stage run {run_id}")
        reason = None
        if payload is None:
            reason = f"artifact {artifact} is missing"
        elif hashlib.sha256(payload).hexdigest() != sha256:
            reason = f"{artifact} sha256 mismatch"
        if reason is not None:
            self.client.set_tag(run_id, Tag.STAGE_CORRUPT, "true")
            self.client.set_tag(run_id, Tag.STAGE_CORRUPT_REASON, reason)
            logger.warning("stage run %s is corrupt (%s); it will not be used again", run_id, reason)
            return None
        return payload

    def _download(self, run: Run, artifact: str) -> bytes | None:
        """The artifact's bytes (None: not in the run's listing), from its location (`run_artifacts`: 3 requests)."""
        folder, name = artifact.rsplit("/", 1)
        repository = run_artifacts(self.tracking_uri, run.info.artifact_uri)
        if name not in {Path(entry.path).name for entry in repository.list_artifacts(folder)}:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            return Path(self._download_file(repository, artifact, tmp)).read_bytes()

    @staticmethod
    def _download_file(repository: Any, artifact: str, folder: str) -> str:
        """One file into `folder`, its local path (what a full disk or a dropped connection fails)."""
        return str(repository.download_artifacts(artifact, folder))

    def _find(self, key: str) -> tuple[StageResult, str] | None:
        kept = self.memory.found_result(self.tracking_uri, key)
        if kept is not None:
            return kept
        while True:
            run = self.lookup(key)
            if run is None:
                return None
            result = self.load(run)
            if result is not None:
                self.memory.keep_found(self.tracking_uri, key, run.info.run_id,
                                       run.data.tags.get(Tag.CHECKPOINT_SHA256) or "")
                return result, run.info.run_id

    def _find_under_lease(self, key: str) -> tuple[StageResult, str] | list[Run] | None:
        """Under the stage's lease: the stage when another trial completed it meanwhile (as `_find`), else
        its incomplete runs, newest first, for `_find_incomplete`: one search for both. None: the stage has
        more runs than one search returns, so `_find_incomplete` searches for its incomplete runs itself."""
        cap = 50
        searched = self._search("", key, max_results=cap)
        runs = self._not_corrupt(searched)
        capped = len(searched) >= cap
        if capped or any(self._usable(run) for run in runs):
            found = self._find(key)
            if found is not None:
                return found
        if capped:
            return None
        return [run for run in runs if run.data.tags.get(Tag.STAGE_COMPLETE) == "false"]

    def _find_incomplete(self, key: str, runs: list[Run] | None = None) -> tuple[IncompleteStage, dict[str, Any]] | None:
        """The newest incomplete run of the stage (among `runs`, else searched) with a whole training state
        of this pxd's layout, and that state."""

        if runs is None:
            runs = self._runs(f"tags.`{Tag.STAGE_COMPLETE}` = 'false'", key)
        for run in runs:
            if Tag.STAGE_PARTIAL not in run.data.tags:
                continue
            partial = json.loads(run.data.tags[Tag.STAGE_PARTIAL])
            if partial["layout"] != TRAINING_STATE_VERSION:
                continue
            payload = self._verified(run, partial["artifact"], partial["sha256"])
            if payload is not None:
                state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
                return IncompleteStage(self, run.info.run_id, partial["artifact"]), state
        return None

    # -- save ------------------------------------------------------------------------------------------
    def create_run(self, kind: str, key: str, describe: dict[str, Any], metrics: list[Metric] | None = None) -> str:
        """A new, incomplete stage run (status RUNNING) with its describing params (and ≤ _BATCH `metrics`)."""
        tags = {Tag.KIND: KIND_STAGE, Tag.STAGE: kind, Tag.STAGE_KEY: key, Tag.STAGE_COMPLETE: "false"}
        created = new_run_token()
        with watch_retries() as retried:
            run = self.client.create_run(self.experiment_id, run_name=f"{kind}-{key[:10]}",
                                         tags={**tags, **self.holder_tags(), **created})
        # a creation MLflow retried after a lost answer left a second run, which would stay RUNNING: gone
        drop_duplicate_runs(self.client, self.experiment_id, created, kept=run.info.run_id, retried=retried)
        self._artifact_uris[run.info.run_id] = run.info.artifact_uri
        self.client.log_batch(run.info.run_id, params=[Param(name, str(value)) for name, value in describe.items()],
                              metrics=metrics or [])
        return str(run.info.run_id)

    def holder_tags(self) -> dict[str, str]:
        """Who trains the stage now: this process, and the sweep and trial run it trains for."""
        tags = {Tag.TRAINED_BY: self.owner}
        if self.sweep_name:
            tags[Tag.SWEEP] = self.sweep_name
        if self.trial_run_id:
            tags[Tag.TRAINED_FOR_RUN] = self.trial_run_id
        return tags

    def upload(self, run_id: str, artifact: str, payload: bytes) -> None:
        def attempt() -> None:  # where a run this store created keeps its artifacts is known: no look-up first
            location = self._artifact_uris.get(run_id) or self.client.get_run(run_id).info.artifact_uri
            upload_bytes(self.tracking_uri, location, artifact, payload)

        with_retries(attempt, f"upload {artifact} to the stage run {run_id}")

    def save(
        self, kind: str, key: str, describe: dict[str, Any], result: StageResult, run_id: str | None = None
    ) -> str:
        """Store a finished stage in `run_id` (its incomplete run) or a new run; usable only once whole."""

        buffer = io.BytesIO()
        torch.save(result.state_dict, buffer)
        payload = buffer.getvalue()

        # one request per _BATCH metrics, not per value; a stage saved to a new run sends the first with its params
        now = int(time.time() * 1000)
        metrics = [Metric(name, float(value), now, 0) for name, value in result.metrics.items()]
        metrics += [Metric(epoch_metric(kind, name), float(value), now, int(record.get("epoch", 0)))
                    for record in result.history for name, value in record.items() if name != "epoch"]
        metrics.append(Metric("checkpoint_bytes", float(len(payload)), now, 0))
        first = 0 if run_id is not None else _BATCH
        run_id = run_id or self.create_run(kind, key, describe, metrics=metrics[:_BATCH])
        try:
            for start in range(first, len(metrics), _BATCH):
                self.client.log_batch(run_id, metrics=metrics[start : start + _BATCH])
            self.upload(run_id, CHECKPOINT, payload)
            # usable only from here on: the artifact is complete and its hash recorded (one request, both tags)
            self.client.log_batch(run_id, tags=[RunTag(Tag.CHECKPOINT_SHA256, hashlib.sha256(payload).hexdigest()),
                                                RunTag(Tag.STAGE_COMPLETE, "true")])
            self.client.set_terminated(run_id, status="FINISHED")
        except BaseException:
            self.client.set_terminated(run_id, status="FAILED")
            raise
        return str(run_id)

    # -- the provider contract ---------------------------------------------------------------------
    def get_or_train(
        self, kind: str, key: str, describe: dict[str, Any], train: Callable[[], StageResult]
    ) -> StageOutcome:

        if self.force_retrain:  # no sharing at all: every caller trains its own copy, like a pipeline without a store
            result = train()
            return StageOutcome(result=result, key=key, reused=False, ref=self.save(kind, key, describe, result))
        found = self._find(key)
        if found is not None:
            return StageOutcome(result=found[0], key=key, reused=True, ref=found[1])
        try:
            return self._get_or_train_under_lease(kind, key, describe, train)
        finally:
            if self.lending is not None:
                self.lending.stop_waiting()

    def _get_or_train_under_lease(
        self, kind: str, key: str, describe: dict[str, Any], train: Callable[[], StageResult]
    ) -> StageOutcome:
        """Single flight: take the stage's lease and train it, or wait (lending this trial's threads to the
        one training it) until it is stored."""

        deadline = time.monotonic() + self.wait_timeout_s
        ttl = lease_ttl_s()
        while True:
            if self.leases.acquire(key, self.owner, ttl):
                try:
                    if self.lending is not None:
                        self.lending.stop_waiting()
                    found = self._find_under_lease(key)  # finished while we polled, else its incomplete runs
                    if isinstance(found, tuple):  # (result, run id)
                        return StageOutcome(result=found[0], key=key, reused=True, ref=found[1])
                    with Heartbeat(self.leases, key, self.owner, ttl), self._holding(key):
                        result, run_id = self._train(kind, key, describe, train, incomplete_runs=found)
                    return StageOutcome(result=result, key=key, reused=False, ref=run_id)
                finally:
                    self.leases.release(key, self.owner)
            if time.monotonic() > deadline:
                raise StageWaitTimeout(
                    f"waited {self.wait_timeout_s:.0f}s for the {kind} stage {key[:12]} that "
                    f"{self.leases.holder(key) or 'another trial'} is training; raise search.stage_wait_timeout_s "
                    "or check that trial's MLflow run"
                )
            if self.lending is not None:
                self.lending.start_waiting(key)
            time.sleep(self.poll_s)
            found = self._find(key)
            if found is not None:
                return StageOutcome(result=found[0], key=key, reused=True, ref=found[1])

    def _holding(self, key: str) -> contextlib.AbstractContextManager[None]:
        return self.lending.holding(key) if self.lending is not None else contextlib.nullcontext()

    def _train(
        self, kind: str, key: str, describe: dict[str, Any], train: Callable[[], StageResult],
        incomplete_runs: list[Run] | None = None,
    ) -> tuple[StageResult, str]:
        """Train the stage (holding its lease), resuming its newest incomplete run when there is one
        (among `incomplete_runs` when the caller has searched for them)."""

        if not isinstance(train, ResumableTraining):
            result = train()
            return result, self.save(kind, key, describe, result)
        found = self._find_incomplete(key, incomplete_runs)
        incomplete, resume_from = found if found is not None else (IncompleteStage(self, None, None), None)
        if resume_from is None:
            incomplete.create_with = lambda: self.create_run(kind, key, describe)
        else:
            incomplete.take_over(resume_from["epoch"])
            logger.info("resuming the %s stage %s after epoch %d (run %s)", kind, key[:12], resume_from["epoch"],
                        incomplete.run_id)
        try:
            result = train(Checkpointing(save=incomplete.save, resume_from=resume_from,
                                         interval_s=checkpoint_interval_s()))
        except BaseException:
            if incomplete.run_id is not None:  # its last training state stays for the next lease holder
                self.client.set_terminated(incomplete.run_id, status="FAILED")
            raise
        return result, self.save(kind, key, describe, result, run_id=incomplete.run_id)


