"""The single-point pipeline config: one teacher → assistant → student run.

A `pxd train` file and a search-space file share this format; in a search space any leaf may be a
distribution instead of a value (see `orchestrator.space.spec`). Everything that can be checked before
compute is checked when a config is read (`PipelineConfig.from_dict`), and every error names its field
(`student.resolution: ...`): each section's own checks (`pxd.sections`), then those that need the models
(`pxd.checks`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pxd.checks import check_model, check_stage_terms
from pxd.errors import ConfigError
from pxd.parsing import parse_dataclass
from pxd.sections import (
    DEVICES,
    AssistantConfig,
    AssistantDistillConfig,
    DatasetConfig,
    DistillConfig,
    ModelConfig,
    StageTrainConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    has_weights,
    positive,
    set_fields,
    validate_dataset,
    validate_distill,
    validate_optimiser,
)

__all__ = [
    "DatasetConfig",
    "ModelConfig",
    "TeacherConfig",
    "StudentConfig",
    "AssistantConfig",
    "DistillConfig",
    "TrainConfig",
    "StageTrainConfig",
    "AssistantDistillConfig",
    "PipelineConfig",
    "parse_dataclass",
]


@dataclass(frozen=True)
class PipelineConfig:
    name: str = "pxd"
    seed: int = 0
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    assistant: AssistantConfig = field(default_factory=AssistantConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, ignore: tuple[str, ...] = ("search",)) -> PipelineConfig:
        """Parse and validate; raises `ConfigError` naming the first bad field."""
        raw = {k: v for k, v in raw.items() if k not in ignore}
        config = parse_dataclass(cls, raw, prefix="")
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def teacher_train(self) -> TrainConfig:
        """What trains the teacher: `train` with the teacher's own settings (`teacher.train`) applied."""
        return dataclasses.replace(self.train, **set_fields(self.teacher.train))

    @property
    def assistant_train(self) -> TrainConfig:
        """What trains the assistant: `train` with `assistant.train` applied."""
        return dataclasses.replace(self.train, **set_fields(self.assistant.train))

    @property
    def assistant_distill(self) -> DistillConfig:
        """The assistant's weights: `distill` with the assistant's own settings (`assistant.distill`) applied."""
        return dataclasses.replace(self.distill, **set_fields(self.assistant.distill))

    @property
    def assistant_epochs(self) -> int:
        return self.assistant.epochs if self.assistant.epochs is not None else self.train.epochs

    @property
    def student_epochs(self) -> int:
        return self.student.epochs if self.student.epochs is not None else self.train.epochs

    def validate(self) -> None:
        """Every check that can run before compute (timm names, sizes, paths). Raises `ConfigError`."""
        validate_dataset(self.dataset)
        check_model("teacher", self.teacher)
        check_model("student", self.student)
        if self.student.resolution > self.teacher.resolution:
            raise ConfigError(
                "student.resolution",
                f"{self.student.resolution} is larger than teacher.resolution "
                f"{self.teacher.resolution}; pixel distillation needs student ≤ teacher",
            )
        if self.teacher.epochs < 0 or (self.teacher.epochs == 0 and not has_weights(self.teacher)):
            raise ConfigError(
                "teacher.epochs",
                f"must be > 0 (got {self.teacher.epochs}); 0 is allowed only with "
                "teacher.checkpoint or teacher.pretrained",
            )
        positive("train.epochs", self.train.epochs)
        if self.assistant.epochs is not None:
            positive("assistant.epochs", self.assistant.epochs)
        if self.student.epochs is not None:
            positive("student.epochs", self.student.epochs)
        validate_optimiser("train", self.train)
        # the teacher's own settings, checked where the user wrote them
        validate_optimiser("teacher.train", self.teacher_train, given=set_fields(self.teacher.train))
        if self.train.device not in DEVICES:
            raise ConfigError("train.device", f"unknown {self.train.device!r}; use one of {DEVICES}")
        validate_distill("distill", self.distill)
        if self.assistant.enabled:
            validate_optimiser("assistant.train", self.assistant_train, given=set_fields(self.assistant.train))
            validate_distill("assistant.distill", self.assistant_distill, given=set_fields(self.assistant.distill))
        check_stage_terms(self.distilled_stages(), student=self.student, teacher=self.teacher)

    def distilled_stages(self) -> dict[str, tuple[int, DistillConfig, str]]:
        """Each distilled stage → (its resolution, its weights, the section they are written in)."""
        stages = {"student": (self.student.resolution, self.distill, "distill")}
        if self.assistant.enabled:
            stages = {"assistant": (self.teacher.resolution, self.assistant_distill, "assistant.distill"), **stages}
        return stages
