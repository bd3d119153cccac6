"""The teacher → assistant → student (TAS) pipeline of Pixel Distillation (Guo et al., TPAMI 2024).

Stage 0, teacher: `teacher.arch` at `teacher.resolution` (trained with cross-entropy, or loaded).
Stage 1, model compression: the assistant is the student's architecture at the teacher's resolution,
distilled from the teacher. Stage 2, input compression: the student at `student.resolution`, distilled
from the assistant. With `assistant.enabled: false` the student is distilled from the teacher directly
(one-stage pixel distillation), for comparison.

Each stage is identified by a content-addressed `stage key` (`stage_keys`), and obtained through a
`StageProvider`, so a sweep can share stages between trials (`orchestrator.stages.store`); the default
provider simply trains.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from pxd.config import DistillConfig, ModelConfig, PipelineConfig, TrainConfig
from pxd.cost import Cost, LatencyCache, measure_cost, static_cost
from pxd.data import load_dataset
from pxd.losses import stage_loss_weights
from pxd.memo import remember
from pxd.metrics import metrics_before_training, metrics_from_cost
from pxd.models import create_model
from pxd.train import (
    Checkpointing, CpuThreads, EpochCallback, StageResult, autocast_dtype, evaluate, resolve_device, train_stage,
)
from pxd.types import DatasetSplits

logger = logging.getLogger(__name__)

__all__ = [
    "STAGE_KEY_VERSION",
    "ASSISTANT_GAP_WARNING",
    "StageProvider",
    "ResumableTraining",
    "TrainingProvider",
    "StageOutcome",
    "PipelineResult",
    "stage_keys",
    "stage_identities",
    "run_tas",
    "LatencySettings",
    "prepare_teacher",
    "init_from",
    "TIMED_SECTIONS",
]

# Bump when a change to the training code would change what a stage produces, so stores miss.
STAGE_KEY_VERSION = 2

# An assistant this far (absolute val_top1) below its teacher did not learn what it should pass on.
ASSISTANT_GAP_WARNING = 0.10

# What `run_tas` spends outside training, by section (`PipelineResult.timings`, seconds): loading the
# data, creating models and counting their cost before training, getting stages from the provider beyond
# training them (lookup, download, upload, waiting for another trial's stage), timing latency, and
# evaluating on the test split. "training" is the training time of the stages this run trained.
TIMED_SECTIONS = ("data", "models", "stages", "latency", "test", "training")


@dataclass
class StageOutcome:
    result: StageResult
    key: str
    reused: bool
    ref: str | None = None  # where the provider keeps it (e.g. an MLflow run id)


@dataclass(frozen=True)
class ResumableTraining:
    """A stage's training that can save its progress and resume from it.

    Called with no argument it trains from epoch 0 without checkpoints, like any `train` callable; a
    provider that keeps incomplete stages passes a `pxd.train.Checkpointing` instead.
    """

    run: Callable[[Checkpointing | None], StageResult]

    def __call__(self, checkpointing: Checkpointing | None = None) -> StageResult:
        return self.run(checkpointing)


class StageProvider(Protocol):
    """Gets a stage by key, training it with `train` only when it is not already available.

    `train` is a zero-argument callable, or a `ResumableTraining` the provider may call with a
    `Checkpointing` (the pipeline always passes one).
    """

    def get_or_train(self, kind: str, key: str, describe: dict[str, Any], train: Callable[[], StageResult]) -> StageOutcome: ...


class TrainingProvider:
    """The default provider: always trains (no cache, no checkpoints)."""

    def get_or_train(self, kind: str, key: str, describe: dict[str, Any], train: Callable[[], StageResult]) -> StageOutcome:
        return StageOutcome(result=train(), key=key, reused=False)


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


def _digest(payload: dict[str, Any]) -> str:
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _model_identity(model: ModelConfig, resolution: int) -> dict[str, Any]:
    identity = dataclasses.asdict(model)
    identity.pop("epochs", None)
    identity["resolution"] = resolution
    if model.checkpoint:
        # the weights' content matters, not where the file lives
        identity["checkpoint"] = hashlib.sha256(Path(model.checkpoint).expanduser().read_bytes()).hexdigest()
    return identity


def _optimiser_identity(train: TrainConfig) -> dict[str, Any]:
    identity = dataclasses.asdict(train)
    # speed, or set per stage
    for not_a_result in ("epochs", "device", "max_device_data_bytes", "channels_last", "compile_upstream"):
        identity.pop(not_a_result)
    return identity


def stage_identities(cfg: PipelineConfig) -> dict[str, dict[str, Any]]:
    """What determines each stage's result (the dataset aside), and nothing else: the content of
    `stage_keys`. The teacher's entry depends only on the teacher's own settings (`teacher`,
    `cfg.teacher_train`), the assistant's on its own settings (`cfg.assistant_train`,
    `cfg.assistant_distill`) and the teacher.

    Not included: the run name, trial ids, device and data placement (they change speed, not the
    result the stage stands for).
    """
    common = {"version": STAGE_KEY_VERSION, "seed": cfg.seed, "eval_crop": cfg.dataset.eval_crop}
    identities = {"teacher": {**common, "kind": "teacher", "epochs": cfg.teacher.epochs,
                              "train": _optimiser_identity(cfg.teacher_train),
                              "model": _model_identity(cfg.teacher, cfg.teacher.resolution)}}
    upstream = "teacher"
    if cfg.assistant.enabled:
        # exactly the assistant's active loss terms (pxd.losses.terms): isrd, which needs a lower
        # resolution than the teacher's, never splits assistants that are otherwise the same
        identities["assistant"] = {**common, "kind": "assistant", "epochs": cfg.assistant_epochs,
                                   "train": _optimiser_identity(cfg.assistant_train),
                                   "model": _model_identity(cfg.student, cfg.teacher.resolution),
                                   "distill": _stage_distill(cfg.assistant_distill, cfg, cfg.teacher.resolution),
                                   "upstream": upstream}
        upstream = "assistant"
    identities["student"] = {**common, "kind": "student", "epochs": cfg.student_epochs,
                             "train": _optimiser_identity(cfg.train),
                             "init_from_upstream": cfg.assistant.enabled and cfg.assistant.init_student,
                             "model": _model_identity(cfg.student, cfg.student.resolution),
                             "distill": _stage_distill(cfg.distill, cfg, cfg.student.resolution),
                             "upstream": upstream}
    return identities


def stage_keys(cfg: PipelineConfig, dataset_fingerprint: str) -> dict[str, str]:
    """Content-addressed keys: `stage_identities` plus the dataset, each chained to its upstream key."""
    keys: dict[str, str] = {}
    for kind, identity in stage_identities(cfg).items():
        upstream = identity.get("upstream")
        keys[kind] = _digest({**identity, "dataset": dataset_fingerprint,
                              "upstream": keys[upstream] if upstream else None})
    return keys


def _stage_distill(distill: DistillConfig, cfg: PipelineConfig, resolution: int) -> dict[str, float]:
    return stage_loss_weights(distill, distilling=True, student_resolution=resolution,
                              teacher_resolution=cfg.teacher.resolution)


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
    keep_in_process: bool = True,
    cpu_threads: CpuThreads | None = None,
) -> PipelineResult:
    """Run the whole chain and measure the student's cost. Raises `DivergedError` on a NaN loss.

    Latency is measured on `latency.device` (default: the training device); `measure_latency=False`
    times one pass only (tests). `before_training` gets the student's metrics known before training
    (`gmacs`, `params_m`, `pixels`) before any stage trains, and may raise to stop the run there
    (a sweep refuses a trial that breaks a hard budget this way). `keep_in_process` keeps, for the next
    run in this process, the teacher and assistant modules (`_KEPT_UPSTREAM`) and the student's cost known
    before training (`_STATIC_COSTS`); False builds and counts everything again (to measure what keeping
    saves, bench/overhead.py). `cpu_threads` reaches every stage this run trains (`pxd.train.train_stage`).
    """
    timings = {section: 0.0 for section in TIMED_SECTIONS}
    provider = _TimedProvider(provider or TrainingProvider(), timings)
    device = resolve_device(cfg.train.device)
    with _timed(timings, "data"):
        data = data or load_dataset(cfg.dataset, cfg.seed)
    keys = stage_keys(cfg, data.fingerprint)
    num_classes = data.num_classes
    with _timed(timings, "models"):
        # trained in stage 2 below: counting does not change it (eval mode, no grad), and training seeds itself
        student = _new_model(cfg.student, num_classes, "student", cfg.seed)
        # counted once: the budget check and the result
        static = _static_cost(cfg.student, num_classes, student, keep_in_process)
    if before_training is not None:
        before_training(metrics_before_training(static))
    high = cfg.teacher.resolution
    common = dict(data=data, image_resolution=high, train=cfg.train, seed=cfg.seed, device=device,
                  on_epoch=on_epoch, progress=progress, cpu_threads=cpu_threads)
    outcomes: dict[str, StageOutcome] = {}

    # Stage 0: teacher
    teacher, outcomes["teacher"] = _teacher_stage(cfg, data, provider, keys["teacher"], device, common, timings,
                                                  keep_in_process)
    upstream = teacher

    # Stage 1: model compression (assistant = student architecture at the teacher's resolution)
    if cfg.assistant.enabled:
        upstream, outcomes["assistant"] = _upstream_stage(
            "assistant", keys["assistant"], _describe(cfg, "assistant"), provider, timings, keep_in_process,
            build=lambda: _new_model(dataclasses.replace(cfg.student, resolution=high), num_classes, "student", cfg.seed),
            train=lambda assistant, checkpointing: train_stage(
                "assistant", assistant, resolution=high, teacher=teacher, distill=cfg.assistant_distill,
                epochs=cfg.assistant_epochs, checkpointing=checkpointing, **{**common, "train": cfg.assistant_train}),
        )

    # Stage 2: input compression (student at low resolution, distilled from its upstream)
    if cfg.assistant.enabled and cfg.assistant.init_student:
        with _timed(timings, "models"):
            init_from(upstream.state_dict(), student)
    outcomes["student"] = provider.get_or_train(
        "student", keys["student"], _describe(cfg, "student"),
        ResumableTraining(lambda checkpointing: train_stage(
            "student", student, resolution=cfg.student.resolution, teacher=upstream, distill=cfg.distill,
            epochs=cfg.student_epochs, checkpointing=checkpointing, **common)),
    )
    student.load_state_dict(outcomes["student"].result.state_dict)

    latency = latency or LatencySettings()
    timing_device = resolve_device(latency.device) if latency.device else device
    with _timed(timings, "latency"):
        if latency.before_timing is not None:
            latency.before_timing()
        cost = measure_cost(
            student, cfg.student.resolution, device=str(timing_device),
            dtype=autocast_dtype(timing_device) or torch.float32,
            repeats=latency.repeats if measure_latency else 1, warmup=latency.warmup if measure_latency else 0,
            cache=latency.cache, architecture=_architecture(cfg.student, num_classes), static=static,
        )
    metrics = metrics_from_cost(cost, outcomes["student"].result.metrics)
    for kind, outcome in outcomes.items():
        metrics[f"{kind}_val_top1"] = outcome.result.metrics["val_top1"]
    if data.test is not None:
        with _timed(timings, "test"):
            metrics["test_top1"] = _test_top1(cfg, data, student, device)
    warnings = _pipeline_warnings(outcomes)
    if device.type != "cpu":  # modules kept for the next run (`_KEPT_UPSTREAM`) hold no device memory between runs
        for module in (teacher, upstream):
            module.cpu()
    return PipelineResult(config=cfg, metrics=metrics, stages=outcomes, student=student.cpu(), cost=cost.to_dict(),
                          warnings=warnings, timings=timings)


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


def _teacher_stage(
    cfg: PipelineConfig, data: DatasetSplits, provider: StageProvider, key: str, device: torch.device,
    common: dict[str, Any], timings: dict[str, float] | None = None, keep_in_process: bool = True,
) -> tuple[nn.Module, StageOutcome]:
    high = cfg.teacher.resolution

    def train_teacher(teacher: nn.Module, checkpointing: Checkpointing | None) -> StageResult:
        if cfg.teacher.epochs == 0:  # a loaded checkpoint / pretrained teacher, used as is
            top1 = evaluate(teacher.to(device), data.val, resolution=high, image_resolution=high,
                            eval_crop=data.eval_crop, batch_size=cfg.teacher_train.batch_size, device=device)
            state = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}
            return StageResult("teacher", state, {"val_top1": top1, "epochs": 0.0, "train_seconds": 0.0})
        # the teacher trains with its own optimiser settings (`teacher.train` over `train`)
        return train_stage("teacher", teacher, resolution=high, teacher=None, distill=None, epochs=cfg.teacher.epochs,
                           checkpointing=checkpointing, **{**common, "train": cfg.teacher_train})

    return _upstream_stage("teacher", key, _describe(cfg, "teacher"), provider, timings if timings is not None else {},
                           keep_in_process, build=lambda: _new_model(cfg.teacher, data.num_classes, "teacher", cfg.seed),
                           train=train_teacher)


# (stage kind, stage key) → (the StageResult a module was loaded from, that module), kept by this process:
# a worker process that runs trial after trial (a sweep's `search.reuse_actors`) builds its teacher and
# assistant once, not once per trial. A kept module is used only when the provider hands out that same
# result object again (a store's verified in-memory copy, e.g. `orchestrator.stages.store`), so its weights
# are exactly the stage's. Upstream modules are only read (eval mode, no gradients) by the stages that
# distil from them; a stage that trains always builds a new module. Between runs they sit on the CPU; the
# least recently used goes first. A module a CUDA run put in channels_last stays so (`train.channels_last`
# changes speed, not values, and is the same for every trial of a sweep).
_KEPT_UPSTREAM: dict[tuple[str, str], tuple[StageResult, nn.Module]] = {}
_KEPT_UPSTREAM_MAX = 4


def _upstream_stage(
    kind: str, key: str, describe: dict[str, Any], provider: StageProvider, timings: dict[str, float],
    keep_in_process: bool, *, build: Callable[[], nn.Module], train: Callable[[nn.Module, Checkpointing | None], StageResult],
) -> tuple[nn.Module, StageOutcome]:
    """The teacher or assistant stage, got or trained through `provider`, as a module holding its weights."""
    kept = _KEPT_UPSTREAM.get((kind, key)) if keep_in_process else None
    model: nn.Module | None = None
    if kept is None:  # likely to be needed: build it outside the stage's time, as its own section
        with _timed(timings, "models"):
            model = build()

    def train_stage_model(checkpointing: Checkpointing | None) -> StageResult:
        nonlocal model
        if model is None:
            model = build()
        return train(model, checkpointing)

    outcome = provider.get_or_train(kind, key, describe, ResumableTraining(train_stage_model))
    if kept is not None and kept[0] is outcome.result:
        return remember(_KEPT_UPSTREAM, (kind, key), kept, _KEPT_UPSTREAM_MAX)[1], outcome  # now the newest
    with _timed(timings, "models"):
        if model is None:
            model = build()
        model.load_state_dict(outcome.result.state_dict)
    if keep_in_process:  # the least recently used goes
        remember(_KEPT_UPSTREAM, (kind, key), (outcome.result, model), _KEPT_UPSTREAM_MAX)
    return model, outcome


# (architecture, input side) → the cost known before training (`pxd.cost.static_cost`), kept by this process
_STATIC_COSTS: dict[str, Cost] = {}
_STATIC_COSTS_MAX = 256


def _static_cost(model_cfg: ModelConfig, num_classes: int, model: nn.Module, keep: bool = True) -> Cost:
    """`static_cost(model, model_cfg.resolution)`, counted once per architecture and input in a process (with
    `keep`): it depends on the architecture alone, never on the weights."""
    if not keep:
        return static_cost(model, model_cfg.resolution)
    key = _digest(_architecture(model_cfg, num_classes))
    kept = _STATIC_COSTS.get(key) or remember(_STATIC_COSTS, key, static_cost(model, model_cfg.resolution),
                                              _STATIC_COSTS_MAX)
    return dataclasses.replace(kept, threads=torch.get_num_threads())


def prepare_teacher(cfg: PipelineConfig, *, provider: StageProvider, progress: bool | None = None) -> StageOutcome:
    """Get (or train) only the teacher stage, e.g. once before a sweep launches its trials."""
    device = resolve_device(cfg.train.device)
    data = load_dataset(cfg.dataset, cfg.seed)
    key = stage_keys(cfg, data.fingerprint)["teacher"]
    common = dict(data=data, image_resolution=cfg.teacher.resolution, train=cfg.train, seed=cfg.seed,
                  device=device, on_epoch=None, progress=progress)
    return _teacher_stage(cfg, data, provider, key, device, common)[1]


def _describe(cfg: PipelineConfig, kind: str) -> dict[str, Any]:
    """Human-readable parameters recorded next to a stored stage."""
    model = cfg.teacher if kind == "teacher" else cfg.student
    resolution = cfg.student.resolution if kind == "student" else cfg.teacher.resolution
    return {"stage": kind, "arch": model.arch, "resolution": resolution, "seed": cfg.seed,
            "dataset": cfg.dataset.kind}


def init_from(source: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    """Copy weights from the same architecture built for another input size; returns the names copied.

    Tensors whose shape depends on the input size (a ViT's position embedding and, when the patch size
    differs, its patch projection) are resampled with timm's own helpers; anything else that does not
    match is left as initialised.
    """
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    target = model.state_dict()
    copied: dict[str, torch.Tensor] = {}
    for name, value in source.items():
        if name not in target:
            continue
        wanted = target[name].shape
        if value.shape == wanted:
            copied[name] = value
        elif name.endswith("pos_embed") and value.ndim == 3 and hasattr(model, "patch_embed"):
            copied[name] = resample_abs_pos_embed(
                value, new_size=list(model.patch_embed.grid_size),
                num_prefix_tokens=getattr(model, "num_prefix_tokens", 1),
            )
        elif name.endswith("patch_embed.proj.weight") and value.ndim == 4 and value.shape[:2] == wanted[:2]:
            copied[name] = resample_patch_embed(value, new_size=list(wanted[-2:]))
    model.load_state_dict(copied, strict=False)
    return sorted(copied)
