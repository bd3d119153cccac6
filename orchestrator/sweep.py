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
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from orchestrator import credentials, schema
from orchestrator.frontier import TrialRow, format_table, frontier_table, trial_outcomes, write_table
from orchestrator.schema import Tag
from orchestrator.spec import check_sweep_name, optuna_directions
from orchestrator.tracking import launch_tracking, resolve_tracking, results_root, ui_command
from orchestrator.trial import TrialContext, run_trial
from pxd.errors import ConfigError
from pxd.paths import flatten

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from orchestrator.spec import SweepSpec

__all__ = ["SweepOptions", "SweepOutcome", "run_sweep", "finish_sweep", "summary", "warm_up_cpus"]


@dataclass
class SweepOptions:
    name: str | None = None
    resume: bool = False
    tracking_uri: str | None = None
    ray_address: str | None = None
    optuna_storage: str | None = None
    root: str | None = None
    reuse_stages: bool = True
    force_retrain: bool = False
    quiet: bool = False


@dataclass
class SweepOutcome:
    sweep_name: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    table: dict[str, Any]
    rows: list[TrialRow]
    ui: str
    trials_budget: int = 0  # search.trials of this launch


def _default_name(spec: SweepSpec) -> str:
    # a random suffix: two launches in the same second never share a name
    return f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _claim_sweep(root: Path, spec: SweepSpec, options: SweepOptions) -> tuple[str, Path]:
    """The sweep's name and directory. A new launch claims a directory that did not exist (atomically:
    two launches with one --name cannot both get it); `--resume` finds the sweep and refuses a space that
    differs from the one it started with."""
    if options.resume:
        name = options.name or _latest_sweep(root, spec.name)
        sweep_dir = root / "sweeps" / str(name)
        if name is None or not (sweep_dir / "tune").exists():
            raise ConfigError("--resume", f"no sweep named {name or spec.name + '-*'!r} under {root / 'sweeps'} to resume; "
                                          "check --name and --root")
        from orchestrator.budget import raised_only

        stored = yaml.safe_load((sweep_dir / "spec.yaml").read_text())
        raised, refused = raised_only(_space_changes(stored, spec.raw))
        if refused:
            raise ConfigError("--resume", f"the space differs from the one sweep {name!r} started with "
                                          f"({'; '.join(refused)}); resume with the original space (only search.trials "
                                          "and search.timeout_s may be raised), or launch a new sweep")
        if raised:  # the space the sweep now runs; a later resume compares with this one
            (sweep_dir / "spec.yaml").write_text(yaml.safe_dump(spec.raw, sort_keys=False))
        return str(name), sweep_dir
    name = options.name or _default_name(spec)
    sweep_dir = root / "sweeps" / name
    sweep_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        sweep_dir.mkdir()
    except FileExistsError:
        raise ConfigError("--name", f"a sweep named {name!r} already exists under {root / 'sweeps'}; pass --resume to "
                                    "continue it, or choose another --name (or none: default names are unique)") from None
    (sweep_dir / "spec.yaml").write_text(yaml.safe_dump(spec.raw, sort_keys=False))
    return name, sweep_dir


def _space_changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Differences between two spaces: dotted path → (old value, new value), None where unset."""
    old, new = flatten(before, lists=True), flatten(after, lists=True)
    missing = object()
    return {key: (old.get(key), new.get(key))
            for key in sorted(set(old) | set(new)) if old.get(key, missing) != new.get(key, missing)}


def _check_name_is_free(client: MlflowClient, storage_url: str, name: str, spec: SweepSpec, *, resume: bool) -> None:
    """A new sweep's name is new to MLflow and to the Optuna storage; a resumed one's study still has
    the space's objectives."""
    import optuna

    if not resume and schema.find_sweep_run(client, name) is not None:
        raise ConfigError("--name", f"the tracking server already holds a sweep named {name!r}; choose another --name "
                                    "or pass --resume to continue it")
    try:
        study = optuna.load_study(study_name=name, storage=storage_url)
    except KeyError:
        return
    if not resume:
        raise ConfigError("--name", f"the Optuna storage already holds a study named {name!r}; choose another --name "
                                    "or pass --resume to continue it")
    search = spec.require_search()
    stored = (list(study.metric_names or []), [d.name.lower() for d in study.directions])
    wanted = (list(search.objective_metrics), [d.lower() for d in optuna_directions(search.objective_modes)])
    if study.metric_names and stored != wanted or [d for d in stored[1]] != wanted[1]:
        raise ConfigError("--resume", f"the Optuna study {name!r} optimises {stored[0] or stored[1]}, the space "
                                      f"{wanted[0]}; resume with the original space")


def _latest_sweep(root: Path, space_name: str) -> str | None:
    sweeps = sorted((p for p in (root / "sweeps").glob(f"{space_name}-*") if (p / "tune").exists()), key=lambda p: p.stat().st_mtime)
    return sweeps[-1].name if sweeps else None


def run_sweep(spec: SweepSpec, options: SweepOptions) -> SweepOutcome:
    """Launch (or resume) a sweep and return its frontier."""
    import ray
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from orchestrator.attempts import LostAttempts
    from orchestrator.cpu_lending import SHARES_FILE
    from orchestrator.progress import SweepProgress
    from orchestrator.searcher import make_searcher

    search = spec.require_search()
    _validate(spec, options)  # bad input: one clear error, nothing created or launched
    for url in (options.optuna_storage, options.tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")):
        credentials.remember(url)  # kept out of what the sweep records and prints
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
    _check_cluster_can_run(spec, ray.cluster_resources())
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # pxd prints its own progress lines
    root = results_root(options.root)
    name, sweep_dir = _claim_sweep(root, spec, options)
    from orchestrator.budget import BUDGET_FILE, LaunchBudget, RecordedTrials, SweepSearchGenerator, write_budget

    budget_path = sweep_dir / BUDGET_FILE
    storage_url = options.optuna_storage or f"sqlite:///{sweep_dir / 'optuna.db'}"

    local = _one_local_node(options)
    warm_up = not options.force_retrain and options.reuse_stages
    # works while the tracking server starts; on this machine only, where the warm-up task will run
    worker = _ready_warm_up_worker(spec) if warm_up and local else None
    target = resolve_tracking(options.tracking_uri, root, cluster=options.ray_address is not None)
    parent_run_id: str | None = None
    try:
        # what Tune restores of an earlier launch (searcher, scheduler, callbacks) talks to this launch's server
        with launch_tracking(target.uri), contextlib.ExitStack() as launch:
            # a client bound to this URI, not mlflow.set_tracking_uri: that also sets MLFLOW_TRACKING_URI in
            # this process, and a later sweep here would then talk to this sweep's (stopped) server
            client = MlflowClient(target.uri)
            try:
                _check_name_is_free(client, storage_url, name, spec, resume=options.resume)
            except BaseException:
                if not options.resume:
                    shutil.rmtree(sweep_dir, ignore_errors=True)  # the directory this launch claimed, still empty
                raise
            experiment_id = _experiment_id(client, spec.name)
            parent_run_id = _parent_run(client, experiment_id, name, spec, storage_url, resume=options.resume)
            # the `trials` param is the first launch's; this tag follows a resume that raised the budget
            client.set_tag(parent_run_id, Tag.BUDGET, json.dumps({"trials": search.trials, "timeout_s": search.timeout_s}))
            # idle slots lend their CPUs in the tail: on pxd's own local Ray, where every trial reads this folder
            lending = search.lend_idle_cpus and local
            context = TrialContext(
                spec=spec, sweep_name=name, tracking_uri=target.uri, experiment_id=experiment_id,
                parent_run_id=parent_run_id, reuse_stages=options.reuse_stages, force_retrain=options.force_retrain,
                stage_wait_timeout_s=float(search.stage_wait_timeout_s),
                lease_url=_lease_url(options, root),
                cpu_shares_path=str(sweep_dir / SHARES_FILE) if lending else None,
            )
            resources = {"cpu": search.resources.cpu, "gpu": search.resources.gpu}
            trainable = tune.with_resources(tune.with_parameters(_trainable, context=context), resources)
            progress = SweepProgress(spec, total=search.trials, quiet=options.quiet)
            run_config = tune.RunConfig(
                name="tune", storage_path=str(sweep_dir), verbose=0,
                callbacks=[progress, LostAttempts(target.uri, parent_run_id, search.max_retries),
                           *([_lending(search, sweep_dir, budget_path)] if lending else [])],
                # a lost process or node is retried; errors that would repeat end the trial without one
                # (orchestrator.attempts)
                failure_config=tune.FailureConfig(max_failures=search.max_retries),
                stop=LaunchBudget(budget_path),  # search.timeout_s, read per launch (a resume may raise it)
            )
            if warm_up:
                if worker is not None:
                    ray.get(worker)  # a dataset that cannot load fails here, as the teacher's task would
                _warm_teacher(context, resources, quiet=options.quiet)
            tune_path = str(sweep_dir / "tune")
            if options.resume:  # the status lines go on from what earlier launches finished
                progress.resume_from(schema.collect_rows(client, client.get_run(parent_run_id)))
            launch.enter_context(progress.reporting())  # a restored tuner's progress callback is this one
            if options.resume and tune.Tuner.can_restore(tune_path):
                tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True, resume_errored=False)
            else:
                searcher = make_searcher(spec, name, storage_url)
                if search.max_concurrent:
                    searcher = ConcurrencyLimiter(searcher, max_concurrent=search.max_concurrent)
                tuner = tune.Tuner(
                    trainable,
                    tune_config=tune.TuneConfig(
                        # its sample target follows search.trials of the latest launch (a resume may raise it)
                        search_alg=SweepSearchGenerator(searcher, budget_path, RecordedTrials(target.uri, parent_run_id)),
                        num_samples=search.trials,
                        scheduler=_scheduler(spec, sweep_dir, target.uri),
                        reuse_actors=search.reuse_actors,
                    ),
                    run_config=run_config,
                )
            # this launch's budget; the time budget counts from here, as Tune's own time_budget_s would
            write_budget(sweep_dir, trials=search.trials, timeout_s=search.timeout_s)
            started = time.monotonic()
            tuner.fit()
            progress.close()
            budget_ran_out = search.timeout_s is not None and time.monotonic() - started >= search.timeout_s
            stopped = _close_optuna_trials(name, storage_url, stopped=budget_ran_out, spec=spec, client=client,
                                           parent_run_id=parent_run_id)
            reason = (f"stopped when the time budget search.timeout_s = {search.timeout_s}s ran out" if budget_ran_out
                      else "stopped before its final result")
            table, rows = finish_sweep(client, parent_run_id, stopped={trial_id: reason for trial_id in stopped})
            return SweepOutcome(name, parent_run_id, experiment_id, target.uri, table, rows, ui_command(target),
                                trials_budget=search.trials)
    except BaseException as exc:
        if parent_run_id is not None:
            _end_parent_run(target.uri, parent_run_id, exc)
        raise
    finally:
        target.close()


def _end_parent_run(tracking_uri: str, parent_run_id: str, exc: BaseException) -> None:
    """A launch that ends in an error marks its sweep's parent run as MLflow's own `with start_run()` does:
    KILLED for an interrupt that reaches pxd (Tune itself takes a first Ctrl-C during `fit`, ends the
    trials and returns, and the sweep then finishes as usual), else FAILED (a resume sets it RUNNING again). Best effort, with no retries:
    the tracking server may be what failed, and the error must reach the user now."""
    from mlflow.tracking import MlflowClient

    status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
    previous = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        MlflowClient(tracking_uri).set_terminated(parent_run_id, status=status)
    except Exception:  # noqa: BLE001 - the launch's own error is the one to show
        pass
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = previous


def _lending(search: Any, sweep_dir: Path, budget_path: Path) -> Any:
    """The callback that lends idle slots' CPUs (the slots: what the trials may hold together)."""
    from orchestrator.cpu_lending import IdleCpuLending

    return IdleCpuLending(sweep_dir, budget_path, max_concurrent=search.max_concurrent,
                          cpu_per_trial=float(search.resources.cpu))


def _one_local_node(options: SweepOptions) -> bool:
    """The sweep runs on pxd's own Ray on this machine: no --ray-address, and one node (a caller may have
    connected to a cluster before calling run_sweep)."""
    import ray

    return options.ray_address is None and sum(bool(node.get("Alive")) for node in ray.nodes()) == 1


def _scheduler(spec: SweepSpec, sweep_dir: Path, tracking_uri: str) -> Any:
    """Tune's scheduler: MO-ASHA when `search.early_stopping.kind: moasha`, else None (every trial runs out)."""
    early = spec.require_search().early_stopping
    if early.kind != "moasha":
        return None
    from orchestrator.early_stopping import MOASHA, STATE_FILE

    return MOASHA.from_config(spec.require_search().objective_pairs, early, max_t=spec.base.student_epochs,
                              state_path=sweep_dir / STATE_FILE, tracking_uri=tracking_uri)


def _ready_worker_task(spec: SweepSpec) -> int:
    # what the teacher's task imports: MLflow's client (the stage store), SQLAlchemy (the stage leases),
    # torch, timm and pxd
    import mlflow.tracking  # noqa: F401
    import sqlalchemy  # noqa: F401

    import pxd.pipeline  # noqa: F401
    from pxd.data import load_dataset

    load_dataset(spec.base.dataset, spec.base.seed, progress=False)  # a real dataset's on-disk cache
    return os.getpid()


def _ready_warm_up_worker(spec: SweepSpec) -> Any:
    """Start, in Ray's worker pool, the work the teacher warm-up's worker would otherwise begin with:
    importing torch, timm, MLflow and pxd (seconds of single-core CPU in every new process) and preparing
    the dataset's on-disk cache. It runs while the driver starts the tracking server (one core), and
    Ray hands the warm-up task to an idle worker that has run a task before, so it finds them done."""
    import ray

    # it holds no CPU: the warm-up sizes itself by the CPUs free just after (Ray's view of a finished
    # task's CPUs lags); it asks for the warm-up's GPU share, as Ray gives a GPU task only a worker that
    # ran GPU tasks
    gpus = spec.require_search().resources.gpu
    return ray.remote(num_cpus=0, num_gpus=gpus, max_retries=0)(_ready_worker_task).remote(spec)


def _prepare_teacher_task(context: TrialContext, threads: int) -> dict[str, Any]:
    import torch

    from orchestrator.stage_store import make_provider
    from pxd.pipeline import prepare_teacher

    # Ray sets OMP_NUM_THREADS for the task, but a pooled worker that imported torch before keeps its count
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # the space's base config holds the sweep's one teacher and dataset
        outcome = prepare_teacher(context.spec.base, provider=make_provider(context), progress=False)
    finally:
        torch.set_num_threads(previous)  # the worker may next run a one-CPU task or trial
    return {"key": outcome.key, "reused": outcome.reused, "val_top1": outcome.result.metrics.get("val_top1")}


def warm_up_cpus(search: Any, available_cpus: float, largest_node_cpus: float) -> float:
    """CPUs for the teacher warm-up: it trains alone, before any trial, so it takes what the trial slots
    would hold together (search.resources.cpu × search.max_concurrent), within one node (a task runs on one) and what is free now (another sweep may share the cluster),
    and never fewer than one trial's CPUs."""
    per_trial = float(search.resources.cpu)
    return max(per_trial, float(int(min(per_trial * search.max_concurrent, largest_node_cpus, available_cpus))))


def _warm_teacher(context: TrialContext, resources: dict[str, float], *, quiet: bool) -> None:
    """Train (or find) the teacher every trial needs before launching trials, so concurrent trials do
    not sit on their resource reservations waiting for it. Runs as one Ray task on the CPUs the trial
    slots would hold (`warm_up_cpus`), with a trial's GPU share."""
    import ray

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    largest = max((float(node["Resources"].get("CPU", 0.0)) for node in nodes), default=resources["cpu"])
    cpus = warm_up_cpus(context.spec.require_search(), float(ray.available_resources().get("CPU", 0.0)), largest)
    if not quiet:
        print(f"[pxd] preparing the shared teacher stage on {cpus:g} CPU(s) before launching trials ...",
              file=sys.stderr, flush=True)
    task = ray.remote(num_cpus=cpus, num_gpus=resources["gpu"], max_retries=0)(_prepare_teacher_task)
    info = ray.get(task.remote(context, max(1, int(cpus))))
    if not quiet:
        state = "reused from the stage store" if info["reused"] else "trained"
        print(f"[pxd] teacher {info['key'][:12]} {state} (val_top1 {info['val_top1']:.3f})", file=sys.stderr, flush=True)


def _lease_url(options: SweepOptions, root: Path) -> str:
    """Stage leases live where every trial can reach them: the sweep's server database when there
    is one (Postgres on a cluster), else a SQLite file shared by every sweep under this root."""
    if _shared_database(options.optuna_storage):
        return str(options.optuna_storage)
    return f"sqlite:///{root / 'stage-leases.db'}"


def _shared_database(storage_url: str | None) -> bool:
    return bool(storage_url) and not str(storage_url).startswith("sqlite")


def _check_lease_store(options: SweepOptions) -> None:
    """A cluster sweep needs a lease store every node reaches (`_lease_url`): refused without one, since
    trials on other nodes would each train the shared stages (single-flight lost)."""
    if options.ray_address and not _shared_database(options.optuna_storage):
        given = (f"{options.optuna_storage} is a SQLite file" if options.optuna_storage
                 else "without it they are a SQLite file")
        raise ConfigError("--optuna-storage", f"a sweep on a Ray cluster (--ray-address) keeps its stage leases in the "
                                              f"Optuna database, which every node must reach; {given} on the driver's "
                                              "disk. Pass a Postgres URL, e.g. the compose stack's --optuna-storage "
                                              "postgresql+psycopg2://postgres@postgres:5432/optuna")


def _validate(spec: SweepSpec, options: SweepOptions) -> None:
    from orchestrator.tracking import check_tracking
    from pxd.data import check_dataset

    check_dataset(spec.base.dataset)
    if options.name is not None:
        check_sweep_name(options.name, "--name")
    check_tracking(options.tracking_uri, cluster=options.ray_address is not None)
    _check_lease_store(options)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """An unreachable --ray-address fails in seconds (Ray itself retries a dead address for minutes)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError("--ray-address", f"expected HOST:PORT of the Ray head (e.g. 10.0.0.5:6379), got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError("--ray-address", f"cannot reach {host}:{port} ({exc.strerror or exc}); check that the head "
                                           "runs (`ray start --head`) and the address, or omit it to run locally") from None


def _check_cluster_can_run(spec: SweepSpec, available: dict[str, float]) -> None:
    """Refuse, before any compute, a trial the Ray cluster could never schedule (Tune would wait forever)."""
    search = spec.require_search()
    gpus, cpus = float(available.get("GPU", 0.0)), float(available.get("CPU", 0.0))
    if search.resources.gpu > gpus:
        raise ConfigError("search.resources.gpu", f"each trial asks for {search.resources.gpu:g} GPU but the Ray cluster "
                                                  f"has {gpus:g}; set search.resources.gpu: 0, or add GPU nodes")
    if search.resources.cpu > cpus:
        raise ConfigError("search.resources.cpu", f"each trial asks for {search.resources.cpu:g} CPUs but the Ray cluster "
                                                  f"has {cpus:g}; lower search.resources.cpu")
    for field, device in (("search.latency.device", search.latency.device), ("train.device", spec.base.train.device)):
        if device == "cuda" and search.resources.gpu <= 0:
            reason = "the Ray cluster has no GPU" if gpus == 0 else "trials reserve no GPU (search.resources.gpu: 0)"
            raise ConfigError(field, f"is cuda but {reason}; use auto or cpu, or give each trial a GPU with "
                                     "search.resources.gpu")


def _trainable(config: dict[str, Any], context: TrialContext) -> None:
    recorded = _completed_before(context)
    if recorded is not None:
        from ray import tune

        tune.report(recorded)  # finished before the driver died: keep that result, train nothing again
        return
    run_trial(config, context)


def _completed_before(context: TrialContext) -> dict[str, Any] | None:
    """This Tune trial's final result if an earlier launch of the sweep already completed it, else None.

    `--resume` restores Tune's last experiment checkpoint, which can predate the end of a trial that
    MLflow already holds as COMPLETE (the driver died in between). Running it again would train it
    twice and put it in the frontier twice; reporting the recorded result finishes it instead.
    """
    from mlflow.tracking import MlflowClient
    from ray import tune

    from orchestrator.spec import constraint_values

    client = MlflowClient(context.tracking_uri)
    parent = client.get_run(context.parent_run_id)
    runs = schema.trial_runs(client, parent, trial_id=str(tune.get_context().get_trial_id()), state="COMPLETE")
    if not runs:
        return None
    metrics = dict(runs[0].data.metrics)
    return schema.recorded_result(runs[0], constraint_values(context.spec, metrics)).report()


def _experiment_id(client: MlflowClient, name: str) -> str:
    """The space's experiment, created if needed; it opens in MLflow's model-training view (MLflow 3 shows
    the GenAI view unless the experiment says otherwise)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        experiment_id = str(experiment.experiment_id)
    else:
        experiment_id = str(client.create_experiment(name))
    client.set_experiment_tag(experiment_id, *schema.EXPERIMENT_KIND)
    return experiment_id


def _parent_run(client: MlflowClient, experiment_id: str, name: str, spec: SweepSpec, storage_url: str, *,
                resume: bool) -> str:
    if resume:
        found = schema.find_sweep_run(client, name)
        if found is not None:
            client.update_run(found.info.run_id, status="RUNNING")
            return str(found.info.run_id)
    search = spec.require_search()
    objectives = search.objective_pairs
    storage_shown = credentials.redact(storage_url)
    run = client.create_run(experiment_id, run_name=name, tags=schema.sweep_run_tags(
        sweep=name, objectives=objectives, reference_point=search.reference_point, ideal_point=search.ideal_point,
        optuna_storage=storage_shown, optuna_study=name,
    ))
    run_id = run.info.run_id
    client.log_param(run_id, schema.Param.SAMPLER, search.sampler.name)
    client.log_param(run_id, schema.Param.SAMPLER_SEED, search.sampler.seed)
    client.log_param(run_id, schema.Param.TRIALS, search.trials)
    client.log_param(run_id, schema.Param.OBJECTIVES, ", ".join(f"{m}:{mode}" for m, mode in objectives))
    client.log_param(run_id, schema.Param.REFERENCE_POINT, json.dumps(search.reference_point))
    client.log_text(run_id, yaml.safe_dump(spec.raw, sort_keys=False), "spec.yaml")
    return str(run_id)


def finish_sweep(client: MlflowClient, parent_run_id: str, stopped: dict[str, str] | None = None
                 ) -> tuple[dict[str, Any], list[TrialRow]]:
    """Frontier of the sweep → the parent run (table, plots, hypervolume) and tags on frontier runs.
    `stopped`: Tune trial id → why, for trials stopped before their final result (Optuna: PRUNED)."""
    parent = client.get_run(parent_run_id)
    objectives, reference, ideal = schema.sweep_objectives(parent)
    rows = schema.collect_rows(client, parent)
    _close_lost_trials(client, rows, stopped or {})
    table = frontier_table(rows, objectives, reference, ideal)
    on_front = {row["run_id"] for row in table["rows"] if row["on_frontier"]}
    for row in rows:
        if row.state == "COMPLETE":
            client.set_tag(row.run_id, Tag.ON_FRONTIER, str(row.run_id in on_front).lower())
    x_metrics = tuple(m for m, _ in objectives if m != "val_top1") or ("gmacs",)
    log_frontier(client, parent, table, "frontier", png_axes=x_metrics)
    outcomes = trial_outcomes(rows)
    counts = {state: sum(s == state for s in outcomes.values()) for state in ("COMPLETE", "FAILED", "PRUNED")}
    client.log_metric(parent_run_id, schema.SweepMetric.HYPERVOLUME, float(table["hypervolume"]))
    client.log_metric(parent_run_id, schema.SweepMetric.HYPERVOLUME_NORMALISED, float(table["hypervolume_normalised"]))
    client.log_metric(parent_run_id, schema.SweepMetric.FRONTIER_SIZE, float(len(on_front)))
    client.log_metric(parent_run_id, schema.SweepMetric.TRIALS_COMPLETE, float(counts["COMPLETE"]))
    client.log_metric(parent_run_id, schema.SweepMetric.TRIALS_FAILED, float(counts["FAILED"]))
    client.log_metric(parent_run_id, schema.SweepMetric.TRIALS_STOPPED, float(counts["PRUNED"]))
    _log_stage_totals(client, parent_run_id, rows)
    client.set_terminated(parent_run_id, status="FINISHED")
    return table, rows


def cost_axes(table: dict[str, Any]) -> tuple[str, ...]:
    """Every cost metric the table's trials have (registered, lower is better), hardware latencies
    included: the axes a reader of the Pareto page may choose from."""
    from pxd import metrics as registry

    present = {key for row in table["rows"] for key in row["metrics"]}
    axes = [m.name for m in registry.METRICS.values() if m.mode == "min" and m.summary and m.name in present]
    return tuple(axes + sorted(k for k in present if k.startswith("latency_ms.") and k not in axes))


def log_frontier(client: MlflowClient, parent: Any, table: dict[str, Any], path: str, *,
                 png_axes: tuple[str, ...]) -> None:
    """A frontier's artifacts under `path` of the sweep's run: CSV and JSON, a PNG of `png_axes`, and
    the interactive page with every cost axis to choose from, its points linked to their MLflow runs."""
    from orchestrator.plots import plot_html, plot_png

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_table(table, folder)
        plot_png(table, folder / "frontier.png", x_metrics=png_axes)
        axes = tuple(dict.fromkeys((*png_axes, *cost_axes(table))))
        plot_html(table, folder / "frontier.html", x_metrics=axes, experiment_id=parent.info.experiment_id,
                  tracking_uri=credentials.without_password(client.tracking_uri))
        client.log_artifacts(parent.info.run_id, str(folder), path)


def _close_optuna_trials(study_name: str, storage_url: str, *, stopped: bool, spec: SweepSpec,
                         client: MlflowClient, parent_run_id: str) -> set[str]:
    """No study trial stays RUNNING once the sweep is over. A trial whose MLflow run is COMPLETE (it
    recorded its result, then its driver died before telling Optuna, after Tune's last snapshot) is told
    COMPLETE with the recorded values and constraints, so the study and MLflow agree. A trial Tune still
    ran when the time budget ran out is told PRUNED (stopped, like the searcher tells a trial that ended
    without its final result); any other (its driver was killed before Tune saved its state, and resume
    did not rerun it) is told FAIL. Returns the Tune trial ids of the study's PRUNED trials."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage_url)
    state = optuna.trial.TrialState.PRUNED if stopped else optuna.trial.TrialState.FAIL
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    recorded: dict[str, Any] = {}
    if running:  # Tune trial id → its COMPLETE MLflow run
        parent = client.get_run(parent_run_id)
        recorded = {run.data.tags[Tag.TRIAL_ID]: run for run in schema.trial_runs(client, parent, state="COMPLETE")}
    for trial in running:
        run = recorded.get(str(trial.user_attrs.get("tune_trial_id", "")))
        if run is not None and _tell_recorded(study, trial, run, spec):
            continue
        study.tell(trial.number, state=state)
    return {str(t.user_attrs["tune_trial_id"]) for t in study.get_trials(deepcopy=False)
            if t.state == optuna.trial.TrialState.PRUNED and t.user_attrs.get("tune_trial_id")}


def _tell_recorded(study: Any, trial: Any, run: Any, spec: SweepSpec) -> bool:
    """Tell the study a trial's recorded MLflow result (as the searcher would have); False if incomplete."""
    import optuna

    from orchestrator.spec import constraint_names, constraint_values

    metrics = dict(run.data.metrics)
    values = [metrics.get(metric) for metric in spec.objective_metrics]
    if not all(isinstance(v, float) and math.isfinite(v) for v in values):
        return False
    live = optuna.trial.Trial(study, trial._trial_id)
    for name, value in zip(constraint_names(spec), constraint_values(spec, metrics)):
        live.set_constraint(name, value)
    live.set_user_attr("mlflow_run_id", run.info.run_id)
    study.tell(live, values)
    return True


def _close_lost_trials(client: MlflowClient, rows: list[TrialRow], stopped: dict[str, str]) -> None:
    """When the sweep ends no trial runs. A run still RUNNING was either stopped (Optuna holds its trial
    as PRUNED: recorded PRUNED with the reason, so Optuna and MLflow agree) or lost its process (a node
    died, a driver was killed and the trial restarted on resume): recorded FAILED."""
    for row in rows:
        if row.state != "RUNNING" or not row.run_id:
            continue
        if row.trial_id in stopped:
            # early stopping said why when it stopped the trial; otherwise the sweep's reason (the time budget)
            reason = client.get_run(row.run_id).data.tags.get(Tag.STOPPED_REASON) or stopped[row.trial_id]
            schema.log_trial_failure(client, row.run_id, reason, "", state="PRUNED")
            client.set_terminated(row.run_id, status="KILLED")
            row.state = "PRUNED"
        else:
            schema.log_trial_failure(client, row.run_id, "trial process lost (its node died or its driver was killed); "
                                     "no final result", "")
            client.set_terminated(row.run_id, status="FAILED")
            row.state = "FAILED"


def _log_stage_totals(client: MlflowClient, parent_run_id: str, rows: list[TrialRow]) -> None:
    """Stages this sweep trained (teacher warm-up included) and reused, and the training time reuse saved."""
    sweep = client.get_run(parent_run_id).data.tags[Tag.SWEEP]
    experiment = client.get_experiment_by_name(schema.STAGES_EXPERIMENT)
    trained = client.search_runs(
        [experiment.experiment_id], f"tags.`{Tag.SWEEP}` = '{sweep}' and tags.`{Tag.STAGE_COMPLETE}` = 'true'",
        max_results=5000,
    ) if experiment is not None else []
    metric = schema.SweepMetric
    for kind in ("teacher", "assistant", "student"):
        count = sum(run.data.tags.get(Tag.STAGE) == kind for run in trained)
        client.log_metric(parent_run_id, metric.trained(kind), float(count))
    client.log_metric(parent_run_id, metric.STAGES_TRAINED, float(len(trained)))
    client.log_metric(parent_run_id, metric.STAGES_REUSED, float(sum(row.metrics.get(metric.STAGES_REUSED, 0.0) for row in rows)))
    client.log_metric(parent_run_id, metric.STAGE_SECONDS_SAVED,
                      float(sum(row.metrics.get(metric.STAGE_SECONDS_SAVED, 0.0) for row in rows)))


def summary(outcome: SweepOutcome) -> str:
    lines = [format_table(outcome.table)]
    outcomes = list(trial_outcomes(outcome.rows).values())
    failed, stopped = outcomes.count("FAILED"), outcomes.count("PRUNED")
    lines.append(f"hypervolume {outcome.table['hypervolume_normalised']:.4f} of the reference-to-ideal box "
                 f"({outcome.table['hypervolume']:.6g} in the objectives' units) · frontier "
                 f"{sum(r['on_frontier'] for r in outcome.table['rows'])} of {outcome.table['n_eligible']} eligible"
                 f" · {failed} failed · {stopped} stopped")
    if failed or stopped:  # raising search.trials by one after a lost trial would otherwise seem to run none
        raised = max(outcome.trials_budget, len(outcomes)) + failed + stopped
        lines.append(f"failed, stopped and infeasible trials count toward search.trials, as in the Optuna study: "
                     f"to run {failed + stopped} more, resume with it raised by as many (--resume --name "
                     f"{outcome.sweep_name} --set search.trials={raised})")
    lines.append(f"sweep {outcome.sweep_name}: parent run {outcome.parent_run_id} (experiment {outcome.experiment_id}) at {outcome.tracking_uri}")
    lines.append(f"MLflow UI: {outcome.ui}")
    lines.append(f"frontier runs in the UI: filter  tags.`{Tag.ON_FRONTIER}` = 'true'")
    return credentials.scrub("\n".join(lines))

