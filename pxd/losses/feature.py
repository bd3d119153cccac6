"""Cross-resolution feature distillation and attention transfer.

Feature MSE (FitNets-style hint, Romero et al., ICLR 2015, adapted across resolutions as in
Guo et al., TPAMI 2024): the student map is resized (bilinear) to the teacher map's spatial size,
its channels mapped by a 1×1 conv adapter when they differ, and pulled to the teacher map:

    L_feat = mean( (A(resize(F_s)) − F_t)² )

Resizing is by interpolation, never by a fixed stride, so any size ratio works (1, 2, 4, 8,
non-integer, non-square, and a student map *larger* than the teacher's, where the resize is an
antialiased downsample). Unlike a strided-deconv regressor (mdistiller's `ConvReg`, 2× only),
nothing here depends on the ratio.

Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017,
eq. 2 with p = 2 and the mean over channels as in their code):

    Q(F) = vec( mean_c |F_c|² ) / ‖ vec( mean_c |F_c|² ) ‖₂
    L_AT = mean_{b, i} ( Q(F_s)_{b,i} − Q(F_t)_{b,i} )²

The larger attention map is adaptive-average-pooled to the smaller one's size (per dimension)
before normalisation, so no adapter (and no parameters) is needed, whatever the channels.

Both terms run on several stages (`ModelTaps.stage_maps`: a ResNet's layer1..layer4, as the official
Pixel Distillation AT), the student's and the teacher's stages paired from the deepest. A pair where
either map is 1×1 is skipped with a warning: there a normalised attention map is the constant 1
(loss and gradient exactly 0) and a feature map has no spatial structure to transfer. The stage
losses are summed, as the official `ATLoss` (weighted by β = 1000 there). A term with no usable pair
is a `ConfigError` when the stage is built, before it trains.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from pxd.errors import ConfigError
from pxd.losses.terms import LossTerm, TermContext, register
from pxd.types import Taps

__all__ = [
    "FeatureAdapter",
    "feature_loss",
    "resize_map",
    "attention_map",
    "attention_loss",
    "spatial_stage_pairs",
    "FeatureKDTerm",
    "AttentionTerm",
]

logger = logging.getLogger(__name__)


def resize_map(feature_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of an NCHW map; antialiased where any side shrinks (avoids aliasing)."""
    if tuple(feature_map.shape[-2:]) == tuple(size):
        return feature_map
    shrinks = size[0] < feature_map.shape[-2] or size[1] < feature_map.shape[-1]
    return F.interpolate(feature_map, size=size, mode="bilinear", align_corners=False, antialias=shrinks)


class FeatureAdapter(nn.Module):
    """Student map → teacher map's channels (1×1 conv, identity when equal) and spatial size."""

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        if student_channels == teacher_channels:
            self.project: nn.Module = nn.Identity()
        else:
            self.project = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)

    def forward(self, student_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # A 1×1 conv and a bilinear resize commute (both linear, resize weights sum to 1), so the
        # conv runs on whichever side is smaller: fewer MACs for the same result.
        if student_map.shape[-2] * student_map.shape[-1] <= size[0] * size[1]:
            return resize_map(self.project(student_map), size)
        return self.project(resize_map(student_map, size))


def feature_loss(adapted_student: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """MSE between the adapted student map and the detached teacher map (same shape)."""
    if adapted_student.shape != teacher_map.shape:
        raise ValueError(
            f"feature distillation: adapted student map {tuple(adapted_student.shape)} does not "
            f"match the teacher map {tuple(teacher_map.shape)}; pass it through FeatureAdapter first"
        )
    return F.mse_loss(adapted_student, teacher_map.detach())


def attention_map(feature_map: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Zagoruyko & Komodakis 2017 spatial attention: mean_c |F|², optionally pooled, flattened,
    L2-normalised per example → [B, H·W]."""
    attention = feature_map.pow(2).mean(dim=1, keepdim=True)
    if size is not None and tuple(attention.shape[-2:]) != tuple(size):
        attention = F.adaptive_avg_pool2d(attention, size)
    return F.normalize(attention.flatten(1), dim=1)


def attention_loss(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of the normalised attention maps, at the smaller map's size."""
    size = (
        min(student_map.shape[-2], teacher_map.shape[-2]),
        min(student_map.shape[-1], teacher_map.shape[-1]),
    )
    return (attention_map(student_map, size) - attention_map(teacher_map.detach(), size)).pow(2).mean()


def spatial_stage_pairs(context: TermContext, term: str) -> tuple[list[tuple[int, int]], list[str]]:
    """(student stage, teacher stage) index pairs a spatial term uses, and a warning per skipped pair.

    Stages are paired from the deepest (student's last with teacher's last, ...), as many as the shorter
    list has. Raises `ConfigError` naming `distill.<term>` when no pair has maps larger than 1×1.
    """
    student_sizes = context.student.stage_sizes or (context.student.feature_size,)
    teacher_sizes = context.teacher.stage_sizes or (context.teacher.feature_size,)
    count = min(len(student_sizes), len(teacher_sizes))
    pairs, warnings = [], []
    for offset in range(count, 0, -1):
        s_index, t_index = len(student_sizes) - offset, len(teacher_sizes) - offset
        s_size, t_size = student_sizes[s_index], teacher_sizes[t_index]
        if s_size[0] * s_size[1] <= 1 or t_size[0] * t_size[1] <= 1:
            warnings.append(
                f"distill.{term}: skipped stage {s_index + 1} (student map {s_size[0]}×{s_size[1]}, "
                f"teacher map {t_size[0]}×{t_size[1]}): a 1×1 map carries no spatial information"
            )
            continue
        pairs.append((s_index, t_index))
    if not pairs:
        raise ConfigError(
            f"distill.{term}",
            f"no stage of the student ({list(student_sizes)}) has a feature map larger than 1×1 at this "
            "resolution, so the term would be 0; set it to 0, raise student.resolution, or pick an "
            "architecture with less downsampling",
        )
    for warning in warnings:
        logger.warning(warning)
    return pairs, warnings


def _stage_maps(taps: Taps) -> list[torch.Tensor]:
    return list(getattr(taps, "stage_maps", None) or [taps.feature_map])


class FeatureKDTerm(nn.Module):
    """The `feature` row: per usable stage, adapt the student map to the teacher's, MSE; summed."""

    def __init__(self, context: TermContext) -> None:
        super().__init__()
        self.pairs, self.warnings = spatial_stage_pairs(context, "feature")
        student_channels = context.student.stage_channels or (context.student.feature_channels,)
        teacher_channels = context.teacher.stage_channels or (context.teacher.feature_channels,)
        self.adapters = nn.ModuleList(
            FeatureAdapter(student_channels[s], teacher_channels[t]) for s, t in self.pairs
        )

    def forward(self, student: Taps, teacher: Taps | None, labels: torch.Tensor, teacher_image: torch.Tensor | None) -> torch.Tensor:
        student_maps, teacher_maps = _stage_maps(student), _stage_maps(teacher)
        losses = []
        for adapter, (s, t) in zip(self.adapters, self.pairs):
            target = teacher_maps[t].detach()
            losses.append(feature_loss(adapter(student_maps[s], tuple(target.shape[-2:])), target))
        return torch.stack(losses).sum()


class AttentionTerm(nn.Module):
    """The `attention` row: attention transfer on every usable stage pair, summed."""

    def __init__(self, context: TermContext) -> None:
        super().__init__()
        self.pairs, self.warnings = spatial_stage_pairs(context, "attention")

    def forward(self, student: Taps, teacher: Taps | None, labels: torch.Tensor, teacher_image: torch.Tensor | None) -> torch.Tensor:
        student_maps, teacher_maps = _stage_maps(student), _stage_maps(teacher)
        return torch.stack([attention_loss(student_maps[s], teacher_maps[t]) for s, t in self.pairs]).sum()


register(LossTerm(
    name="feature", default=0.0, build=FeatureKDTerm, order=30,
    check=lambda context: spatial_stage_pairs(context, "feature"),
    doc="cross-resolution feature MSE on every stage with a map larger than 1×1",
    paper="FitNets-style hint, Guo et al. 2024 stage-2 feature KD",
))
register(LossTerm(
    name="attention", default=0.0, build=AttentionTerm, order=40,
    check=lambda context: spatial_stage_pairs(context, "attention"),
    doc="attention transfer (Zagoruyko & Komodakis 2017; paper β = 1000)",
    paper="Zagoruyko & Komodakis, ICLR 2017",
))
