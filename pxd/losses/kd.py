"""Logit knowledge distillation (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
Network", 2015).

    L_KD = T² · KL( softmax(z_t / T) ‖ softmax(z_s / T) ),   averaged over the batch

The T² factor keeps the gradient magnitude of the soft targets comparable to the hard-label
cross-entropy when T changes (Hinton et al. 2015, sec. 2). A stage combines it with the label term
convexly, as the official Pixel Distillation `KDLoss` does: (1 − α)·CE + α·L_KD with α = `distill.kd`.
This file registers both terms, `ce` (the labels) and `kd`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pxd.losses.terms import LossTerm, Setting, TermContext, register
from pxd.types import Taps

__all__ = ["kd_loss", "LabelTerm", "LogitKDTerm"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) of the temperature-softened distributions, times T², batch mean.

    The teacher logits are treated as constants. Identical logits give exactly 0.
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    # kl_div(input, target) = Σ p_target · (log p_target − input); "batchmean" divides by B, which
    # is the mathematically correct KL per example (reduction="mean" would also divide by classes).
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


class LabelTerm(nn.Module):
    """The `ce` row: cross-entropy of the student's logits against the labels."""

    def __init__(self, context: TermContext) -> None:
        super().__init__()

    def forward(self, student: Taps, teacher: Taps | None, labels: torch.Tensor, teacher_image: torch.Tensor | None) -> torch.Tensor:
        return F.cross_entropy(student.logits, labels)


class LogitKDTerm(nn.Module):
    """The `kd` row: `kd_loss` at the stage's temperature."""

    def __init__(self, context: TermContext) -> None:
        super().__init__()
        self.temperature = context.settings["temperature"]

    def forward(self, student: Taps, teacher: Taps | None, labels: torch.Tensor, teacher_image: torch.Tensor | None) -> torch.Tensor:
        return kd_loss(student.logits, teacher.logits, self.temperature)


def _label_weight(values: Mapping[str, float]) -> float:
    # the convex (1 − α)·CE + α·KD of the official KDLoss (α ≤ 1: `maximum` on the kd row)
    return values["ce"] * max(0.0, 1.0 - values["kd"])


register(LossTerm(
    name="ce", default=1.0, build=LabelTerm, order=0, weight=_label_weight, without_upstream=1.0,
    doc="scale of the label term: its weight is ce·(1 − kd) while distilling, 1 with no upstream",
    paper="labels",
))
register(LossTerm(
    name="kd", default=0.9, build=LogitKDTerm, order=10,
    doc="α, the share of logit KD (paper: 0.9)",
    settings=(Setting("temperature", 4.0, "KD temperature T (paper: 4)"),),
    paper="Hinton et al. 2015",
    maximum=1.0,
    above_maximum=("kd is α in (1 − α)·CE + α·T²·KL, and above 1 the label term vanishes; for KD alone write "
                   "kd: 1 (or ce: 0); a value written for pxd's earlier additive kd (CE + kd·KD) is "
                   "α = kd / (1 + kd): e.g. 2 → 0.667"),
))
