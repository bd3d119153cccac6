"""The Ray Tune trainable: one sampled config → one TAS pipeline → one MLflow child run.

Every trial reports to Tune each epoch (`stage`, `epoch`, the stage's per-epoch `val_top1` under
`schema.epoch_metric`) and once at the end with its `schema.TrialResult` (the registry's metrics,
feasibility, constraint values) that the Optuna searcher tells the study. A trial that raises or
diverges ends its MLflow run as FAILED with the error recorded on the run (tag `pxd.error`, artifact
`error.txt`) and never enters the frontier. An error that would repeat (`orchestrator.attempts`) ends the
trial with a final report carrying it, so Tune does not retry it and the searcher tells FAIL; any other
error is re-raised, and Tune runs the trial again up to `search.max_retries` times.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator import schema
from pxd.paths import flatten

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient
    from torch import nn

    from orchestrator.cpu_lending import SharedThreads
    from orchestrator.spec import SweepSpec
    from pxd.config import PipelineConfig
    from pxd.cost import LatencyCache

__all__ = ["TrialContext", "run_trial", "OverBudget", "TRIAL_SECTIONS", "OVERHEAD_CUTS_ENV", "overhead_cuts_on",
           "RayletWatch"]
# what a trial times outside training beyond the pipeline's sections (`pxd.pipeline.TIMED_SECTIONS`);
# each is logged as `schema.SweepMetric.overhead(section)`
TRIAL_SECTIONS = ("log_model",)
# "0" turns the trial's overhead cuts off (to measure them, bench/overhead.py): every trial times its own
# student's latency (no `pxd.cost.LatencyCache`) and warms nothing up in the background
OVERHEAD_CUTS_ENV = "PXD_OVERHEAD_CUTS"

logger = logging.getLogger(__name__)


class OverBudget(Exception):
    """The student breaks a hard limit on a metric known before training: nothing is trained."""

    def __init__(self, broken: list[str], constraints: list[float], metrics: dict[str, float]) -> None:
        super().__init__("; ".join(broken))
        self.broken, self.constraints, self.metrics = broken, constraints, metrics


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs from the driver; picklable, sent once to every trial."""

    spec: SweepSpec
    sweep_name: str
    tracking_uri: str = field(repr=False)  # may hold credentials (`orchestrator.credentials`)
    experiment_id: str
    parent_run_id: str
    reuse_stages: bool = True
    force_retrain: bool = False
    stage_wait_timeout_s: float = 3600.0
    lease_url: str | None = field(default=None, repr=False)  # SQL database for single-flight stage leases
    cpu_shares_path: str | None = None  # where the driver lends idle CPUs (`orchestrator.cpu_lending`); None: never


def _trial_id() -> str | None:
    """Tune's id of the running trial, or None outside Tune (tests call run_trial directly)."""
    import warnings

    from ray import tune

    try:
        with warnings.catch_warnings():  # outside Tune, Ray warns and returns None
            warnings.simplefilter("ignore")
            trial_id = tune.get_context().get_trial_id()
    except Exception:  # noqa: BLE001 - Tune raises different errors outside a session across versions
        return None
    return None if trial_id is None else str(trial_id)


def run_trial(params: dict[str, Any], context: TrialContext) -> schema.TrialResult | None:
    """Run one trial; returns (and, inside Tune, reports) its final result. None: inside Tune, the trial
    failed with an error that would repeat, recorded on its run and reported (`schema.failed_report`)."""
    from mlflow.tracking import MlflowClient

    from orchestrator import credentials
    from orchestrator.spec import materialize
    from orchestrator.tracking import fluent_tracking_uri

    for url in (context.tracking_uri, context.lease_url):
        credentials.remember(url)  # error texts recorded on the run mask their passwords
    config = materialize(context.spec, params)
    client = MlflowClient(context.tracking_uri)
    # model logging uses MLflow's fluent API, whose URI is process-wide (it also sets MLFLOW_TRACKING_URI):
    # set it for the trial and give the caller's back after (a trial run in-process must not leak it)
    with fluent_tracking_uri(context.tracking_uri):
        return _run(params, context, config, client)


def _run(params: dict[str, Any], context: TrialContext, config: PipelineConfig, client: MlflowClient
         ) -> schema.TrialResult | None:
    import mlflow
    from ray import tune

    from orchestrator.attempts import will_repeat
    from orchestrator.spec import constraint_values, is_feasible
    from orchestrator.stage_store import make_provider
    from pxd.pipeline import LatencySettings, run_tas

    # started once a stage trains (not beside the data set-up it would slow down); waited for before latency
    # timing and the model log
    warm_up = _ModelLoggingWarmUp(enabled=overhead_cuts_on())
    raylet = RayletWatch()
    trial_id = _trial_id()
    in_tune = trial_id is not None
    trial_id = trial_id or "local"
    tags = schema.trial_start_tags(sweep=context.sweep_name, parent_run_id=context.parent_run_id, trial_id=trial_id,
                                   params=params, hostname=socket.gethostname(), node_id=_node_id(),
                                   pid=os.getpid())
    run_name = f"{config.student.arch}@{config.student.resolution}-{trial_id}"
    with mlflow.start_run(experiment_id=context.experiment_id, run_name=run_name, tags=tags) as run:
        run_id = run.info.run_id
        mlflow.log_params({k: ("" if v is None else v) for k, v in flatten(config.to_dict()).items()})

        known: dict[str, float] = {}  # gmacs, params_m, pixels: filled in before any stage trains

        def on_epoch(kind: str, epoch: int, record: dict[str, float]) -> None:
            warm_up.start()
            mlflow.log_metrics({schema.epoch_metric(kind, k): v for k, v in record.items()
                                if k != "epoch" and math.isfinite(v)}, step=epoch)
            if in_tune:
                name = schema.epoch_metric(kind)
                # with the cost metrics known before training: what early stopping ranks trials on
                tune.report({"stage": kind, "epoch": epoch, name: record["val_top1"], "mlflow_run_id": run_id, **known})

        try:
            search = context.spec.require_search()
            latency = LatencySettings(search.latency.device, search.latency.repeats, search.latency.warmup,
                                      cache=_latency_cache(context, config), before_timing=warm_up.wait)
            loading = time.perf_counter()
            data = _process_dataset(config)
            loading = time.perf_counter() - loading
            threads = _cpu_threads(context, trial_id)
            outcome = run_tas(config, provider=make_provider(context, parent_run_id=run_id, lending=threads),
                              on_epoch=on_epoch, progress=False, latency=latency,
                              before_training=_budget_check(context.spec, known), data=data,
                              keep_in_process=overhead_cuts_on(), cpu_threads=threads)
        except OverBudget as over:
            # infeasible by architecture and input alone: recorded PRUNED with the reason, nothing trained;
            # the searcher tells Optuna PRUNED with the constraint values, so the sampler learns the region
            reason = f"infeasible before training: {over}; nothing was trained"
            schema.log_trial_over_budget(client, run_id, over.metrics, reason)
            mlflow.end_run(status="KILLED")
            if in_tune:
                tune.report(schema.over_budget_report(run_id, reason, over.metrics, over.constraints))
            return schema.TrialResult(run_id=run_id, metrics=over.metrics, feasible=False, model_uri=None,
                                      constraints=over.constraints)
        except (SystemExit, KeyboardInterrupt):
            # stopped from outside (Tune ends a trial cut by the time budget with SystemExit): not the trial's
            # failure; the driver records it when the sweep ends, as the Optuna study holds it (PRUNED)
            raise
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
            schema.log_trial_failure(client, run_id, error, traceback.format_exc())
            mlflow.end_run(status="FAILED")
            if not (in_tune and will_repeat(exc)):
                raise
            tune.report(schema.failed_report(run_id, error))  # finished, not errored: Tune does not retry it
            return None

        reused = [o for o in outcome.stages.values() if o.reused]
        started = time.perf_counter()
        warm_up.wait()
        model_uri = _log_student(outcome.student, config.student.resolution)
        sections = {**outcome.timings, "log_model": time.perf_counter() - started}
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
        result = schema.TrialResult(
            run_id=run_id, metrics={k: float(v) for k, v in metrics.items()},
            feasible=is_feasible(context.spec, outcome.metrics),
            model_uri=model_uri,
            constraints=constraint_values(context.spec, outcome.metrics),
        )
        if in_tune and raylet.gone():
            # orphaned: the driver died with its Ray. Recording nothing leaves the run RUNNING, which the
            # resumed sweep closes as lost (`sweep._close_lost_trials`) like any trial killed with its driver
            logger.warning("trial %s: its Ray node is gone; the result is not recorded", trial_id)
            raise SystemExit(1)
        schema.log_trial_result(client, result, stages=outcome.stages, device=outcome.cost.get("device", ""),
                                cost=outcome.cost, warnings=outcome.warnings)
    if in_tune:
        tune.report(result.report())
    return result


def _cpu_threads(context: TrialContext, trial_id: str) -> SharedThreads | None:
    """The trial's threads plus what idle slots and waiting trials lend it; None when nothing is lent."""
    if context.cpu_shares_path is None:
        return None
    import torch

    from orchestrator.cpu_lending import SharedThreads

    return SharedThreads(context.cpu_shares_path, trial_id, base=torch.get_num_threads())


def _budget_check(spec: SweepSpec, known: dict[str, float]) -> Callable[[dict[str, float]], None]:
    """Keeps the student's metrics known before training in `known`; raises `OverBudget` when they break
    a hard limit."""
    from orchestrator.spec import broken_before_training

    def check(metrics: dict[str, float]) -> None:
        known.update(metrics)
        broken, constraints = broken_before_training(spec, metrics)
        if broken:
            raise OverBudget(broken, constraints, metrics)

    return check


def _latency_cache(context: TrialContext, config: PipelineConfig) -> LatencyCache | None:
    """Latency measured once per architecture and input within the sweep, shared by its trials on this
    machine (beside its decoded datasets); None when `OVERHEAD_CUTS_ENV` is "0"."""
    from pxd.cost import LatencyCache
    from pxd.data import cache_root

    if not overhead_cuts_on():
        return None
    return LatencyCache(scope=context.parent_run_id, directory=cache_root(config.dataset) / "latency")


# (dataset config, seed) → its splits, kept by this process for the next trial (one entry: a sweep has
# one dataset); a worker process lives on between trials with `search.reuse_actors`
_DATASETS: dict[tuple[Any, int], Any] = {}


def _process_dataset(config: PipelineConfig) -> Any:
    """The trial's dataset, loaded once per worker process: a reused process does not generate the
    synthetic set or map a decoded dataset again. None (the pipeline loads it itself) when the overhead
    cuts are off. Splits are only ever read, so trials can share them."""
    from pxd.data import load_dataset

    if not overhead_cuts_on():
        return None
    key = (config.dataset, config.seed)
    if key not in _DATASETS:
        _DATASETS.clear()
        _DATASETS[key] = load_dataset(config.dataset, config.seed, progress=False)
    return _DATASETS[key]


def overhead_cuts_on() -> bool:
    """False when `OVERHEAD_CUTS_ENV` is "0" (every cut off, to measure them)."""
    return os.environ.get(OVERHEAD_CUTS_ENV, "1") != "0"


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
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


class _ModelLoggingWarmUp:
    """MLflow's first model log in a process spends seconds (4 s of 5 s measured, docs/benchmarks.md) building
    its map of every installed package's modules, to check the model's requirements against the
    environment, and importing its model machinery. A trial is a process of its own and logs one model,
    so every trial paid that on its critical path. Saving a one-parameter model to a temporary directory
    in a background thread, once the first epoch of a stage is done, pays it while the stages train; the
    trial waits for it before timing latency (it would disturb the timing) and before logging the
    student. It only saves time where the trial has CPU to spare beside training (a GPU trial, more cores
    than trial CPUs); on a saturated CPU it moves the work into training. A trial that trains nothing logs
    cold. A failed warm-up only costs the time back: the real log does the same work and reports its own
    errors."""

    def __init__(self, enabled: bool = True) -> None:
        self._enabled = enabled
        self._thread = threading.Thread(target=self._run, name="pxd-model-logging-warm-up", daemon=True)

    def start(self) -> None:
        if self._enabled and self._thread.ident is None:
            self._thread.start()

    @staticmethod
    def _run() -> None:
        import tempfile

        try:
            import mlflow.pytorch
            import torch

            with tempfile.TemporaryDirectory(prefix="pxd-warm-up-") as folder:
                mlflow.pytorch.save_model(torch.nn.Linear(1, 1), f"{folder}/model", pip_requirements=_requirements(),
                                          signature=_signature((-1, 1), (-1, 1)), serialization_format="pickle")
        except Exception:  # noqa: BLE001 - the real log repeats the work and raises what is wrong
            logger.warning("warming up MLflow's model logging failed; the student's log will take longer",
                           exc_info=True)

    def wait(self) -> None:
        if self._thread.is_alive():
            self._thread.join()


def _requirements() -> list[str]:
    # explicit requirements: inferring them starts a subprocess per trial
    import timm
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}"]


def _signature(inputs: tuple[int, ...], outputs: tuple[int, ...]) -> Any:
    """A float32 tensor signature; -1 is any size (the batch)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), inputs)]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), outputs)]))


def _log_student(student: nn.Module, resolution: int) -> str:
    """Log the student so it can be loaded and served: its signature takes any batch of RGB float32 images at
    its own resolution and gives one row of logits per image. Stated, not inferred from an input example:
    MLflow would then run the model twice more (inferring, then validating a serving example), and save and
    upload two more files, per trial."""
    import mlflow
    import torch

    student.eval()
    with torch.no_grad():
        classes = int(student(torch.zeros(1, 3, resolution, resolution)).shape[-1])
    info = mlflow.pytorch.log_model(
        student,
        name="student",
        signature=_signature((-1, 3, resolution, resolution), (-1, classes)),
        pip_requirements=_requirements(),
        # the whole module: MLflow 3.17's default (pt2, torch.export) pins the batch size of the input
        # example (1), and a deployed student must take any batch (pxd remeasure times batch N too)
        serialization_format="pickle",
    )
    return str(info.model_uri)
