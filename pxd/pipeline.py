"""The teacher → assistant → student (TAS) pipeline of Pixel Distillation (Guo et al., TPAMI 2024).

Stage 0, teacher: `teacher.arch` at `teacher.resolution` (trained with cross-entropy, or loaded).
Stage 1, model compression: the assistant is the student's architecture at the teacher's resolution,
distilled from the teacher. Stage 2, input compression: the student at `student.resolution`, distilled
from the assistant. With `assistant.enabled: false` the student is distilled from the teacher directly
(one-stage pixel distillation), for comparison.

Each stage is identified by a content-addressed `stage key` and obtained through a `StageProvider`
(`pxd.stages`), so a sweep can share stages between trials (`orchestrator.stages.store`); the default
provider simply trains. What a process keeps between runs is the caller's `ProcessMemory` (`pxd.memo`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pxd.config import PipelineConfig
from pxd.cost import Cost, LatencyCache, measure_cost, static_cost
from pxd.data import load_dataset
from pxd.device import autocast_dtype, resolve_device
from pxd.evaluate import evaluate
from pxd.memo import ProcessMemory, remember
from pxd.metrics import metrics_before_training, metrics_from_cost
from pxd.models import create_model
from pxd.sections import ModelConfig
from pxd.stages import (
    ResumableTraining,
    StageOutcome,
    StageProvider,
    TrainingProvider,
    describe,
    digest,
    stage_identities,
    stage_keys,
)
from pxd.threads import CpuThreads
from pxd.train import Checkpointing, EpochCallback, StageResult, StageTrainer, train_stage
from pxd.types import DatasetSplits
from pxd.weights import init_from

logger = logging.getLogger(__name__)

__all__ = [
    "ASSISTANT_GAP_WARNING",
    "PipelineResult",
    "run_tas",
    "LatencySettings",
    "prepare_teacher",
    "TIMED_SECTIONS",
    # defined in pxd.stages and pxd.weights, used from here by the orchestrator, bench/ and tests
    "StageOutcome",
    "ResumableTraining",
    "stage_keys",
    "stage_identities",
    "init_from",
]

# An assistant this far (absolute val_top1) below its teacher did not learn what it should pass on.
ASSISTANT_GAP_WARNING = 0.10

# What `run_tas` spends outside training, by section (`PipelineResult.timings`, seconds): loading the
# data, creating models and counting their cost before training, getting stages from the provider beyond
# training them (lookup, download, upload, waiting for another trial's stage), timing latency, and
# evaluating on the test split. "training" is the training time of the stages this run trained.
TIMED_SECTIONS = ("data", "models", "stages", "latency", "test", "training")


@dataclass(frozen=True)
class LatencySettings:
    device: str | None = None  # auto | cpu | cuda; None: the training device
    repeats: int = 20
    warmup: int = 5
    cache: LatencyCache | None = None  # reuse a measurement of the same architecture and input (`pxd.cost`)
    # called right before timing: e.g. to wait for the caller's background work, which would disturb it
    before_timing: Callable[[], None] | None = None


@dataclass
class PipelineResult:
    config: PipelineConfig
    # every registered metric (`pxd.metrics`) plus <stage>_val_top1, and test_top1 when the data has a test split
    metrics: dict[str, float]
    stages: dict[str, StageOutcome]
    student: nn.Module = field(repr=False)
    cost: dict[str, Any] = field(default_factory=dict)
    # What the user should look at (also logged): an assistant far below its teacher, skipped stages.
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per `TIMED_SECTIONS` entry


@contextmanager
def _timed(timings: dict[str, float], section: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[section] = timings.get(section, 0.0) + time.perf_counter() - started


class _TimedProvider:
    """Wraps a provider: its time beyond the training it did goes to section "stages", the training to
    "training" (a stage's `train_seconds`)."""

    def __init__(self, provider: StageProvider, timings: dict[str, float]) -> None:
        self.provider, self.timings = provider, timings

    def get_or_train(self, kind: str, key: str, describe: dict[str, Any], train: Callable[[], StageResult]) -> StageOutcome:
        started = time.perf_counter()
        outcome = self.provider.get_or_train(kind, key, describe, train)
        trained = 0.0 if outcome.reused else float(outcome.result.metrics.get("train_seconds", 0.0))
        self.timings["training"] = self.timings.get("training", 0.0) + trained
        self.timings["stages"] = self.timings.get("stages", 0.0) + max(0.0, time.perf_counter() - started - trained)
        return outcome


@dataclass
class _Run:
    """What the stages of one run share."""

    cfg: PipelineConfig
    data: DatasetSplits
    provider: StageProvider
    keys: dict[str, str]  # stage kind → stage key
    timings: dict[str, float]
    memory: ProcessMemory | None
    common: dict[str, Any]  # the `train_stage` arguments every stage of the run passes
    train: StageTrainer = train_stage  # what trains a stage (`pxd.simulated` in benchmarks of the orchestration)

    def describe(self, kind: str) -> dict[str, Any]:
        """What a stored stage records beside it: `pxd.stages.describe`, and a trainer's own identity."""
        return {**describe(self.cfg, kind), **_trainer_identity(self.train)}


def run_tas(
    cfg: PipelineConfig,
    *,
    provider: StageProvider | None = None,
    on_epoch: EpochCallback | None = None,
    progress: bool | None = None,
    data: DatasetSplits | None = None,
    measure_latency: bool = True,
    latency: LatencySettings | None = None,
    before_training: Callable[[dict[str, float]], None] | None = None,
    memory: ProcessMemory | None = None,
    cpu_threads: CpuThreads | None = None,
    train: StageTrainer = train_stage,
) -> PipelineResult:
    """Run the whole chain and measure the student's cost. Raises `DivergedError` on a NaN loss.

    Latency is measured on `latency.device` (default: the training device); `measure_latency=False`
    times one pass only (tests). `before_training` gets the student's metrics known before training
    (`gmacs`, `params_m`, `pixels`) before any stage trains, and may raise to stop the run there
    (a sweep refuses a trial that breaks a hard budget this way). `memory` is what this process keeps
    for its next run (`ProcessMemory`: the teacher and assistant modules, the student's cost known before
    training, the compiled upstream forward); None builds, counts and compiles everything again (to
    measure what keeping saves, bench/overhead.py). `cpu_threads` reaches every stage this run trains
    (`pxd.train.train_stage`). `train` trains each stage (default `train_stage`; a `pxd.simulated.SimulatedTraining`
    only sleeps, to benchmark what runs around training, and its identity joins the stage keys).
    """
    timings = {section: 0.0 for section in TIMED_SECTIONS}
    device = resolve_device(cfg.train.device)
    with _timed(timings, "data"):
        data = data or load_dataset(cfg.dataset, cfg.seed)
    keys = stage_keys(cfg, data.fingerprint, _trainer_identity(train))
    with _timed(timings, "models"):
        # trained in stage 2 below: counting does not change it (eval mode, no grad), and training seeds itself
        student = _new_model(cfg.student, data.num_classes, "student", cfg.seed)
        # counted once: the budget check and the result
        static = _static_cost(cfg.student, data.num_classes, student, memory)
    if before_training is not None:
        before_training(metrics_before_training(static))
    common = dict(data=data, image_resolution=cfg.teacher.resolution, train=cfg.train, seed=cfg.seed, device=device,
                  on_epoch=on_epoch, progress=progress, cpu_threads=cpu_threads, memory=memory)
    run = _Run(cfg, data, _TimedProvider(provider or TrainingProvider(), timings), keys, timings, memory, common,
               train)

    outcomes, teacher, upstream = _upstream_chain(run)
    outcomes["student"] = _student_stage(run, student, upstream)
    cost = _student_cost(run, student, static, latency or LatencySettings(), measure_latency)
    metrics = metrics_from_cost(cost, outcomes["student"].result.metrics)
    for kind, outcome in outcomes.items():
        metrics[f"{kind}_val_top1"] = outcome.result.metrics["val_top1"]
    if data.test is not None:
        with _timed(timings, "test"):
            metrics["test_top1"] = _test_top1(cfg, data, student, device)
    warnings = _pipeline_warnings(outcomes)
    if device.type != "cpu":  # modules kept for the next run (`ProcessMemory.upstream`) hold no device memory
        for module in (teacher, upstream):
            module.cpu()
    return PipelineResult(config=cfg, metrics=metrics, stages=outcomes, student=student.cpu(), cost=cost.to_dict(),
                          warnings=warnings, timings=timings)


def _upstream_chain(run: _Run) -> tuple[dict[str, StageOutcome], nn.Module, nn.Module]:
    """Stage 0, the teacher, and stage 1, model compression (the assistant: the student's architecture at
    the teacher's resolution); the outcomes, the teacher and the student's upstream module."""
    cfg, high = run.cfg, run.cfg.teacher.resolution
    outcomes: dict[str, StageOutcome] = {}
    teacher, outcomes["teacher"] = _teacher_stage(run)
    upstream = teacher
    if cfg.assistant.enabled:
        assistant_cfg = dataclasses.replace(cfg.student, resolution=high)
        upstream, outcomes["assistant"] = _upstream_stage(
            run, "assistant",
            build=lambda: _new_model(assistant_cfg, run.data.num_classes, "student", cfg.seed),
            train=lambda assistant, checkpointing: run.train(
                "assistant", assistant, resolution=high, teacher=teacher, distill=cfg.assistant_distill,
                epochs=cfg.assistant_epochs, checkpointing=checkpointing, **{**run.common, "train": cfg.assistant_train}),
        )
    return outcomes, teacher, upstream


def _student_stage(run: _Run, student: nn.Module, upstream: nn.Module) -> StageOutcome:
    """Stage 2, input compression: the student at its low resolution, distilled from its upstream."""
    cfg = run.cfg
    if cfg.assistant.enabled and cfg.assistant.init_student:
        with _timed(run.timings, "models"):
            init_from(upstream.state_dict(), student)
    outcome = run.provider.get_or_train(
        "student", run.keys["student"], run.describe("student"),
        ResumableTraining(lambda checkpointing: run.train(
            "student", student, resolution=cfg.student.resolution, teacher=upstream, distill=cfg.distill,
            epochs=cfg.student_epochs, checkpointing=checkpointing, **run.common)),
    )
    student.load_state_dict(outcome.result.state_dict)
    return outcome


def _student_cost(run: _Run, student: nn.Module, static: Cost, latency: LatencySettings, measure_latency: bool) -> Cost:
    """The trained student's cost, timed on `latency.device` (default: the training device)."""
    timing_device = resolve_device(latency.device) if latency.device else run.common["device"]
    with _timed(run.timings, "latency"):
        if latency.before_timing is not None:
            latency.before_timing()
        return measure_cost(
            student, run.cfg.student.resolution, device=str(timing_device),
            dtype=autocast_dtype(timing_device) or torch.float32,
            repeats=latency.repeats if measure_latency else 1, warmup=latency.warmup if measure_latency else 0,
            cache=latency.cache, architecture=_architecture(run.cfg.student, run.data.num_classes), static=static,
        )


def _architecture(model: ModelConfig, num_classes: int) -> dict[str, Any]:
    """What decides a model's latency: its architecture and head, not its weights (`LatencyCache`)."""
    identity = dataclasses.asdict(model)
    for weights_only in ("checkpoint", "pretrained", "epochs"):
        identity.pop(weights_only, None)
    return {**identity, "num_classes": num_classes}


def _pipeline_warnings(outcomes: dict[str, StageOutcome]) -> list[str]:
    """Each stage's own warnings, and an assistant far below its teacher; every one also logged."""
    warnings = [f"{kind}: {w}" for kind, o in outcomes.items() for w in getattr(o.result, "warnings", [])]
    if "assistant" in outcomes:
        teacher = outcomes["teacher"].result.metrics["val_top1"]
        assistant = outcomes["assistant"].result.metrics["val_top1"]
        if assistant < teacher - ASSISTANT_GAP_WARNING:
            warnings.append(
                f"assistant: val_top1 {assistant:.3f} is {teacher - assistant:.3f} below its teacher's "
                f"{teacher:.3f}; distillation did not transfer what the student should learn from (lower "
                "train.lr, distill.kd or distill.temperature, or train the assistant longer)"
            )
    for warning in warnings:
        logger.warning(warning)
    return warnings


def _test_top1(cfg: PipelineConfig, data: DatasetSplits, student: nn.Module, device: torch.device) -> float:
    """The held-out test split, evaluated once at the weights `val_top1` selected; reported, never used to choose."""
    return evaluate(student.to(device), data.test, resolution=cfg.student.resolution,
                    image_resolution=cfg.teacher.resolution, eval_crop=data.eval_crop,
                    batch_size=cfg.train.batch_size * 2, device=device)


def _new_model(model: ModelConfig, num_classes: int, field: str, seed: int) -> nn.Module:
    """A model whose initial weights depend on the seed only, not on what ran before in the process."""
    torch.manual_seed(seed)
    return create_model(model, num_classes, field=field)


def _teacher_stage(run: _Run) -> tuple[nn.Module, StageOutcome]:
    cfg, data, device = run.cfg, run.data, run.common["device"]
    high = cfg.teacher.resolution

    def train_teacher(teacher: nn.Module, checkpointing: Checkpointing | None) -> StageResult:
        if cfg.teacher.epochs == 0:  # a loaded checkpoint / pretrained teacher, used as is
            top1 = evaluate(teacher.to(device), data.val, resolution=high, image_resolution=high,
                            eval_crop=data.eval_crop, batch_size=cfg.teacher_train.batch_size, device=device)
            state = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}
            return StageResult("teacher", state, {"val_top1": top1, "epochs": 0.0, "train_seconds": 0.0})
        # the teacher trains with its own optimiser settings (`teacher.train` over `train`)
        return run.train("teacher", teacher, resolution=high, teacher=None, distill=None, epochs=cfg.teacher.epochs,
                           checkpointing=checkpointing, **{**run.common, "train": cfg.teacher_train})

    return _upstream_stage(run, "teacher", build=lambda: _new_model(cfg.teacher, data.num_classes, "teacher", cfg.seed),
                           train=train_teacher)


def _upstream_stage(
    run: _Run, kind: str, *, build: Callable[[], nn.Module],
    train: Callable[[nn.Module, Checkpointing | None], StageResult],
) -> tuple[nn.Module, StageOutcome]:
    """The teacher or assistant stage, got or trained through the run's provider, as a module holding its
    weights: the module the run's memory kept for that very result (`ProcessMemory.upstream`), or a new one."""
    key, memory = run.keys[kind], run.memory
    kept = memory.upstream.get((kind, key)) if memory is not None else None
    model: nn.Module | None = None
    if kept is None:  # likely to be needed: build it outside the stage's time, as its own section
        with _timed(run.timings, "models"):
            model = build()

    def train_stage_model(checkpointing: Checkpointing | None) -> StageResult:
        nonlocal model
        if model is None:
            model = build()
        return train(model, checkpointing)

    outcome = run.provider.get_or_train(kind, key, run.describe(kind), ResumableTraining(train_stage_model))
    if kept is not None and kept[0] is outcome.result:
        return remember(memory.upstream, (kind, key), kept, memory.upstream_limit)[1], outcome  # now the newest
    with _timed(run.timings, "models"):
        if model is None:
            model = build()
        model.load_state_dict(outcome.result.state_dict)
    if memory is not None:  # the least recently used goes
        remember(memory.upstream, (kind, key), (outcome.result, model), memory.upstream_limit)
    return model, outcome


def _static_cost(model_cfg: ModelConfig, num_classes: int, model: nn.Module, memory: ProcessMemory | None) -> Cost:
    """`static_cost(model, model_cfg.resolution)`, counted once per architecture and input in a process (with
    `memory`): it depends on the architecture alone, never on the weights."""
    if memory is None:
        return static_cost(model, model_cfg.resolution)
    key = digest(_architecture(model_cfg, num_classes))
    kept = memory.static_costs.get(key) or remember(memory.static_costs, key, static_cost(model, model_cfg.resolution),
                                                    memory.static_cost_limit)
    return dataclasses.replace(kept, threads=torch.get_num_threads())


def _trainer_identity(train: StageTrainer) -> dict[str, Any]:
    """What a trainer other than `train_stage` adds to every stage's identity (e.g. a simulated one)."""
    return dict(getattr(train, "identity", {}))


def prepare_teacher(
    cfg: PipelineConfig, *, provider: StageProvider, progress: bool | None = None, memory: ProcessMemory | None = None,
    on_epoch: EpochCallback | None = None, train: StageTrainer = train_stage,
) -> StageOutcome:
    """Get (or train) only the teacher stage, e.g. once before a sweep launches its trials; with `memory`,
    the teacher's module is kept there for the runs that follow in this process. `on_epoch`: as `run_tas`'s,
    for the teacher's epochs trained here."""
    device = resolve_device(cfg.train.device)
    data = load_dataset(cfg.dataset, cfg.seed)
    common = dict(data=data, image_resolution=cfg.teacher.resolution, train=cfg.train, seed=cfg.seed,
                  device=device, on_epoch=on_epoch, progress=progress, memory=memory)
    run = _Run(cfg, data, provider, stage_keys(cfg, data.fingerprint, _trainer_identity(train)), {}, memory, common,
               train)
    return _teacher_stage(run)[1]
