"""Stages: what identifies one (`stage_keys`, content-addressed), and how the pipeline gets one (a
`StageProvider`: the default trains, a sweep's store shares stages between trials, `orchestrator.stages.store`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pxd.config import PipelineConfig
from pxd.losses.terms import stage_loss_weights
from pxd.sections import DistillConfig, ModelConfig, TrainConfig
from pxd.train import Checkpointing, StageResult

__all__ = [
    "STAGE_KEY_VERSION",
    "StageOutcome",
    "ResumableTraining",
    "StageProvider",
    "TrainingProvider",
    "stage_identities",
    "stage_keys",
    "digest",
    "describe",
    "model_identity",
    "optimiser_identity",
]

# Bump when a change to the training code would change what a stage produces, so stores miss.
STAGE_KEY_VERSION = 2


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


def digest(payload: dict[str, Any]) -> str:
    """A short content hash of `payload` (its JSON with sorted keys)."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def model_identity(model: ModelConfig, resolution: int) -> dict[str, Any]:
    identity = dataclasses.asdict(model)
    identity.pop("epochs", None)
    identity["resolution"] = resolution
    if model.checkpoint:
        # the weights' content matters, not where the file lives
        identity["checkpoint"] = hashlib.sha256(Path(model.checkpoint).expanduser().read_bytes()).hexdigest()
    return identity


def optimiser_identity(train: TrainConfig) -> dict[str, Any]:
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
                              "train": optimiser_identity(cfg.teacher_train),
                              "model": model_identity(cfg.teacher, cfg.teacher.resolution)}}
    upstream = "teacher"
    if cfg.assistant.enabled:
        # exactly the assistant's active loss terms (pxd.losses.terms): isrd, which needs a lower
        # resolution than the teacher's, never splits assistants that are otherwise the same
        identities["assistant"] = {**common, "kind": "assistant", "epochs": cfg.assistant_epochs,
                                   "train": optimiser_identity(cfg.assistant_train),
                                   "model": model_identity(cfg.student, cfg.teacher.resolution),
                                   "distill": _stage_distill(cfg.assistant_distill, cfg, cfg.teacher.resolution),
                                   "upstream": upstream}
        upstream = "assistant"
    identities["student"] = {**common, "kind": "student", "epochs": cfg.student_epochs,
                             "train": optimiser_identity(cfg.train),
                             "init_from_upstream": cfg.assistant.enabled and cfg.assistant.init_student,
                             "model": model_identity(cfg.student, cfg.student.resolution),
                             "distill": _stage_distill(cfg.distill, cfg, cfg.student.resolution),
                             "upstream": upstream}
    return identities


def stage_keys(cfg: PipelineConfig, dataset_fingerprint: str, trainer: dict[str, Any] | None = None) -> dict[str, str]:
    """Content-addressed keys: `stage_identities` plus the dataset, each chained to its upstream key. `trainer`:
    what a trainer other than `pxd.train.train_stage` adds to every identity (`pxd.simulated`), so its stages
    never pass for trained ones."""
    keys: dict[str, str] = {}
    for kind, identity in stage_identities(cfg).items():
        upstream = identity.get("upstream")
        keys[kind] = digest({**identity, **(trainer or {}), "dataset": dataset_fingerprint,
                              "upstream": keys[upstream] if upstream else None})
    return keys


def _stage_distill(distill: DistillConfig, cfg: PipelineConfig, resolution: int) -> dict[str, float]:
    return stage_loss_weights(distill, distilling=True, student_resolution=resolution,
                              teacher_resolution=cfg.teacher.resolution)


def describe(cfg: PipelineConfig, kind: str) -> dict[str, Any]:
    """Human-readable parameters recorded next to a stored stage."""
    model = cfg.teacher if kind == "teacher" else cfg.student
    resolution = cfg.student.resolution if kind == "student" else cfg.teacher.resolution
    return {"stage": kind, "arch": model.arch, "resolution": resolution, "seed": cfg.seed,
            "dataset": cfg.dataset.kind}
