"""The `Distiller`: every active loss term of one stage, as a dict the trainer sums.

Terms and their papers (one file each): `kd` (kd.py, Hinton et al. 2015), `isrd` (isrd.py,
Guo et al. TPAMI 2024), `feature` and `attention` (feature.py; FitNets-style cross-resolution
hint, Zagoruyko & Komodakis 2017), `pairwise`, `mmd`, `adversarial` (rakd.py, Feng et al. TIP 2021).

A term whose weight is 0 is never computed and creates no parameters. The trainable parts (channel
adapters, the ISRD decoder, the discriminator) live here, not in the student, so they are dropped at
inference and the deployed student's cost is unchanged; the trainer must move the Distiller to the
training device and give its parameters to the same optimizer as the student's.

Plain training (``teacher=None``, the teacher stage) returns only ``"ce"`` at weight 1: the
`DistillConfig` weights describe distillation stages, and letting `distill.ce` scale the teacher's
loss would make the teacher depend on a distillation setting (and break sharing teacher stages
across trials that differ only in distillation weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pxd.config import DISTILL_TERMS, DistillConfig
from pxd.errors import ConfigError
from pxd.losses.feature import FeatureAdapter, attention_loss, feature_loss
from pxd.losses.isrd import ISRDDecoder, isrd_loss
from pxd.losses.kd import kd_loss
from pxd.losses.rakd import (
    EmbeddingAdapter,
    FeatureDiscriminator,
    adversarial_loss,
    mmd_loss,
    pairwise_similarity_loss,
    pooled_embedding,
)
from pxd.types import TapInfo, Taps

__all__ = ["Distiller", "total", "active_terms"]

EMBEDDING_TERMS = ("pairwise", "mmd", "adversarial")


def active_terms(weights: DistillConfig, *, distilling: bool, use_isrd: bool) -> tuple[str, ...]:
    """Names of the terms a stage computes, in `DISTILL_TERMS` order."""
    if not distilling:
        return ("ce",)
    return tuple(
        name
        for name in DISTILL_TERMS
        if getattr(weights, name) > 0 and (name != "isrd" or use_isrd)
    )


class Distiller(nn.Module):
    """Weighted loss terms of one stage; `forward` returns ``{term: weighted scalar}``."""

    def __init__(
        self,
        weights: DistillConfig,
        *,
        student: TapInfo,
        teacher: TapInfo | None,
        teacher_resolution: int,
        use_isrd: bool,
    ) -> None:
        super().__init__()
        self.weights = weights
        self.distilling = teacher is not None
        self.terms = active_terms(weights, distilling=self.distilling, use_isrd=use_isrd)
        if not self.terms:
            raise ConfigError(
                "distill",
                f"every loss weight of this stage is 0; set at least one of {DISTILL_TERMS} > 0"
                + ("" if use_isrd else " (isrd does not apply to a stage at the teacher's resolution)"),
            )
        if teacher is None:
            return
        if "isrd" in self.terms:
            self.isrd_decoder = ISRDDecoder(student.input_channels, student.input_size, teacher_resolution)
        if "feature" in self.terms:
            self.feature_adapter = FeatureAdapter(student.feature_channels, teacher.feature_channels)
        if any(name in self.terms for name in EMBEDDING_TERMS):
            self.embedding_adapter = EmbeddingAdapter(student.feature_channels, teacher.feature_channels)
        if "adversarial" in self.terms:
            self.discriminator = FeatureDiscriminator(teacher.feature_channels)

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
        if teacher is None:
            return {"ce": F.cross_entropy(student.logits, labels)}
        raw = self._raw_losses(student, teacher, labels, teacher_image)
        return {name: getattr(self.weights, name) * raw[name] for name in self.terms}

    def _raw_losses(
        self, student: Taps, teacher: Taps, labels: torch.Tensor, teacher_image: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """Unweighted value of each active term; teacher taps are constants."""
        terms, raw = self.terms, {}
        if "ce" in terms:
            raw["ce"] = F.cross_entropy(student.logits, labels)
        if "kd" in terms:
            raw["kd"] = kd_loss(student.logits, teacher.logits, self.weights.temperature)
        if "isrd" in terms:
            if teacher_image is None:
                raise ValueError("the isrd term needs teacher_image (the teacher-resolution view)")
            raw["isrd"] = isrd_loss(self.isrd_decoder(student.input_map), teacher_image)
        teacher_map = teacher.feature_map.detach()
        if "feature" in terms:
            adapted = self.feature_adapter(student.feature_map, tuple(teacher_map.shape[-2:]))
            raw["feature"] = feature_loss(adapted, teacher_map)
        if "attention" in terms:
            raw["attention"] = attention_loss(student.feature_map, teacher_map)
        if any(name in terms for name in EMBEDDING_TERMS):
            student_embedding = self.embedding_adapter(student.feature_map)
            teacher_embedding = pooled_embedding(teacher_map)
            if "pairwise" in terms:
                raw["pairwise"] = pairwise_similarity_loss(student_embedding, teacher_embedding)
            if "mmd" in terms:
                raw["mmd"] = mmd_loss(student_embedding, teacher_embedding)
            if "adversarial" in terms:
                raw["adversarial"] = adversarial_loss(self.discriminator, student_embedding, teacher_embedding)
        return raw


def total(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the weighted terms a `Distiller` returned (what the trainer back-propagates)."""
    if not losses:
        raise ValueError("no loss terms to sum; a Distiller always returns at least one")
    return torch.stack([value.float() for value in losses.values()]).sum()
