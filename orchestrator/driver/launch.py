"""`pxd sweep`: Ray Tune + Optuna (multi-objective) over TAS pipelines, tracked in MLflow.

Layout of one sweep under the results root (`--root`, `PXD_HOME`, default ./pxd-results):

    sweeps/<sweep name>/spec.yaml     the resolved search space, as launched
    sweeps/<sweep name>/optuna.db     the Optuna study (RDB storage; open it in optuna-dashboard)
    sweeps/<sweep name>/tune/         Ray Tune's experiment state (what `--resume` restores)

MLflow: experiment = the space's `name`; one parent run per sweep (tag `pxd.sweep`), one child run per
trial, separate runs for shared stages (experiment `pxd-stages`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.search import ConcurrencyLimiter

from orchestrator.driver.attempts import LostAttempts
from orchestrator.driver.budget import BUDGET_FILE, LaunchBudget, RecordedTrials, SweepSearchGenerator, write_budget
from orchestrator.driver.checks import check_cluster_can_run, check_reachable, lease_url, validate_launch
from orchestrator.driver.early_stopping import MOASHA, STATE_FILE
from orchestrator.driver.finish import SweepWatch, finish_sweep
from orchestrator.driver.folder import check_name_is_free, claim_sweep
from orchestrator.driver.lending import IdleCpuLending
from orchestrator.driver.options import SweepOptions, SweepOutcome
from orchestrator.driver.parent_run import end_parent_run, ensure_experiment, open_parent_run
from orchestrator.driver.progress import SweepProgress
from orchestrator.driver.reconcile import close_optuna_trials
from orchestrator.driver.searcher import make_searcher
from orchestrator.driver.warmup import ready_warm_up_worker, warm_teacher
from orchestrator.results import schema
from orchestrator.results.frontier import TrialRow
from orchestrator.results.schema import Tag
from orchestrator.stages.threads import SHARES_FILE
from orchestrator.tracking import credentials
from orchestrator.tracking.retries import install_body_retries
from orchestrator.tracking.server import launch_tracking, resolve_tracking, results_root, ui_command
from orchestrator.worker.context import TrialContext
from orchestrator.worker.trainable import TuneTrial

if TYPE_CHECKING:
    from orchestrator.space.spec import SweepSpec

__all__ = ["SweepOptions", "SweepOutcome", "run_sweep"]


def run_sweep(spec: SweepSpec, options: SweepOptions) -> SweepOutcome:
    """Launch (or resume) a sweep and return its frontier."""
    search = spec.require_search()
    validate_launch(spec, options)  # bad input: one clear error, nothing created or launched
    for url in (options.optuna_storage, options.tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")):
        credentials.remember(url)  # kept out of what the sweep records and prints
    install_body_retries()  # the driver's MLflow calls, too, survive a tracking server restart mid-answer
    _start_ray(spec, options)
    root = results_root(options.root)
    name, sweep_dir = claim_sweep(root, spec, options)
    storage_url = options.optuna_storage or f"sqlite:///{sweep_dir / 'optuna.db'}"
    local = _one_local_node(options)
    warm_up = not options.force_retrain and options.reuse_stages
    # works while the tracking server starts; on this machine only, where the warm-up task will run
    worker = ready_warm_up_worker(spec) if warm_up and local else None
    target = resolve_tracking(options.tracking_uri, root, cluster=options.ray_address is not None)
    parent_run_id: str | None = None
    try:
        # what Tune restores of an earlier launch (searcher, scheduler, callbacks) talks to this launch's server
        with launch_tracking(target.uri), contextlib.ExitStack() as launch:
            # a client bound to this URI, not mlflow.set_tracking_uri: that also sets MLFLOW_TRACKING_URI in
            # this process, and a later sweep here would then talk to this sweep's (stopped) server
            client = MlflowClient(target.uri)
            _check_name(client, storage_url, name, spec, options, sweep_dir)
            experiment_id = ensure_experiment(client, spec.name)
            parent_run_id = open_parent_run(client, experiment_id, name, spec, storage_url, resume=options.resume)
            # the `trials` param is the first launch's; this tag follows a resume that raised the budget
            client.set_tag(parent_run_id, Tag.BUDGET, json.dumps({"trials": search.trials, "timeout_s": search.timeout_s}))
            # idle slots lend their CPUs in the tail: on pxd's own local Ray, where every trial reads this folder
            lending = search.lend_idle_cpus and local
            context = TrialContext(
                spec=spec, sweep_name=name, tracking_uri=target.uri, experiment_id=experiment_id,
                parent_run_id=parent_run_id, reuse_stages=options.reuse_stages, force_retrain=options.force_retrain,
                stage_wait_timeout_s=float(search.stage_wait_timeout_s),
                lease_url=lease_url(options, root),
                cpu_shares_path=str(sweep_dir / SHARES_FILE) if lending else None,
            )
            progress = SweepProgress(spec, total=search.trials, quiet=options.quiet)  # its clock counts the warm-up
            if warm_up:
                if worker is not None:
                    ray.get(worker)  # a dataset that cannot load fails here, as the teacher's task would
                warm_teacher(context, _resources(search), quiet=options.quiet)
            if options.resume:  # the status lines go on from what earlier launches finished
                progress.resume_from(schema.collect_rows(client, client.get_run(parent_run_id)))
            launch.enter_context(progress.reporting())  # a restored tuner's progress callback is this one
            tuner = _tuner(context, sweep_dir, storage_url, progress, lending=lending, resume=options.resume)
            table, rows = _fit_and_finish(tuner, progress, context, client, storage_url, sweep_dir)
            return SweepOutcome(name, parent_run_id, experiment_id, target.uri, table, rows, ui_command(target),
                                trials_budget=search.trials)
    except BaseException as exc:
        if parent_run_id is not None:
            end_parent_run(target.uri, parent_run_id, exc)
        raise
    finally:
        target.close()


def _start_ray(spec: SweepSpec, options: SweepOptions) -> None:
    """Ray for the sweep: the cluster at --ray-address, else a local instance of pxd's own; refused before
    any compute when the cluster could never run a trial."""
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    # per-epoch reports carry progress only; the objectives come with the final report
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # stdout is pxd's (`--json`)
    if not ray.is_initialized():
        if options.ray_address:
            check_reachable(options.ray_address)
        # without --ray-address: a Ray instance of pxd's own, never a running or stale `ray start` cluster
        ray.init(address=options.ray_address or "local", include_dashboard=False, log_to_driver=False,
                 configure_logging=True, logging_level="ERROR")
    check_cluster_can_run(spec, ray.cluster_resources())
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # pxd prints its own progress lines


def _check_name(client: MlflowClient, storage_url: str, name: str, spec: SweepSpec, options: SweepOptions,
                sweep_dir: Path) -> None:
    """A new sweep's name is new to MLflow and Optuna; a refused new launch leaves no folder behind."""
    try:
        check_name_is_free(client, storage_url, name, spec, resume=options.resume)
    except BaseException:
        if not options.resume:
            shutil.rmtree(sweep_dir, ignore_errors=True)  # the directory this launch claimed, still empty
        raise


def _resources(search: Any) -> dict[str, float]:
    return {"cpu": search.resources.cpu, "gpu": search.resources.gpu}


def _tuner(context: TrialContext, sweep_dir: Path, storage_url: str, progress: SweepProgress, *, lending: bool,
           resume: bool) -> tune.Tuner:
    """Tune's tuner for this launch: restored from the sweep's folder on resume, else new."""
    spec, search = context.spec, context.spec.require_search()
    budget_path = sweep_dir / BUDGET_FILE
    trainable = tune.with_resources(tune.with_parameters(TuneTrial(), context=context), _resources(search))
    run_config = tune.RunConfig(
        name="tune", storage_path=str(sweep_dir), verbose=0,
        callbacks=[progress, LostAttempts(context.tracking_uri, context.parent_run_id, search.max_retries),
                   *([_lending(search, sweep_dir, budget_path)] if lending else [])],
        # a lost process or node is retried; errors that would repeat end the trial without one
        # (orchestrator.driver.attempts)
        failure_config=tune.FailureConfig(max_failures=search.max_retries),
        stop=LaunchBudget(budget_path),  # search.timeout_s, read per launch (a resume may raise it)
    )
    tune_path = str(sweep_dir / "tune")
    if resume and tune.Tuner.can_restore(tune_path):
        return tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True, resume_errored=False)
    searcher = make_searcher(spec, context.sweep_name, storage_url)
    if search.max_concurrent:
        searcher = ConcurrencyLimiter(searcher, max_concurrent=search.max_concurrent)
    recorded = RecordedTrials(context.tracking_uri, context.parent_run_id)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            # its sample target follows search.trials of the latest launch (a resume may raise it)
            search_alg=SweepSearchGenerator(searcher, budget_path, recorded),
            num_samples=search.trials,
            scheduler=_scheduler(spec, sweep_dir, context.tracking_uri),
            reuse_actors=search.reuse_actors,
        ),
        run_config=run_config,
    )


def _fit_and_finish(tuner: tune.Tuner, progress: SweepProgress, context: TrialContext, client: MlflowClient,
                    storage_url: str, sweep_dir: Path) -> tuple[dict[str, Any], list[TrialRow]]:
    """Run the trials, then reconcile Optuna with MLflow and record the frontier."""
    search = context.spec.require_search()
    # this launch's budget; the time budget counts from here, as Tune's own time_budget_s would
    write_budget(sweep_dir, trials=search.trials, timeout_s=search.timeout_s)
    started = time.monotonic()
    # the trial and stage runs, read as they end: the end reads only the last few (bench/scale.py)
    watched = SweepWatch(MlflowClient(context.tracking_uri), client.get_run(context.parent_run_id)).start()
    try:
        tuner.fit()
    except BaseException:
        watched.stop()
        raise
    progress.close()
    budget_ran_out = search.timeout_s is not None and time.monotonic() - started >= search.timeout_s
    stopped = close_optuna_trials(context.sweep_name, storage_url, stopped=budget_ran_out, spec=context.spec,
                                  client=client, parent_run_id=context.parent_run_id)
    reason = (f"stopped when the time budget search.timeout_s = {search.timeout_s}s ran out" if budget_ran_out
              else "stopped before its final result")
    return finish_sweep(client, context.parent_run_id, stopped={trial_id: reason for trial_id in stopped},
                        watched=watched)


def _lending(search: Any, sweep_dir: Path, budget_path: Path) -> Any:
    """The callback that lends idle slots' CPUs (the slots: what the trials may hold together)."""

    return IdleCpuLending(sweep_dir, budget_path, max_concurrent=search.max_concurrent,
                          cpu_per_trial=float(search.resources.cpu))


def _one_local_node(options: SweepOptions) -> bool:
    """The sweep runs on pxd's own Ray on this machine: no --ray-address, and one node (a caller may have
    connected to a cluster before calling run_sweep)."""

    return options.ray_address is None and sum(bool(node.get("Alive")) for node in ray.nodes()) == 1


def _scheduler(spec: SweepSpec, sweep_dir: Path, tracking_uri: str) -> Any:
    """Tune's scheduler: MO-ASHA when `search.early_stopping.kind: moasha`, else None (every trial runs out)."""
    early = spec.require_search().early_stopping
    if early.kind != "moasha":
        return None

    return MOASHA.from_config(spec.require_search().objective_pairs, early, max_t=spec.base.student_epochs,
                              state_path=sweep_dir / STATE_FILE, tracking_uri=tracking_uri)


