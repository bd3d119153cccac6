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
(`orchestrator.stage_leases`). The holder renews the lease while it trains; the others poll the store.
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
from typing import TYPE_CHECKING, Any, TypeVar

from orchestrator.schema import EXPERIMENT_KIND, KIND_STAGE, STAGE_CHECKPOINT, STAGES_EXPERIMENT, Tag, epoch_metric
from orchestrator.stage_leases import Heartbeat, Leases, LocalLeases, SqlLeases, lease_ttl_s
from pxd.errors import PxdError
from pxd.memo import remember

if TYPE_CHECKING:
    from mlflow.entities import Run

    from orchestrator.cpu_lending import SharedThreads
    from orchestrator.trial import TrialContext
    from pxd.pipeline import StageOutcome
    from pxd.train import StageResult

__all__ = [
    "STAGES_EXPERIMENT",
    "CHECKPOINT",
    "StageWaitTimeout",
    "StageUnavailable",
    "MlflowStageStore",
    "LocalLeases",
    "SqlLeases",
    "make_provider",
    "list_stages",
]

CHECKPOINT = STAGE_CHECKPOINT
# An incomplete stage's training state alternates between two artifacts, so the one its tag names is
# always whole, even if the trainer dies while uploading the other.
PARTIAL_DIR = "stage/partial"
PARTIAL_SLOTS = ("state-a.pt", "state-b.pt")

logger = logging.getLogger(__name__)
T = TypeVar("T")
_BATCH = 1000  # MLflow's limit of metrics per log_batch request
# (stage run id, checkpoint sha256) → its verified result, kept by this process: a worker process that
# runs trial after trial (`search.reuse_actors`) downloads the teacher and an assistant once, not once per
# trial. The hash is the checkpoint's, so a kept result is exactly what a new download would verify.
_LOADED: dict[tuple[str, str], StageResult] = {}
_LOADED_MAX = 4
# (tracking URI, stage key) → (run id, sha256) of the complete run this process found and verified: the
# next trial in the same process takes the kept result without searching MLflow again (one search per
# stage and process, not per trial). A complete stage never changes; a copy verified by its hash stays
# valid even if the run is tagged corrupt later. Off with PXD_OVERHEAD_CUTS=0.
_FOUND: dict[tuple[str, str], tuple[str, str]] = {}


class StageWaitTimeout(PxdError, RuntimeError):
    """A trial waited longer than search.stage_wait_timeout_s for a stage another trial trains."""


class StageUnavailable(PxdError, RuntimeError):
    """A stored stage could not be read or written after every retry (network, artifact store, disk); the
    stage itself was left as it is, so a later attempt can use it."""

    transient = True  # the trial is retried (search.max_retries): the store may be back by then


def _env_float(name: str, default: float, minimum: float) -> float:
    raw = os.environ.get(name)
    try:
        value = float(raw) if raw is not None else default
    except ValueError:
        value = float("nan")
    if not value >= minimum:
        raise ValueError(f"{name}={raw!r}: expected a number ≥ {minimum:g} (unset: {default:g})")
    return value


def checkpoint_interval_s() -> float:
    """Seconds between training-state checkpoints of a stage (`PXD_STAGE_CHECKPOINT_INTERVAL_S`; 0: every epoch)."""
    from pxd.train import DEFAULT_CHECKPOINT_INTERVAL_S

    return _env_float("PXD_STAGE_CHECKPOINT_INTERVAL_S", DEFAULT_CHECKPOINT_INTERVAL_S, 0.0)


def with_retries(action: Callable[[], T], what: str) -> T:
    """`action()`, retried with exponential backoff on any exception: `PXD_STAGE_IO_ATTEMPTS` tries (default 5),
    waiting `PXD_STAGE_IO_BACKOFF_S` (default 2) seconds, doubled after each try, at most 60."""
    attempts = int(_env_float("PXD_STAGE_IO_ATTEMPTS", 5, 1))
    delay = _env_float("PXD_STAGE_IO_BACKOFF_S", 2.0, 0.0)
    for attempt in range(1, attempts):
        try:
            return action()
        except Exception as exc:  # noqa: BLE001 - logged, and the last try below raises
            logger.warning("could not %s (attempt %d of %d, retrying in %.1fs): %s",
                           what, attempt, attempts, delay, exc)
            time.sleep(delay)
            delay = min(delay * 2, 60.0)
    try:
        return action()
    except Exception as exc:  # noqa: BLE001 - re-raised as the error the trial fails with
        raise StageUnavailable(
            f"could not {what} after {attempts} attempts: {type(exc).__name__}: {exc}; the stage was left as "
            "it is: check the tracking server, its artifact store and the local temp disk, then retry "
            "(PXD_STAGE_IO_ATTEMPTS / PXD_STAGE_IO_BACKOFF_S set the retries)"
        ) from exc


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
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.tracking_uri = tracking_uri
        self.leases = leases
        self.force_retrain = force_retrain
        self.wait_timeout_s = wait_timeout_s
        self.poll_s = poll_s
        self.trial_run_id = trial_run_id
        self.sweep_name = sweep_name
        # a waiting trial lends its threads to the one training the stage (`orchestrator.cpu_lending`)
        self.lending = lending
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
        import torch

        from pxd.train import StageResult

        sha256 = run.data.tags.get(Tag.CHECKPOINT_SHA256)
        kept_as = (run.info.run_id, sha256 or "")
        if kept_as in _LOADED:
            return _LOADED[kept_as]
        payload = self._verified(run, CHECKPOINT, sha256)
        if payload is None:
            return None
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        metrics = {k: v for k, v in run.data.metrics.items()}
        return remember(_LOADED, kept_as, StageResult(kind=run.data.tags[Tag.STAGE], state_dict=state, metrics=metrics),
                        _LOADED_MAX)

    def _verified(self, run: Run, artifact: str, sha256: str | None) -> bytes | None:
        """The artifact's bytes when they match `sha256`; None after tagging the run corrupt when the
        artifact is missing or does not match, the only two failures that say the stage itself is bad."""
        run_id = run.info.run_id
        payload = with_retries(lambda: self._download(run_id, artifact),
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

    def _download(self, run_id: str, artifact: str) -> bytes | None:
        """The artifact's bytes, or None when the run's artifact listing has no such file."""
        folder, name = artifact.rsplit("/", 1)
        if name not in {Path(entry.path).name for entry in self.client.list_artifacts(run_id, folder)}:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            return Path(self.client.download_artifacts(run_id, artifact, tmp)).read_bytes()

    def _find(self, key: str) -> tuple[StageResult, str] | None:
        found = _FOUND.get((self.tracking_uri, key))
        if found is not None and found in _LOADED:
            return _LOADED[found], found[0]
        while True:
            run = self.lookup(key)
            if run is None:
                return None
            result = self.load(run)
            if result is not None:
                from orchestrator.trial import overhead_cuts_on

                if overhead_cuts_on():
                    _FOUND[(self.tracking_uri, key)] = (run.info.run_id, run.data.tags.get(Tag.CHECKPOINT_SHA256) or "")
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

    def _find_incomplete(self, key: str, runs: list[Run] | None = None) -> tuple[_IncompleteStage, dict[str, Any]] | None:
        """The newest incomplete run of the stage (among `runs`, else searched) with a whole training state
        of this pxd's layout, and that state."""
        import torch

        from pxd.train import TRAINING_STATE_VERSION

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
                return _IncompleteStage(self, run.info.run_id, partial["artifact"]), state
        return None

    # -- save ------------------------------------------------------------------------------------------
    def create_run(self, kind: str, key: str, describe: dict[str, Any]) -> str:
        """A new, incomplete stage run (status RUNNING) with its describing params."""
        tags = {Tag.KIND: KIND_STAGE, Tag.STAGE: kind, Tag.STAGE_KEY: key, Tag.STAGE_COMPLETE: "false"}
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=f"{kind}-{key[:10]}",
                                     tags={**tags, **self.holder_tags()})
        self.client.log_batch(run.info.run_id, params=[Param(name, str(value)) for name, value in describe.items()])
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
        folder, name = artifact.rsplit("/", 1)

        def attempt() -> None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / name
                path.write_bytes(payload)
                self.client.log_artifact(run_id, str(path), folder)

        with_retries(attempt, f"upload {artifact} to the stage run {run_id}")

    def save(
        self, kind: str, key: str, describe: dict[str, Any], result: StageResult, run_id: str | None = None
    ) -> str:
        """Store a finished stage in `run_id` (its incomplete run) or a new run; usable only once whole."""
        import torch

        buffer = io.BytesIO()
        torch.save(result.state_dict, buffer)
        payload = buffer.getvalue()
        from mlflow.entities import Metric, RunTag

        run_id = run_id or self.create_run(kind, key, describe)
        try:
            # batched: one request per _BATCH metrics instead of one per value (each is a round trip to the server)
            now = int(time.time() * 1000)
            metrics = [Metric(name, float(value), now, 0) for name, value in result.metrics.items()]
            metrics += [Metric(epoch_metric(kind, name), float(value), now, int(record.get("epoch", 0)))
                        for record in result.history for name, value in record.items() if name != "epoch"]
            metrics.append(Metric("checkpoint_bytes", float(len(payload)), now, 0))
            for start in range(0, len(metrics), _BATCH):
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
        from pxd.pipeline import StageOutcome

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
        from pxd.pipeline import StageOutcome

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
        from pxd.pipeline import ResumableTraining
        from pxd.train import Checkpointing

        if not isinstance(train, ResumableTraining):
            result = train()
            return result, self.save(kind, key, describe, result)
        found = self._find_incomplete(key, incomplete_runs)
        incomplete, resume_from = found if found is not None else (_IncompleteStage(self, None, None), None)
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


class _IncompleteStage:
    """A stage run still training, where its training state goes at each checkpoint; a new stage's run is
    created (`create_with`) at its first checkpoint, so a short stage leaves no incomplete run behind."""

    def __init__(self, store: MlflowStageStore, run_id: str | None, artifact: str | None) -> None:
        self.store = store
        self.run_id = run_id
        self.artifact = artifact  # the slot its tag names
        self.create_with: Callable[[], str] | None = None

    def take_over(self, epoch: int) -> None:
        """The current lease holder continues this run after `epoch`."""
        self.store.client.update_run(self.run_id, status="RUNNING")
        for name, value in {**self.store.holder_tags(), Tag.STAGE_RESUMED_FROM: str(epoch)}.items():
            self.store.client.set_tag(self.run_id, name, value)

    def save(self, state: dict[str, Any]) -> None:
        import torch

        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        if self.run_id is None:
            self.run_id = self.create_with()
        # the slot the tag does not name, so the named one stays whole until the tag moves
        artifact = next(f"{PARTIAL_DIR}/{slot}" for slot in PARTIAL_SLOTS if f"{PARTIAL_DIR}/{slot}" != self.artifact)
        self.store.upload(self.run_id, artifact, payload)
        partial = {"epoch": state["epoch"], "artifact": artifact, "sha256": hashlib.sha256(payload).hexdigest(),
                   "layout": state["version"]}
        self.store.client.set_tag(self.run_id, Tag.STAGE_PARTIAL, json.dumps(partial))
        self.artifact = artifact


def make_provider(context: TrialContext, parent_run_id: str | None = None, lending: SharedThreads | None = None
                  ) -> MlflowStageStore:
    """The stage provider a trial uses: the MLflow store with leases in the sweep's lease database."""
    leases = SqlLeases(context.lease_url) if context.lease_url else LocalLeases()
    return MlflowStageStore(
        context.tracking_uri,
        leases=leases,
        force_retrain=context.force_retrain or not context.reuse_stages,
        wait_timeout_s=context.stage_wait_timeout_s,
        trial_run_id=parent_run_id,
        sweep_name=context.sweep_name,
        lending=lending,
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
        state = "ok" if usable else ("corrupt" if tags.get(Tag.STAGE_CORRUPT) == "true" else run.info.status.lower())
        if state == run.info.status.lower() and tags.get(Tag.STAGE_COMPLETE) != "true" and Tag.STAGE_PARTIAL in tags:
            state = f"incomplete (epoch {json.loads(tags[Tag.STAGE_PARTIAL])['epoch']})"
        rows.append({
            "key": tags.get(Tag.STAGE_KEY, ""),
            "stage": tags.get(Tag.STAGE, ""),
            "arch": run.data.params.get("arch", ""),
            "resolution": run.data.params.get("resolution", ""),
            "val_top1": run.data.metrics.get("val_top1", float("nan")),
            "train_seconds": run.data.metrics.get("train_seconds", float("nan")),
            "size_mb": run.data.metrics.get("checkpoint_bytes", 0.0) / 1e6,
            "state": state,
            "run_id": run.info.run_id,
        })
    return rows
