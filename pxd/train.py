"""One stage of the TAS chain: a training loop with distillation, best epoch chosen on `val_top1`.

The loop is shared by all three stages: the teacher trains with cross-entropy at its resolution; the
assistant and the student are distilled from their upstream model. The upstream model always sees the
teacher-resolution view; the model being trained sees the same crop at its own resolution
(`pxd.data.views.TwoViewSampler`).
"""

from __future__ import annotations

import functools
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from pxd.data import TwoViewSampler, iterate_batches
from pxd.device import autocast_dtype, place_data, resolve_device, to_memory_format
from pxd.errors import DivergedError
from pxd.evaluate import evaluate
from pxd.losses.distiller import Distiller
from pxd.memo import ProcessMemory
from pxd.models import ModelTaps, forward_taps, tap_info
from pxd.rng import rng_states, set_rng_states
from pxd.sections import DistillConfig, TrainConfig
from pxd.threads import CpuThreads, ThreadUse
from pxd.types import DatasetSplits

__all__ = [
    "StageResult",
    "EpochCallback",
    "StageTrainer",
    "CpuThreads",
    "Checkpointing",
    "DEFAULT_CHECKPOINT_INTERVAL_S",
    "TRAINING_STATE_VERSION",
    "train_stage",
    "train_step",
    "upstream_forward",
    "resolve_device",
    "autocast_dtype",
]

# on_epoch(stage kind, epoch number from 1, metrics of that epoch)
EpochCallback = Callable[[str, int, dict[str, float]], None]
# what trains one stage: `train_stage`, or a stand-in called the same way (`pxd.simulated.SimulatedTraining`)
StageTrainer = Callable[..., "StageResult"]

DEFAULT_CHECKPOINT_INTERVAL_S = 300.0
# Bump when the layout of a training state (`Checkpointing.save`'s argument) changes: older ones are not resumed.
TRAINING_STATE_VERSION = 1


@dataclass(frozen=True)
class Checkpointing:
    """How a stage saves its progress and resumes from it; the store behind `save` is the caller's.

    `save(state)` is called at an epoch boundary once `interval_s` seconds have passed since the stage
    started or last saved (0: every epoch), never after the last epoch; `state` holds live tensors, so
    `save` must serialise it before it returns. `resume_from` is such a state: training continues after
    its epoch and ends with the same weights and history as an uninterrupted run with the same seed;
    resuming consumes it (the optimiser takes over its tensors), so load a fresh one for each resume.
    """

    save: Callable[[dict[str, Any]], None] | None = None
    resume_from: dict[str, Any] | None = None
    interval_s: float = DEFAULT_CHECKPOINT_INTERVAL_S


@dataclass
class StageResult:
    kind: str  # "teacher" | "assistant" | "student"
    state_dict: dict[str, torch.Tensor]  # the best epoch's weights, on CPU
    metrics: dict[str, float]  # val_top1 (best epoch), best_epoch, epochs, train_seconds
    history: list[dict[str, float]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # e.g. a distillation stage skipped on a 1×1 map


def _optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


def _cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, min(total_steps // 10, 200))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_stage(
    kind: str,
    model: nn.Module,
    data: DatasetSplits,
    *,
    resolution: int,
    image_resolution: int,
    teacher: nn.Module | None,
    distill: DistillConfig | None,
    train: TrainConfig,
    epochs: int,
    seed: int,
    device: torch.device,
    on_epoch: EpochCallback | None = None,
    progress: bool | None = None,
    checkpointing: Checkpointing | None = None,
    cpu_threads: CpuThreads | None = None,
    memory: ProcessMemory | None = None,
) -> StageResult:
    """Train `model` at `resolution` for `epochs`, distilling from `teacher` when given.

    `image_resolution` is the teacher-side view (the highest resolution in the chain); the teacher, when
    given, sees that view and `model` sees the same crop resized to `resolution`. Returns the weights of
    the epoch with the best `val_top1` on the validation split (never a test split).

    With `checkpointing`, the stage saves its whole training state at epoch boundaries and/or resumes
    from one (see `Checkpointing`); on_epoch is called for the epochs trained here only. With
    `cpu_threads`, torch's intra-op threads follow its answer step by step; the stage gives the caller's
    thread count back when it ends, and records the time-weighted mean as `train_threads`. `memory`: the
    process's, where a compiled upstream forward is kept (`upstream_forward`).
    """
    with ThreadUse(cpu_threads) as threads:
        run = _StageRun(kind, model, data, resolution=resolution, image_resolution=image_resolution,
                        teacher=teacher, distill=distill, train=train, epochs=epochs, seed=seed, device=device,
                        memory=memory)
        checkpointing = checkpointing or Checkpointing()
        if checkpointing.resume_from is not None:
            run.resume(checkpointing.resume_from, epochs)
        steps = run.steps_per_epoch
        bar = _progress_bar(kind, steps * epochs, progress, done=steps * (run.first_epoch - 1))
        started = last_saved = time.perf_counter()
        for epoch in range(run.first_epoch, epochs + 1):
            record = run.train_epoch(epoch, threads, bar)
            due = time.perf_counter() - last_saved >= checkpointing.interval_s
            if checkpointing.save is not None and epoch < epochs and due:
                checkpointing.save(run.training_state(epoch, epochs, run.seconds_before + time.perf_counter() - started))
                last_saved = time.perf_counter()
            if on_epoch is not None:
                on_epoch(kind, epoch, dict(record))
        if bar is not None:
            bar.close()
        model.load_state_dict(run.best_state)
        metrics = {
            "val_top1": run.best_top1,
            "best_epoch": float(run.best_epoch),
            "epochs": float(epochs),
            "train_seconds": run.seconds_before + time.perf_counter() - started,
            "train_threads": threads.mean(),  # CPU threads it trained with, time-weighted (for cost accounting)
        }
        return StageResult(kind=kind, state_dict=run.best_state, metrics=metrics, history=run.history,
                           warnings=list(run.distiller.warnings))


class _StageRun:
    """What one stage's training holds from its first step to its last: the model and its distiller, the
    optimiser and schedule, the data order's generator, the history and the best epoch so far."""

    def __init__(
        self, kind: str, model: nn.Module, data: DatasetSplits, *, resolution: int, image_resolution: int,
        teacher: nn.Module | None, distill: DistillConfig | None, train: TrainConfig, epochs: int, seed: int,
        device: torch.device, memory: ProcessMemory | None,
    ) -> None:
        self.kind, self.model, self.teacher, self.train, self.device = kind, model, teacher, train, device
        self.resolution, self.image_resolution, self.eval_crop = resolution, image_resolution, data.eval_crop
        torch.manual_seed(seed)
        self.generator = torch.Generator().manual_seed(seed)
        model.to(device)
        self.channels_last = train.channels_last and device.type == "cuda"
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.distiller = _make_distiller(model, teacher, distill, resolution, image_resolution, device)
        self.upstream = None
        if teacher is not None:
            teacher.to(device).eval()
            if self.channels_last:
                teacher.to(memory_format=torch.channels_last)
            for param in teacher.parameters():
                param.requires_grad_(False)
            self.upstream = upstream_forward(teacher, compiled=train.compile_upstream, memory=memory)
        self.train_split = place_data(data.train, device, train.max_device_data_bytes)
        self.val_split = place_data(data.val, device, train.max_device_data_bytes)
        self.sampler = TwoViewSampler(image_resolution, resolution, train=True)
        self.steps_per_epoch = max(1, len(self.train_split) // train.batch_size)
        params = [p for p in model.parameters() if p.requires_grad] + self.distiller.student_side_parameters()
        self.optimizer = _optimizer(params, train)
        self.scheduler = _cosine_with_warmup(self.optimizer, self.steps_per_epoch * epochs)
        self.best_top1, self.best_epoch, self.best_state = -1.0, 0, None
        self.history: list[dict[str, float]] = []
        self.first_epoch, self.seconds_before = 1, 0.0

    def resume(self, state: dict[str, Any], epochs: int) -> None:
        _check_resumable(self.kind, state, epochs)
        self.model.load_state_dict(state["model"])
        self.distiller.load_state_dict(state["distiller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_states(state["rng"], self.generator, self.device)
        self.best_top1, self.best_epoch, self.best_state = state["best_top1"], state["best_epoch"], state["best_state"]
        self.history = [dict(record) for record in state["history"]]
        self.first_epoch, self.seconds_before = state["epoch"] + 1, state["train_seconds"]

    def training_state(self, epoch: int, epochs: int, train_seconds: float) -> dict[str, Any]:
        """Everything `resume` needs to continue after `epoch` (`Checkpointing.save`'s argument)."""
        return {
            "version": TRAINING_STATE_VERSION, "kind": self.kind, "epoch": epoch, "epochs": epochs,
            "model": self.model.state_dict(), "distiller": self.distiller.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": rng_states(self.generator, self.device),
            "best_top1": self.best_top1, "best_epoch": self.best_epoch, "best_state": self.best_state,
            "history": self.history, "train_seconds": train_seconds,
        }

    def train_epoch(self, epoch: int, threads: ThreadUse, bar: Any) -> dict[str, float]:
        """One epoch's steps, then its validation; its record (mean of every term) joins the history."""
        self.model.train()
        self.distiller.train()
        epoch_start = time.perf_counter()
        sums: dict[str, float] = {}
        steps = 0
        for images, labels in iterate_batches(self.train_split, self.train.batch_size, shuffle=True,
                                              generator=self.generator, device=self.device):
            threads.update()
            teacher_view, student_view = self.sampler(images, self.generator)
            loss, losses = train_step(
                self.model, self.teacher, self.distiller, self.optimizer, teacher_view, student_view,
                labels.to(self.device), device=self.device, channels_last=self.channels_last, upstream=self.upstream,
                check=lambda terms: _check_finite(self.kind, epoch, steps, terms),  # noqa: B023 - called at once
            )
            self.scheduler.step()
            for name, value in self.distiller.critic_step().items():  # terms with their own optimiser
                sums[name] = sums.get(name, 0.0) + value
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            steps += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{float(loss.detach()):.3f}", best=f"{max(self.best_top1, 0):.3f}")
        val_top1 = evaluate(
            self.model, self.val_split, resolution=self.resolution, image_resolution=self.image_resolution,
            eval_crop=self.eval_crop, batch_size=self.train.batch_size * 2, device=self.device,
            channels_last=self.channels_last,
        )
        record = {f"train_{name}": total / max(steps, 1) for name, total in sums.items()}
        record.update(val_top1=val_top1, epoch=float(epoch), epoch_seconds=time.perf_counter() - epoch_start)
        self.history.append(record)
        if val_top1 > self.best_top1:
            self.best_top1, self.best_epoch = val_top1, epoch
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        return record


def train_step(
    model: nn.Module,
    teacher: nn.Module | None,
    distiller: Distiller,
    optimizer: torch.optim.Optimizer,
    teacher_view: torch.Tensor,
    student_view: torch.Tensor,
    labels: torch.Tensor,
    *,
    device: torch.device,
    check: Callable[[dict[str, torch.Tensor]], None] | None = None,
    channels_last: bool = False,
    upstream: Callable[[torch.Tensor], ModelTaps] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimisation step of a stage (the body of `train_stage`'s loop; bench/training_step.py times it):
    the upstream model's taps on the teacher view, the model's on its own view, the distiller's weighted
    terms, backward and the optimiser's step. Returns the summed loss and the terms. `check(terms)` runs
    before backward and may raise (a diverged loss). `upstream`: the teacher's forward to use
    (`upstream_forward`, e.g. compiled); by default `forward_taps(teacher, ·)`.

    The upstream forward runs under no_grad, not inference_mode: loss terms (KD) save the teacher's
    outputs for the student's backward, which inference tensors cannot be.
    """
    amp = autocast_dtype(device)
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        teacher_taps = None
        if teacher is not None:
            with torch.no_grad():
                teacher_taps = (upstream or upstream_forward(teacher))(to_memory_format(teacher_view, device,
                                                                                         channels_last))
        taps = forward_taps(model, to_memory_format(student_view, device, channels_last))
        losses = distiller(taps, teacher_taps, labels, teacher_view)
    loss = sum(losses.values())
    if check is not None:
        check(losses)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, losses


def upstream_forward(
    teacher: nn.Module, *, compiled: bool = False, memory: ProcessMemory | None = None
) -> Callable[[torch.Tensor], ModelTaps]:
    """The frozen upstream model's taps for distillation, `forward_taps(teacher, x)`; with `compiled`, through
    `torch.compile`. One compiled function per `memory` (`ProcessMemory.compiled_taps`; without one, a new
    function per call), taking the module as an argument: it compiles at its first call, again when a
    stage's last batch is smaller (after which the batch size is dynamic), and for each other architecture,
    input size or device it meets. Past `torch._dynamo.config.recompile_limit` compilations (8 by default:
    a process that meets about four upstream architectures) torch runs the forward uncompiled, with a
    warning."""
    if not compiled:
        return functools.partial(forward_taps, teacher)
    if memory is None:
        return functools.partial(torch.compile(forward_taps), teacher)
    if memory.compiled_taps is None:
        memory.compiled_taps = torch.compile(forward_taps)
    return functools.partial(memory.compiled_taps, teacher)


def _make_distiller(
    model: nn.Module,
    teacher: nn.Module | None,
    distill: DistillConfig | None,
    resolution: int,
    image_resolution: int,
    device: torch.device,
) -> Distiller:
    """The stage's loss terms, from the table (`pxd.losses.stage_loss_weights`)."""
    return Distiller(
        distill if teacher is not None else None,
        student=tap_info(model, resolution),
        teacher=tap_info(teacher, image_resolution) if teacher is not None else None,
        student_resolution=resolution,
        teacher_resolution=image_resolution,
    ).to(device)


def _check_finite(kind: str, epoch: int, step: int, losses: dict[str, torch.Tensor]) -> None:
    for name, value in losses.items():
        if not torch.isfinite(value.detach()).all():
            raise DivergedError(
                f"{kind} stage diverged: loss term {name!r} is {float(value.detach())} at epoch {epoch}, step {step}; "
                f"lower train.lr or distill.{name}, no model was produced"
            )


def _progress_bar(kind: str, total: int, progress: bool | None, done: int = 0) -> Any:
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    return tqdm(total=total, initial=done, desc=f"{kind:>9}", unit="step", leave=True, dynamic_ncols=True)


def _check_resumable(kind: str, state: dict[str, Any], epochs: int) -> None:
    """A saved state must come from this stage's own training (the store finds it by stage key)."""
    if state.get("version") != TRAINING_STATE_VERSION or state.get("kind") != kind or state.get("epochs") != epochs:
        raise ValueError(
            f"cannot resume the {kind} stage ({epochs} epochs) from a training state of a "
            f"{state.get('kind')} stage ({state.get('epochs')} epochs, layout version {state.get('version')})"
        )
    if not 1 <= state["epoch"] < epochs:
        raise ValueError(f"cannot resume the {kind} stage after epoch {state['epoch']} of {epochs}")
