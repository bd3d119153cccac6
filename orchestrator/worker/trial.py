"""The Ray Tune trainable: one sampled config → one TAS pipeline → one MLflow child run.

Every trial reports to Tune each epoch (`stage`, `epoch`, the stage's per-epoch `val_top1` under
`schema.epoch_metric`) and once at the end with its `schema.TrialResult` (the registry's metrics,
feasibility, constraint values) that the Optuna searcher tells the study. A trial that raises or
diverges ends its MLflow run as FAILED with the error recorded on the run (tag `pxd.error`, artifact
`error.txt`) and never enters the frontier. An error that would repeat (`orchestrator.worker.failures`) ends the
trial with a final report carrying it, so Tune does not retry it and the searcher tells FAIL; any other
error is re-raised, and Tune runs the trial again up to `search.max_retries` times.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlflow
import ray
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from ray import tune

from orchestrator.results import schema
from orchestrator.results.run_creation import drop_duplicate_runs, new_run_token
from orchestrator.results.schema import ReportKey
from orchestrator.space.spec import broken_before_training, constraint_values, is_feasible, materialize
from orchestrator.stages.threads import SharedThreads
from orchestrator.tracking import credentials
from orchestrator.tracking.retries import install_body_retries, watch_retries
from orchestrator.tracking.server import fluent_tracking_uri
from orchestrator.worker.context import TrialContext
from orchestrator.worker.failures import will_repeat
from orchestrator.worker.kept import OVERHEAD_CUTS_ENV, WorkerState
from orchestrator.worker.model_log import ModelLoggingWarmUp, log_student
from orchestrator.worker.provider import make_provider
from pxd.control import CONTROL, control_metrics, train_ce_control
from pxd.metrics import primary_metric
from pxd.paths import flatten
from pxd.pipeline import LatencySettings, PipelineResult, run_tas

if TYPE_CHECKING:
    from orchestrator.space.spec import SweepSpec
    from pxd.config import PipelineConfig

__all__ = ["TrialContext", "run_trial", "OverBudget", "TRIAL_SECTIONS", "OVERHEAD_CUTS_ENV", "RayletWatch"]
# what a trial times outside training beyond the pipeline's sections (`pxd.pipeline.TIMED_SECTIONS`);
# each is logged as `schema.SweepMetric.overhead(section)`
# run_start: the trial run's creation and its params; log_model: the student's model log
TRIAL_SECTIONS = ("run_start", "log_model")
# per-epoch metrics go to the trial's run at most this often (`EpochLog`)
EPOCH_LOG_INTERVAL_S = 10.0
_BATCH = 1000  # MLflow's limit of metrics per log_batch request

logger = logging.getLogger(__name__)


class OverBudget(Exception):
    """The student breaks a hard limit on a metric known before training: nothing is trained."""

    def __init__(self, broken: list[str], constraints: list[float], metrics: dict[str, float]) -> None:
        super().__init__("; ".join(broken))
        self.broken, self.constraints, self.metrics = broken, constraints, metrics


def _trial_id() -> str | None:
    """Tune's id of the running trial, or None outside Tune (tests call run_trial directly)."""

    try:
        with warnings.catch_warnings():  # outside Tune, Ray warns and returns None
            warnings.simplefilter("ignore")
            trial_id = tune.get_context().get_trial_id()
    except Exception:  # noqa: BLE001 - Tune raises different errors outside a session across versions
        return None
    return None if trial_id is None else str(trial_id)


def run_trial(params: dict[str, Any], context: TrialContext, state: WorkerState | None = None
              ) -> schema.TrialResult | None:
    """Run one trial; returns (and, inside Tune, reports) its final result. None: inside Tune, the trial
    failed with an error that would repeat, recorded on its run and reported (`schema.failed_report`).
    `state`: what this worker process keeps between trials (None: a fresh one, kept for this trial only)."""
    state = state if state is not None else WorkerState.from_environment()
    install_body_retries()  # a tracking server restart mid-answer costs no attempt
    # MLflow prints a run's URL when it ends, reading the run back first: one request per run, for a stdout
    # nobody reads (the driver sets it for itself; a cluster's worker processes do not inherit the driver's)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    for url in (context.tracking_uri, context.lease_url):
        credentials.remember(url)  # error texts recorded on the run mask their passwords
    config = materialize(context.spec, params)
    client = MlflowClient(context.tracking_uri)
    # model logging uses MLflow's fluent API, whose URI is process-wide (it also sets MLFLOW_TRACKING_URI):
    # set it for the trial and give the caller's back after (a trial run in-process must not leak it)
    with fluent_tracking_uri(context.tracking_uri):
        return _run(_Trial(params, context, config, client, state))


@dataclass
class _Trial:
    """One trial as it runs: what it was given, and its Tune trial id (None outside Tune)."""

    params: dict[str, Any]
    context: TrialContext
    config: PipelineConfig
    client: MlflowClient
    state: WorkerState
    trial_id: str | None = field(default_factory=lambda: _trial_id())
    known: dict[str, float] = field(default_factory=dict)  # gmacs, params_m, pixels: known before any stage trains
    run_start_s: float = 0.0  # the run's creation and its params (section "run_start")

    @property
    def in_tune(self) -> bool:
        return self.trial_id is not None


def _run(trial: _Trial) -> schema.TrialResult | None:
    # started once a stage trains (not beside the data set-up it would slow down); waited for before latency
    # timing and the model log
    warm_up = ModelLoggingWarmUp(enabled=trial.state.overhead_cuts)
    raylet = RayletWatch()
    trial_id = trial.trial_id or "local"
    config, context = trial.config, trial.context
    tags = schema.trial_start_tags(sweep=context.sweep_name, parent_run_id=context.parent_run_id, trial_id=trial_id,
                                   params=trial.params, hostname=socket.gethostname(), node_id=_node_id(),
                                   pid=os.getpid()) | new_run_token()
    marks = _simulated_marks(trial.state)
    tags |= {schema.Tag.SIMULATED_TRAINING: "true"} if marks else {}
    run_name = f"{config.student.arch}@{config.student.resolution}-{trial_id}"
    started = time.perf_counter()
    with watch_retries() as retried:
        active = mlflow.start_run(experiment_id=context.experiment_id, run_name=run_name, tags=tags)
    with active as run:
        run_id = run.info.run_id
        # a creation MLflow retried after a lost answer left a second run: not an attempt of this trial
        drop_duplicate_runs(trial.client, context.experiment_id, tags, kept=run_id, retried=retried)
        mlflow.log_params(_run_params(config, marks))
        trial.run_start_s = time.perf_counter() - started
        epochs = EpochLog(trial.client, run_id)
        try:
            outcome, loading = _train(trial, run_id, warm_up, epochs)
        except OverBudget as over:
            return _over_budget(trial, run_id, over)
        except (SystemExit, KeyboardInterrupt):
            # stopped from outside (Tune ends a trial cut by the time budget with SystemExit): not the trial's
            # failure; the driver records it when the sweep ends, as the Optuna study holds it (PRUNED)
            epochs.flush()  # the epochs it trained stay on its run
            raise
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
            epochs.flush()  # the epochs it trained stay on its run
            schema.log_trial_failure(trial.client, run_id, error, traceback.format_exc())
            mlflow.end_run(status="FAILED")
            if not (trial.in_tune and will_repeat(exc)):
                raise
            tune.report(schema.failed_report(run_id, error))  # finished, not errored: Tune does not retry it
            return None
        result = _result(trial, run_id, outcome, loading, warm_up)
        if trial.in_tune and raylet.gone():
            # orphaned: the driver died with its Ray. Recording nothing leaves the run RUNNING, which the
            # resumed sweep closes as lost (`orchestrator.driver.reconcile`) like any trial killed with its driver
            logger.warning("trial %s: its Ray node is gone; the result is not recorded", trial_id)
            raise SystemExit(1)
        schema.log_trial_result(trial.client, result, stages=outcome.stages, device=outcome.cost.get("device", ""),
                                cost=outcome.cost, warnings=outcome.warnings, artifact_uri=run.info.artifact_uri,
                                epochs=epochs.take())
    if trial.in_tune:
        tune.report(result.report())
    return result


def _train(trial: _Trial, run_id: str, warm_up: ModelLoggingWarmUp, epochs: EpochLog) -> tuple[PipelineResult, float]:
    """The trial's pipeline, its epochs logged to its run and reported to Tune; and the seconds its data took."""
    config, context, state = trial.config, trial.context, trial.state
    search = context.spec.require_search()
    stopping = search.early_stopping.kind != "none"

    def on_epoch(kind: str, epoch: int, record: dict[str, float]) -> None:
        warm_up.start()
        epochs.add({schema.epoch_metric(kind, k): v for k, v in record.items()
                    if k != ReportKey.EPOCH and math.isfinite(v)}, step=epoch)
        if trial.in_tune:
            if stopping:  # a rung may stop the trial at this report: the epochs it trained go to its run first
                epochs.flush()
            name = schema.epoch_metric(kind)
            # with the cost metrics known before training: what early stopping ranks trials on
            tune.report({ReportKey.STAGE: kind, ReportKey.EPOCH: epoch, name: record[primary_metric()],
                         # the epoch's seconds, for the driver's per-epoch progress line
                         schema.epoch_metric(kind, "epoch_seconds"): record["epoch_seconds"],
                         ReportKey.MLFLOW_RUN_ID: run_id,
                         **trial.known})

    latency = LatencySettings(search.latency.device, search.latency.repeats, search.latency.warmup,
                              cache=state.latency_cache(context.parent_run_id, config), before_timing=warm_up.wait)
    loading = time.perf_counter()
    data = state.dataset(config)
    loading = time.perf_counter() - loading
    threads = _cpu_threads(context, trial.trial_id or "local")
    provider = make_provider(context, state.stages, parent_run_id=run_id, lending=threads)
    outcome = run_tas(config, provider=provider, on_epoch=on_epoch, progress=False, latency=latency,
                      before_training=_budget_check(context.spec, trial.known), data=data,
                      memory=state.pipeline_memory(), cpu_threads=threads, train=state.stage_trainer())
    if search.ce_control:
        _add_control(outcome, provider, data, state, threads)
    return outcome, loading


def _add_control(outcome: PipelineResult, provider: Any, data: Any, state: WorkerState, threads: Any) -> None:
    """The student's cross-entropy control (`pxd.control`), got from the stage store or trained under its
    lease: a stage of the trial beside the others, and `control_val_top1` / `gain_vs_ce` among its metrics."""
    started = time.perf_counter()
    control = train_ce_control(outcome.config, provider=provider, data=data, memory=state.pipeline_memory(),
                               cpu_threads=threads, train=state.stage_trainer())
    trained = 0.0 if control.reused else float(control.result.metrics.get("train_seconds", 0.0))
    outcome.timings["training"] = outcome.timings.get("training", 0.0) + trained
    outcome.timings["stages"] = outcome.timings.get("stages", 0.0) + max(0.0, time.perf_counter() - started - trained)
    outcome.stages[CONTROL] = control
    outcome.metrics.update(control_metrics(outcome.metrics, control))


def _over_budget(trial: _Trial, run_id: str, over: OverBudget) -> schema.TrialResult:
    """Infeasible by architecture and input alone: recorded PRUNED with the reason, nothing trained; the
    searcher tells Optuna PRUNED with the constraint values, so the sampler learns the region."""
    reason = f"infeasible before training: {over}; nothing was trained"
    schema.log_trial_over_budget(trial.client, run_id, over.metrics, reason)
    mlflow.end_run(status="KILLED")
    if trial.in_tune:
        tune.report(schema.over_budget_report(run_id, reason, over.metrics, over.constraints))
    return schema.TrialResult(run_id=run_id, metrics=over.metrics, feasible=False, model_uri=None,
                              constraints=over.constraints)


def _result(trial: _Trial, run_id: str, outcome: PipelineResult, loading: float,
            warm_up: ModelLoggingWarmUp) -> schema.TrialResult:
    """The trial's final result: the pipeline's metrics, what reuse saved, and where its time went."""
    reused = [o for o in outcome.stages.values() if o.reused]
    started = time.perf_counter()
    warm_up.wait()
    model_uri = log_student(outcome.student, trial.config.student, params=_run_params(trial.config, {}))
    sections = {**outcome.timings, "log_model": time.perf_counter() - started, "run_start": trial.run_start_s}
    sections["data"] = sections.get("data", 0.0) + loading
    trained_seconds = sections.pop("training", 0.0)
    metrics = {
        **outcome.metrics,
        schema.SweepMetric.STAGES_REUSED: float(len(reused)),
        schema.SweepMetric.STAGES_TRAINED: float(len(outcome.stages) - len(reused)),
        # training time the reused stages took when they were trained, i.e. what reuse saved
        schema.SweepMetric.STAGE_SECONDS_SAVED: sum(o.result.metrics.get("train_seconds", 0.0) for o in reused),
        schema.SweepMetric.STAGE_SECONDS_TRAINED: trained_seconds,
        schema.SweepMetric.LATENCY_REUSED: float(bool(outcome.cost.get("latency_reused"))),
        **{schema.SweepMetric.overhead(section): seconds for section, seconds in sections.items()},
    }
    spec = trial.context.spec
    return schema.TrialResult(
        run_id=run_id, metrics={k: float(v) for k, v in metrics.items()},
        feasible=is_feasible(spec, outcome.metrics),
        model_uri=model_uri,
        constraints=constraint_values(spec, outcome.metrics),
    )


def _run_params(config: PipelineConfig, marks: dict[str, str]) -> dict[str, Any]:
    """The trial run's params: its whole resolved config as dotted names, and what marks a simulated trial."""
    return {**{k: ("" if v is None else v) for k, v in flatten(config.to_dict()).items()}, **marks}


def _simulated_marks(state: WorkerState) -> dict[str, str]:
    """The param that marks a trial whose stages' training is simulated (`PXD_SIMULATED_TRAINING`); {} otherwise."""
    if state.simulated is None:
        return {}
    return {schema.Param.SIMULATED_TRAINING: str(state.simulated.seconds_per_epoch)}


def _cpu_threads(context: TrialContext, trial_id: str) -> SharedThreads | None:
    """The trial's threads plus what idle slots and waiting trials lend it; None when nothing is lent."""
    if context.cpu_shares_path is None:
        return None

    return SharedThreads(context.cpu_shares_path, trial_id, base=torch.get_num_threads())


def _budget_check(spec: SweepSpec, known: dict[str, float]) -> Callable[[dict[str, float]], None]:
    """Keeps the student's metrics known before training in `known`; raises `OverBudget` when they break
    a hard limit."""

    def check(metrics: dict[str, float]) -> None:
        known.update(metrics)
        broken, constraints = broken_before_training(spec, metrics)
        if broken:
            raise OverBudget(broken, constraints, metrics)

    return check


class EpochLog:
    """A trial's per-epoch metrics on its run. The first epoch goes at once, so whoever watches the run (a
    person in the MLflow UI, the fault tests) sees it training; later ones at most every
    `EPOCH_LOG_INTERVAL_S`: an epoch that ends later than that after the last send goes at once, faster ones
    wait for the next send, or go with the trial's final result (`schema.log_trial_result`'s `epochs`). A
    sweep of short trials then sends two requests for a trial's epochs, not one per epoch (bench/scale.py)."""

    def __init__(self, client: MlflowClient, run_id: str, interval_s: float = EPOCH_LOG_INTERVAL_S) -> None:
        self.client, self.run_id, self.interval_s = client, run_id, interval_s
        self.pending: list[Metric] = []
        self.sent_at: float | None = None  # nothing sent yet: the first epoch goes at once

    def add(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.pending += [Metric(name, float(value), now, step) for name, value in metrics.items()]
        if self.sent_at is None or time.monotonic() - self.sent_at >= self.interval_s:
            self.flush()

    def flush(self) -> None:
        for start in range(0, len(self.pending), _BATCH):  # MLflow's limit of metrics per request
            self.client.log_batch(self.run_id, metrics=self.pending[start : start + _BATCH])
        self.pending, self.sent_at = [], time.monotonic()

    def take(self) -> list[Metric]:
        """What is left to send, for the caller's own request (sent here first if it would not fit in one)."""
        if len(self.pending) > _BATCH // 2:
            self.flush()
        taken, self.pending = self.pending, []
        return taken


class RayletWatch:
    """Whether the Ray node (raylet) that started this worker process is gone.

    A Tune trial runs in a worker process the raylet started, in a process group of its own (Ray 2.60),
    so killing a sweep driver and its local Ray does not kill it: it runs on until it next needs Ray.
    Its result can no longer reach the driver (Tune's snapshot does not hold it, Optuna is never told),
    so it must not be recorded COMPLETE: a resumed sweep would count it beside the trial it runs again
    in its place. When the raylet dies its children are re-parented, so the parent pid changes."""

    def __init__(self) -> None:
        self.parent = os.getppid()

    def gone(self) -> bool:
        return os.getppid() != self.parent


def _node_id() -> str:

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


