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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FeatureAdapter", "feature_loss", "resize_map", "attention_map", "attention_loss"]


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
