"""The cross-entropy control of a distilled student: did distillation pay here?

A control is the same student (architecture, input side, initial weights, data, optimiser, epochs and
seed) trained on the labels alone, with no teacher. Its key leaves out everything upstream (teacher,
assistant, distillation weights), so one control serves every distilled student of that architecture ×
side × schedule × seed: a provider that stores stages trains it once. `gain_vs_ce` is the student's
`val_top1` minus the control's, on the same validation images.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pxd.config import PipelineConfig
from pxd.device import resolve_device
from pxd.memo import ProcessMemory
from pxd.models import create_model
from pxd.stages import (
    STAGE_KEY_VERSION,
    ResumableTraining,
    StageOutcome,
    StageProvider,
    describe,
    digest,
    model_identity,
    optimiser_identity,
)
from pxd.threads import CpuThreads
from pxd.train import Checkpointing, EpochCallback, StageTrainer, train_stage
from pxd.types import DatasetSplits

__all__ = ["CONTROL", "control_identity", "control_key", "control_metrics", "train_ce_control"]

CONTROL = "control"  # the stage kind


def control_identity(cfg: PipelineConfig) -> dict[str, Any]:
    """What determines a control's result (the dataset aside): the student's own settings, nothing upstream.
    The student's view is cut from the teacher-resolution crop, so the teacher's side is part of it."""
    return {"version": STAGE_KEY_VERSION, "kind": CONTROL, "seed": cfg.seed, "eval_crop": cfg.dataset.eval_crop,
            "epochs": cfg.student_epochs, "train": optimiser_identity(cfg.train),
            "model": model_identity(cfg.student, cfg.student.resolution),
            "image_resolution": cfg.teacher.resolution}


def control_key(cfg: PipelineConfig, dataset_fingerprint: str, trainer: dict[str, Any] | None = None) -> str:
    """`trainer`: what a trainer other than `train_stage` adds to a stage's identity (`pxd.simulated`)."""
    return digest({**control_identity(cfg), **(trainer or {}), "dataset": dataset_fingerprint})


def train_ce_control(
    cfg: PipelineConfig,
    *,
    provider: StageProvider,
    data: DatasetSplits,
    on_epoch: EpochCallback | None = None,
    memory: ProcessMemory | None = None,
    cpu_threads: CpuThreads | None = None,
    train: StageTrainer = train_stage,
) -> StageOutcome:
    """The control stage of `cfg`'s student, got from `provider` or trained there (labels only); `train` as
    `pxd.pipeline.run_tas`'s."""
    device = resolve_device(cfg.train.device)

    def train_control(checkpointing: Checkpointing | None) -> Any:
        torch.manual_seed(cfg.seed)  # the distilled student's initial weights (`pxd.pipeline._new_model`)
        model = create_model(cfg.student, data.num_classes, field="student")
        return train(CONTROL, model, data, resolution=cfg.student.resolution,
                           image_resolution=cfg.teacher.resolution, teacher=None, distill=None, train=cfg.train,
                           epochs=cfg.student_epochs, seed=cfg.seed, device=device, on_epoch=on_epoch,
                           progress=False, checkpointing=checkpointing, cpu_threads=cpu_threads, memory=memory)

    trainer = dict(getattr(train, "identity", {}))
    described = {**describe(cfg, "student"), "stage": CONTROL, **trainer}
    return provider.get_or_train(CONTROL, control_key(cfg, data.fingerprint, trainer), described,
                                 ResumableTraining(train_control))


def control_metrics(student: Mapping[str, float], control: StageOutcome) -> dict[str, float]:
    """`control_val_top1` and `gain_vs_ce` (the student's val_top1 minus the control's)."""
    top1 = float(control.result.metrics["val_top1"])
    return {"control_val_top1": top1, "gain_vs_ce": float(student["val_top1"]) - top1}
