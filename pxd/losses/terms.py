"""The loss-term table: every term pxd can train with, registered once.

A row says what a term is (`build`: the module that computes its unweighted value from the student's
and the teacher's taps, holding any adapter it trains), how its weight follows from `DistillConfig`
(`weight`), and when it applies (`needs_teacher`, `needs_lower_resolution`). `stage_loss_weights`
reads the table to give a stage its active terms; the `Distiller` builds and sums exactly those, and
`pxd.pipeline.stage_keys` hashes exactly those weights. Adding a loss is one file with its module and
one row here (plus its weight field in `DistillConfig` and its name in `DISTILL_TERMS`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from pxd.losses.feature import AttentionTerm, FeatureKDTerm
from pxd.losses.isrd import ISRDTerm
from pxd.losses.kd import LabelTerm, LogitKDTerm
from pxd.losses.rakd import AdversarialTerm, MMDTerm, PairwiseTerm
from pxd.types import TapInfo

if TYPE_CHECKING:
    from pxd.config import DistillConfig

__all__ = ["TermContext", "LossTerm", "LOSS_TERMS", "stage_loss_weights"]


@dataclass(frozen=True)
class TermContext:
    """What a term's module may size itself from when a stage is built."""

    student: TapInfo
    teacher: TapInfo | None
    student_resolution: int
    teacher_resolution: int
    temperature: float


@dataclass(frozen=True)
class LossTerm:
    name: str
    # context → module; module(student_taps, teacher_taps, labels, teacher_image) → unweighted scalar
    build: Callable[[TermContext], nn.Module]
    weight: Callable[[DistillConfig], float]
    needs_teacher: bool = True
    # ISRD reconstructs the teacher's pixels: only a stage that sees fewer of them can learn from it
    needs_lower_resolution: bool = False
    uses_temperature: bool = False
    paper: str = ""


def _label_weight(distill: DistillConfig) -> float:
    # the convex (1 − α)·CE + α·KD of the official KDLoss; α > 1 leaves no label term
    return distill.ce * max(0.0, 1.0 - distill.kd)


def _field(name: str) -> Callable[[DistillConfig], float]:
    return lambda distill: float(getattr(distill, name))


LOSS_TERMS: tuple[LossTerm, ...] = (
    LossTerm("ce", LabelTerm, _label_weight, needs_teacher=False, paper="labels"),
    LossTerm("kd", LogitKDTerm, _field("kd"), uses_temperature=True, paper="Hinton et al. 2015"),
    LossTerm("isrd", ISRDTerm, _field("isrd"), needs_lower_resolution=True, paper="Guo et al., TPAMI 2024"),
    LossTerm("feature", FeatureKDTerm, _field("feature"), paper="FitNets-style hint, Guo et al. 2024 stage-2 feature KD"),
    LossTerm("attention", AttentionTerm, _field("attention"), paper="Zagoruyko & Komodakis, ICLR 2017"),
    LossTerm("pairwise", PairwiseTerm, _field("pairwise"), paper="Feng et al., TIP 2021"),
    LossTerm("mmd", MMDTerm, _field("mmd"), paper="Feng et al., TIP 2021"),
    LossTerm("adversarial", AdversarialTerm, _field("adversarial"), paper="Feng et al., TIP 2021"),
)
# The table and pxd.config.DISTILL_TERMS name the same terms, in order (tests/pxd/test_losses.py checks it;
# pxd.config must not import this module at load time).


def stage_loss_weights(
    distill: DistillConfig | None, *, distilling: bool, student_resolution: int, teacher_resolution: int
) -> dict[str, float]:
    """The weight of every term a stage trains with (only those > 0), plus `temperature` when a term
    that uses it is active. Plain training (no teacher: the teacher stage, a cross-entropy baseline) is
    ``{"ce": 1.0}``, whatever `distill` says, so the teacher never depends on a distillation setting.
    """
    if not distilling or distill is None:
        return {"ce": 1.0}
    weights: dict[str, float] = {}
    for row in LOSS_TERMS:
        if row.needs_lower_resolution and student_resolution >= teacher_resolution:
            continue
        value = row.weight(distill)
        if value > 0:
            weights[row.name] = value
    if any(term(name).uses_temperature for name in weights):
        weights["temperature"] = float(distill.temperature)
    return weights


def term(name: str) -> LossTerm:
    """The table's row for `name` (read at call time, so the table is the only source)."""
    for row in LOSS_TERMS:
        if row.name == name:
            return row
    raise KeyError(f"no loss term {name!r}; the table has {[row.name for row in LOSS_TERMS]}")
