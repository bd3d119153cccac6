"""The checks of a config that need its models: timm names, block-wise shapes, and whether each distilled
stage can use its loss terms at its resolution (tap shapes from a build on the meta device: no memory, no
weights, no download).

`pxd.config.PipelineConfig.validate` runs them after the sections' own checks (`pxd.sections`).
"""

from __future__ import annotations

from pathlib import Path

import timm

from pxd.errors import ConfigError
from pxd.losses.terms import LOSS_TERMS, TermContext, loss_terms, stage_loss_weights
from pxd.models import BLOCKWISE_FAMILIES, check_model_supported, meta_tap_info
from pxd.sections import DistillConfig, ModelConfig, positive

__all__ = ["check_model", "check_stage_terms"]


def check_model(role: str, model: ModelConfig) -> None:
    """`model` (the `role` section: teacher or student) names a model pxd can build and tap."""
    positive(f"{role}.resolution", model.resolution)
    if model.arch in BLOCKWISE_FAMILIES:
        if not model.depths or not model.widths:
            raise ConfigError(f"{role}.depths", f"{model.arch} needs depths and widths (one per stage)")
        if len(model.depths) != len(model.widths):
            raise ConfigError(f"{role}.widths", "needs as many entries as depths")
        if any(d < 1 for d in model.depths) or any(w < 1 for w in model.widths):
            raise ConfigError(f"{role}.depths", "depths and widths must be ≥ 1")
    elif not timm.is_model(model.arch):
        close = timm.list_models(f"*{model.arch.split('_')[0]}*")[:5]
        hint = f"; did you mean one of {close}?" if close else "; see timm.list_models()"
        raise ConfigError(f"{role}.arch", f"unknown timm model {model.arch!r}{hint}")
    elif model.depths is not None or model.widths is not None:
        raise ConfigError(f"{role}.depths", f"depths/widths apply only to {BLOCKWISE_FAMILIES}")
    if model.checkpoint is not None and not Path(model.checkpoint).expanduser().is_file():
        raise ConfigError(f"{role}.checkpoint", f"{model.checkpoint} is not a file")
    if model.patch_size is not None and (model.patch_size < 1 or model.resolution % model.patch_size):
        raise ConfigError(f"{role}.patch_size", f"must divide {role}.resolution {model.resolution}")
    check_model_supported(model, role)


def check_stage_terms(
    stages: dict[str, tuple[int, DistillConfig, str]], *, student: ModelConfig, teacher: ModelConfig
) -> None:
    """Every distilled stage has a term to train with, and each active term's own check passes.

    `stages`: stage kind → (its resolution, its distillation weights, the section they are written in).
    The student's architecture trains at each stage's resolution, distilled from the teacher's view.
    """
    for stage, (resolution, distill, section) in stages.items():
        weights = stage_loss_weights(distill, distilling=True, student_resolution=resolution,
                                     teacher_resolution=teacher.resolution)
        if not weights:
            raise ConfigError(
                section,
                f"the {stage} stage has no loss term with a weight > 0 (the label term's weight is "
                "ce·(1 − kd); isrd applies only below the teacher's resolution): nothing would train "
                f"it; set {section}.kd or another term > 0",
            )
        checked = [row for row in loss_terms() if row.name in weights and row.check is not None]
        if checked:
            context = TermContext(
                student=meta_tap_info(student, resolution, "student"),
                teacher=meta_tap_info(teacher, teacher.resolution, "teacher"),
                student_resolution=resolution, teacher_resolution=teacher.resolution,
                settings={name: value for name, value in weights.items() if name not in LOSS_TERMS},
            )
            for row in checked:
                row.check(context)  # ConfigError when the stage cannot use the term
