"""One stage of the TAS chain: a training loop with distillation, best epoch chosen on `val_top1`.

The loop is shared by all three stages: the teacher trains with cross-entropy at its resolution; the
assistant and the student are distilled from their upstream model. The upstream model always sees the
teacher-resolution view; the model being trained sees the same crop at its own resolution
(`pxd.data.views.TwoViewSampler`).
"""

from __future__ import annotations

import functools
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from pxd.config import DistillConfig, TrainConfig
from pxd.data import TwoViewSampler, iterate_batches
from pxd.errors import DivergedError
from pxd.losses import Distiller
from pxd.models import ModelTaps, forward_taps, tap_info
from pxd.types import DatasetSplits, ImageSet

__all__ = [
    "StageResult",
    "EpochCallback",
    "CpuThreads",
    "Checkpointing",
    "DEFAULT_CHECKPOINT_INTERVAL_S",
    "TRAINING_STATE_VERSION",
    "train_stage",
    "train_step",
    "upstream_forward",
    "evaluate",
    "resolve_device",
    "autocast_dtype",
]

# on_epoch(stage kind, epoch number from 1, metrics of that epoch)
EpochCallback = Callable[[str, int, dict[str, float]], None]
# cpu_threads() → the CPU threads the stage may use from now on; asked before every step (a sweep lends the
# CPUs of its idle trial slots to the trials still running: `orchestrator.driver.lending`). Keep it cheap.
CpuThreads = Callable[[], int]

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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(name)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (no loss scaling needed), full precision on CPU."""
    return torch.bfloat16 if device.type == "cuda" else None


def _place_data(images: ImageSet, device: torch.device, budget_bytes: int) -> ImageSet:
    """Keep decoded uint8 images on the training device when they fit, so batches never cross PCIe."""
    if device.type == "cpu" or images.images.numel() > budget_bytes:
        return images
    return ImageSet(images.images.to(device), images.labels.to(device))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: ImageSet,
    *,
    resolution: int,
    image_resolution: int,
    eval_crop: float,
    batch_size: int,
    device: torch.device,
    channels_last: bool = False,
) -> float:
    """Top-1 accuracy with the evaluation view (resize + center crop) at `resolution`."""
    was_training = model.training
    model.eval()
    sampler = TwoViewSampler(image_resolution, resolution, train=False, eval_crop=eval_crop)
    correct, total = 0, 0
    amp = autocast_dtype(device)
    for images, labels in iterate_batches(split, batch_size, shuffle=False, generator=None, device=device):
        _, view = sampler(images)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(_to_memory_format(view, device, channels_last))
        correct += int((logits.argmax(dim=1) == labels.to(device)).sum())
        total += int(labels.shape[0])
    model.train(was_training)
    return correct / max(total, 1)


def _to_memory_format(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """`x` in channels_last on CUDA when asked (`train.channels_last`), else as it is."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and device.type == "cuda" else x


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
) -> StageResult:
    """Train `model` at `resolution` for `epochs`, distilling from `teacher` when given.

    `image_resolution` is the teacher-side view (the highest resolution in the chain); the teacher, when
    given, sees that view and `model` sees the same crop resized to `resolution`. Returns the weights of
    the epoch with the best `val_top1` on the validation split (never a test split).

    With `checkpointing`, the stage saves its whole training state at epoch boundaries and/or resumes
    from one (see `Checkpointing`); on_epoch is called for the epochs trained here only. With
    `cpu_threads`, torch's intra-op threads follow its answer step by step; the stage gives the caller's
    thread count back when it ends, and records the time-weighted mean as `train_threads`.
    """
    with _ThreadUse(cpu_threads) as threads:
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model.to(device)
        channels_last = train.channels_last and device.type == "cuda"
        if channels_last:
            model.to(memory_format=torch.channels_last)
        distiller = _make_distiller(model, teacher, distill, resolution, image_resolution, device)
        upstream = None
        if teacher is not None:
            teacher.to(device).eval()
            if channels_last:
                teacher.to(memory_format=torch.channels_last)
            for param in teacher.parameters():
                param.requires_grad_(False)
            upstream = upstream_forward(teacher, compiled=train.compile_upstream)

        train_split = _place_data(data.train, device, train.max_device_data_bytes)
        val_split = _place_data(data.val, device, train.max_device_data_bytes)
        sampler = TwoViewSampler(image_resolution, resolution, train=True)
        steps_per_epoch = max(1, len(train_split) // train.batch_size)
        params = [p for p in model.parameters() if p.requires_grad] + distiller.student_side_parameters()
        optimizer = _optimizer(params, train)
        scheduler = _cosine_with_warmup(optimizer, steps_per_epoch * epochs)

        checkpointing = checkpointing or Checkpointing()
        best_top1, best_epoch, best_state = -1.0, 0, None
        history: list[dict[str, float]] = []
        first_epoch, seconds_before = 1, 0.0
        if checkpointing.resume_from is not None:
            state = checkpointing.resume_from
            _check_resumable(kind, state, epochs)
            model.load_state_dict(state["model"])
            distiller.load_state_dict(state["distiller"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            _set_rng_states(state["rng"], generator, device)
            best_top1, best_epoch, best_state = state["best_top1"], state["best_epoch"], state["best_state"]
            history = [dict(record) for record in state["history"]]
            first_epoch, seconds_before = state["epoch"] + 1, state["train_seconds"]

        bar = _progress_bar(kind, steps_per_epoch * epochs, progress, done=steps_per_epoch * (first_epoch - 1))
        started = last_saved = time.perf_counter()
        for epoch in range(first_epoch, epochs + 1):
            model.train()
            distiller.train()
            epoch_start = time.perf_counter()
            sums: dict[str, float] = {}
            steps = 0
            for images, labels in iterate_batches(train_split, train.batch_size, shuffle=True, generator=generator, device=device):
                threads.update()
                teacher_view, student_view = sampler(images, generator)
                loss, losses = train_step(
                    model, teacher, distiller, optimizer, teacher_view, student_view, labels.to(device), device=device,
                    channels_last=channels_last, upstream=upstream,
                    check=lambda terms: _check_finite(kind, epoch, steps, terms),  # noqa: B023 - called at once
                )
                scheduler.step()
                for name, value in distiller.critic_step().items():  # terms with their own optimiser
                    sums[name] = sums.get(name, 0.0) + value
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + float(value.detach())
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                steps += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{float(loss.detach()):.3f}", best=f"{max(best_top1, 0):.3f}")
            val_top1 = evaluate(
                model, val_split, resolution=resolution, image_resolution=image_resolution,
                eval_crop=data.eval_crop, batch_size=train.batch_size * 2, device=device, channels_last=channels_last,
            )
            record = {f"train_{name}": total / max(steps, 1) for name, total in sums.items()}
            record.update(val_top1=val_top1, epoch=float(epoch), epoch_seconds=time.perf_counter() - epoch_start)
            history.append(record)
            if val_top1 > best_top1:
                best_top1, best_epoch = val_top1, epoch
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            due = time.perf_counter() - last_saved >= checkpointing.interval_s
            if checkpointing.save is not None and epoch < epochs and due:
                checkpointing.save({
                    "version": TRAINING_STATE_VERSION, "kind": kind, "epoch": epoch, "epochs": epochs,
                    "model": model.state_dict(), "distiller": distiller.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": _rng_states(generator, device),
                    "best_top1": best_top1, "best_epoch": best_epoch, "best_state": best_state,
                    "history": history, "train_seconds": seconds_before + time.perf_counter() - started,
                })
                last_saved = time.perf_counter()
            if on_epoch is not None:
                on_epoch(kind, epoch, dict(record))
        if bar is not None:
            bar.close()
        model.load_state_dict(best_state)
        metrics = {
            "val_top1": best_top1,
            "best_epoch": float(best_epoch),
            "epochs": float(epochs),
            "train_seconds": seconds_before + time.perf_counter() - started,
            "train_threads": threads.mean(),  # CPU threads it trained with, time-weighted (for cost accounting)
        }
        return StageResult(kind=kind, state_dict=best_state, metrics=metrics, history=history,
                           warnings=list(distiller.warnings))


class _ThreadUse:
    """torch's intra-op threads through one stage: follows `cpu_threads` (when given), counts
    thread-seconds, and restores the count it found when closed, so that what runs after the stage (latency
    timing) never sees lent threads. A thread count changes float summation order, so a stage that ran on
    lent threads can differ from a run on one thread in the last digits."""

    def __init__(self, cpu_threads: CpuThreads | None) -> None:
        self.source = cpu_threads
        self.found = self.threads = torch.get_num_threads()
        self.started = self.since = time.perf_counter()
        self.thread_seconds = 0.0

    def update(self) -> None:
        if self.source is None:
            return
        wanted = max(1, int(self.source()))
        if wanted != self.threads:
            now = time.perf_counter()
            self.thread_seconds += (now - self.since) * self.threads
            self.since = now
            torch.set_num_threads(wanted)
            self.threads = wanted

    def mean(self) -> float:
        """Time-weighted mean of the threads used so far."""
        now = time.perf_counter()
        elapsed = now - self.started
        return (self.thread_seconds + (now - self.since) * self.threads) / elapsed if elapsed > 0 else float(self.threads)

    def __enter__(self) -> _ThreadUse:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.threads != self.found:
            torch.set_num_threads(self.found)
            self.threads = self.found


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
                teacher_taps = (upstream or upstream_forward(teacher))(_to_memory_format(teacher_view, device,
                                                                                          channels_last))
        taps = forward_taps(model, _to_memory_format(student_view, device, channels_last))
        losses = distiller(taps, teacher_taps, labels, teacher_view)
    loss = sum(losses.values())
    if check is not None:
        check(losses)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, losses


_COMPILED_TAPS: Callable[[nn.Module, torch.Tensor], ModelTaps] | None = None


def upstream_forward(teacher: nn.Module, *, compiled: bool = False) -> Callable[[torch.Tensor], ModelTaps]:
    """The frozen upstream model's taps for distillation, `forward_taps(teacher, x)`; with `compiled`, through
    `torch.compile`. One compiled function per process, taking the module as an argument: it compiles at its
    first call, again when a stage's last batch is smaller (after which the batch size is dynamic), and for
    each other architecture, input size or device it meets. Past `torch._dynamo.config.recompile_limit`
    compilations (8 by default: a process that meets about four upstream architectures) torch runs the
    forward uncompiled, with a warning."""
    global _COMPILED_TAPS
    if not compiled:
        return functools.partial(forward_taps, teacher)
    if _COMPILED_TAPS is None:
        _COMPILED_TAPS = torch.compile(forward_taps)
    return functools.partial(_COMPILED_TAPS, teacher)


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
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=f"{kind:>9}", unit="step", leave=True, dynamic_ncols=True)


def _rng_states(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Every random stream training draws from: the data order and augmentation (`generator`), dropout
    and other layers (torch's global CPU and CUDA streams), and numpy's and Python's global streams.
    Plain types and tensors only, so the state loads with `torch.load(weights_only=True)`."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_key = numpy_state["state"]["key"].tolist()
    return {
        "data": generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {**numpy_state, "state": {"key": numpy_key, "pos": numpy_state["state"]["pos"]}},
        "python": random.getstate(),
    }


def _set_rng_states(states: dict[str, Any], generator: torch.Generator, device: torch.device) -> None:
    generator.set_state(states["data"])
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"], device)
    numpy_state = states["numpy"]
    np.random.set_state({**numpy_state, "state": {"key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32),
                                                 "pos": numpy_state["state"]["pos"]}})
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def _check_resumable(kind: str, state: dict[str, Any], epochs: int) -> None:
    """A saved state must come from this stage's own training (the store finds it by stage key)."""
    if state.get("version") != TRAINING_STATE_VERSION or state.get("kind") != kind or state.get("epochs") != epochs:
        raise ValueError(
            f"cannot resume the {kind} stage ({epochs} epochs) from a training state of a "
            f"{state.get('kind')} stage ({state.get('epochs')} epochs, layout version {state.get('version')})"
        )
    if not 1 <= state["epoch"] < epochs:
        raise ValueError(f"cannot resume the {kind} stage after epoch {state['epoch']} of {epochs}")
