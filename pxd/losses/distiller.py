"""The `Distiller`: the active loss terms of one stage, as a dict the trainer sums.

Which terms are active, and their weights, come from the table (`pxd.losses.terms`); this module only
builds each active row's module and loops over them. The trainable parts (channel adapters, the ISRD
decoder, the discriminator) live here, not in the student, so they are dropped at inference and the
deployed student's cost is unchanged. The trainer moves the Distiller to the training device, gives
`student_side_parameters()` to the student's optimiser and calls `critic_step()` after each step
(terms with their own optimiser, the adversarial discriminator, train there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from pxd.errors import ConfigError
from pxd.losses.terms import LOSS_TERMS, TermContext, stage_loss_weights, term
from pxd.types import TapInfo, Taps

if TYPE_CHECKING:
    from pxd.sections import DistillConfig

__all__ = ["Distiller"]


class Distiller(nn.Module):
    """Weighted loss terms of one stage; `forward` returns ``{term: weighted scalar}`` in table order."""

    def __init__(
        self,
        distill: DistillConfig | None,
        *,
        student: TapInfo,
        teacher: TapInfo | None,
        student_resolution: int,
        teacher_resolution: int,
    ) -> None:
        super().__init__()
        self.distilling = teacher is not None
        weights = stage_loss_weights(
            distill, distilling=self.distilling,
            student_resolution=student_resolution, teacher_resolution=teacher_resolution,
        )
        # the active terms' weights; the rest are their settings (`pxd.losses.terms.Setting`)
        self.weights = {name: value for name, value in weights.items() if name in LOSS_TERMS}
        settings = {name: value for name, value in weights.items() if name not in self.weights}
        if not self.weights:
            raise ConfigError(
                "distill",
                "every loss weight of this stage is 0 (the label term's weight is ce·(1 − kd); isrd applies "
                "only below the teacher's resolution); set distill.kd or another term > 0",
            )
        context = TermContext(
            student=student, teacher=teacher, student_resolution=student_resolution,
            teacher_resolution=teacher_resolution, settings=settings,
        )
        self.terms = nn.ModuleDict({name: term(name).build(context) for name in self.weights})
        self.warnings: list[str] = [w for module in self.terms.values() for w in getattr(module, "warnings", [])]

    def forward(
        self,
        student: Taps,
        teacher: Taps | None,
        labels: torch.Tensor,
        teacher_image: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if (teacher is not None) != self.distilling:
            raise ValueError(
                "Distiller was built for "
                + ("distillation and needs teacher taps" if self.distilling else "plain training; pass teacher=None")
            )
        return {
            name: self.weights[name] * module(student, teacher, labels, teacher_image)
            for name, module in self.terms.items()
        }

    def critic_parameters(self) -> list[nn.Parameter]:
        """Parameters trained by the terms' own optimisers (never by the student's)."""
        return [p for module in self.terms.values() if hasattr(module, "critic_parameters") for p in module.critic_parameters()]

    def student_side_parameters(self) -> list[nn.Parameter]:
        """Adapter and decoder parameters, trained with the student by its optimiser."""
        critics = {id(p) for p in self.critic_parameters()}
        return [p for p in self.parameters() if id(p) not in critics]

    def critic_step(self) -> dict[str, float]:
        """One step of every term with its own optimiser; ``{term: its critic loss}``."""
        losses = {}
        for name, module in self.terms.items():
            step = getattr(module, "critic_step", None)
            if step is not None:
                value = step()
                if value is not None:
                    losses[f"{name}_critic"] = value
        return losses
