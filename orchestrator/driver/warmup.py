"""The teacher warm-up: the shared teacher trains (or is found) once, as one Ray task, before any trial is
launched; a worker is readied for it while the driver starts the tracking server."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import mlflow.tracking  # noqa: F401
import ray
import sqlalchemy  # noqa: F401
import torch
from ray.util.queue import Queue

import pxd.pipeline  # noqa: F401
from orchestrator.driver.progress import EPOCH_SECONDS, epoch_line
from orchestrator.tracking.retries import install_body_retries
from orchestrator.worker.context import TrialContext
from orchestrator.worker.kept import WorkerState
from orchestrator.worker.provider import make_provider
from pxd.data import load_dataset
from pxd.metrics import primary_metric
from pxd.pipeline import prepare_teacher
from pxd.train import EpochCallback

if TYPE_CHECKING:
    from orchestrator.space.spec import SweepSpec

__all__ = ["ready_warm_up_worker", "warm_teacher", "warm_up_cpus"]

_POLL_S = 0.5  # how often the driver prints the teacher's epochs while its task trains


def _ready_worker_task(spec: SweepSpec) -> int:
    # what the teacher's task imports: MLflow's client (the stage store), SQLAlchemy (the stage leases),
    # torch, timm and pxd

    load_dataset(spec.base.dataset, spec.base.seed, progress=False)  # a real dataset's on-disk cache
    return os.getpid()


def ready_warm_up_worker(spec: SweepSpec) -> Any:
    """Start, in Ray's worker pool, the work the teacher warm-up's worker would otherwise begin with:
    importing torch, timm, MLflow and pxd (seconds of single-core CPU in every new process) and preparing
    the dataset's on-disk cache. It runs while the driver starts the tracking server (one core), and
    Ray hands the warm-up task to an idle worker that has run a task before, so it finds them done."""

    # it holds no CPU: the warm-up sizes itself by the CPUs free just after (Ray's view of a finished
    # task's CPUs lags); it asks for the warm-up's GPU share, as Ray gives a GPU task only a worker that
    # ran GPU tasks
    gpus = spec.require_search().resources.gpu
    return ray.remote(num_cpus=0, num_gpus=gpus, max_retries=0)(_ready_worker_task).remote(spec)


def _pushing_epochs(epochs: Queue | None) -> EpochCallback | None:
    """The teacher's on_epoch in its task: each epoch (stage, epoch, val_top1, seconds) pushed into `epochs`,
    which the driver prints from; None when nothing is printed (quiet)."""
    if epochs is None:
        return None

    def on_epoch(kind: str, epoch: int, record: dict[str, float]) -> None:
        epochs.put((kind, epoch, record[primary_metric()], record[EPOCH_SECONDS]))

    return on_epoch


def _prepare_teacher_task(context: TrialContext, threads: int, epochs: Queue | None) -> dict[str, Any]:
    install_body_retries()  # the teacher's stage store survives a tracking server restart mid-answer
    # Ray sets OMP_NUM_THREADS for the task, but a pooled worker that imported torch before keeps its count
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # the space's base config holds the sweep's one teacher and dataset
        outcome = prepare_teacher(context.spec.base, provider=make_provider(context), progress=False,
                                  on_epoch=_pushing_epochs(epochs), train=WorkerState.from_environment().stage_trainer())
    finally:
        torch.set_num_threads(previous)  # the worker may next run a one-CPU task or trial
    return {"key": outcome.key, "reused": outcome.reused, "score": outcome.result.metrics.get(primary_metric())}


def warm_up_cpus(search: Any, available_cpus: float, largest_node_cpus: float) -> float:
    """CPUs for the teacher warm-up: it trains alone, before any trial, so it takes what the trial slots
    would hold together (search.resources.cpu × search.max_concurrent), within one node (a task runs on one) and what is free now (another sweep may share the cluster),
    and never fewer than one trial's CPUs."""
    per_trial = float(search.resources.cpu)
    return max(per_trial, float(int(min(per_trial * search.max_concurrent, largest_node_cpus, available_cpus))))


def warm_teacher(context: TrialContext, resources: dict[str, float], *, quiet: bool) -> None:
    """Train (or find) the teacher every trial needs before launching trials, so concurrent trials do
    not sit on their resource reservations waiting for it. Runs as one Ray task on the CPUs the trial
    slots would hold (`warm_up_cpus`), with a trial's GPU share."""

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    largest = max((float(node["Resources"].get("CPU", 0.0)) for node in nodes), default=resources["cpu"])
    cpus = warm_up_cpus(context.spec.require_search(), float(ray.available_resources().get("CPU", 0.0)), largest)
    if not quiet:
        print(f"[pxd] preparing the shared teacher stage on {cpus:g} CPU(s) before launching trials ...",
              file=sys.stderr, flush=True)
    task = ray.remote(num_cpus=cpus, num_gpus=resources["gpu"], max_retries=0)(_prepare_teacher_task)
    if quiet:
        info = ray.get(task.remote(context, max(1, int(cpus)), None))
    else:
        info = _printing_epochs(lambda epochs: task.remote(context, max(1, int(cpus)), epochs),
                                context.spec.base.teacher.epochs)
    if not quiet:
        state = "reused from the stage store" if info["reused"] else "trained"
        print(f"[pxd] teacher {info['key'][:12]} {state} ({primary_metric()} {info['score']:.3f})", file=sys.stderr, flush=True)


def _printing_epochs(start: Callable[[Queue], Any], epochs: int) -> dict[str, Any]:
    """The warm-up task's result, started by `start` with the queue it pushes each teacher epoch into; the
    driver prints every epoch as it arrives. Ray does not bring the task's own output to the driver
    (`log_to_driver=False`), and a queue (a small actor holding no CPU) works wherever the task runs."""
    started = time.monotonic()
    trained = Queue(actor_options={"num_cpus": 0})
    try:
        pending = start(trained)
        while True:
            finished, _ = ray.wait([pending], timeout=_POLL_S)
            waiting = trained.qsize()  # what the task pushed before it finished is all there
            for stage, epoch, top1, seconds in trained.get_nowait_batch(waiting) if waiting else []:
                print(f"[pxd] teacher warm-up · {time.monotonic() - started:5.0f}s  | "
                      f"{epoch_line(stage, epoch, epochs, top1, seconds)}", file=sys.stderr, flush=True)
            if finished:
                return ray.get(pending)
    finally:
        trained.shutdown(force=True)  # every epoch was read
