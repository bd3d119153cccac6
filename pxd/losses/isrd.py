"""Input spatial representation distillation, ISRD (Guo et al., "Pixel Distillation: Cost-flexible
Distillation across Image Sizes and Heterogeneous Networks", TPAMI 2024, sec. 4.2).

The low-resolution student's input-module map F_s (C × h × w) is decoded back to the teacher's
image: a 1×1 conv without bias to 3·s² channels, PixelShuffle(s) (a learned sub-pixel upsampler)
and a PReLU with one slope per colour channel, and the reconstruction is pulled to the
high-resolution (normalised) image with an L1 loss, as the official code's `SR1x1` and
`train_isrd_5runs.py` (η = 50 at 4× fewer pixels per side, 10 at 2×):

    L_ISRD = ‖ D(F_s) − I_T ‖₁   (mean over pixels)

F_s is the stem convolution's output *before* its BatchNorm and activation (official: ResNet
`conv1` with `preReLU=True`; a ViT's patch embedding), tapped by `pxd.models.forward_taps`.
This forces the student's first layers to encode the fine spatial detail the teacher sees.
The decoder is training-only: it lives in the `Distiller`, not in the student model, so the
deployed student's cost (params, MACs, pixels) is unchanged.

Any stem reduction and any resolution ratio is handled by choosing the smallest integer upscale
s = ceil(target / min(h, w)) that covers the target, then cropping to target × target. The crop is
taken from the **top-left** corner: map cell (i, j) then decodes to image pixels
[s·i, s·i + s) × [s·j, s·j + s), the same corner-anchored layout a strided, padded conv stem (or a
ViT patch grid) uses, so any overhang from ceil-rounding lies at the bottom/right border, where
the stem's extra padded row/column is. In the usual power-of-two cases (e.g. 64 ch at R_s/2 with
R_T = 2·R_s, or a patch-8 ViT token map 7×7 → 56) s·h equals the target and nothing is cropped.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pxd.losses.terms import LossTerm, TermContext, register
from pxd.types import Taps

__all__ = ["ISRDDecoder", "ISRDTerm", "isrd_loss", "isrd_scale"]


def isrd_scale(input_size: tuple[int, int], target_size: int) -> int:
    """Smallest integer sub-pixel upscale so that the decoded map covers target × target."""
    return max(1, math.ceil(target_size / min(input_size)))


class ISRDDecoder(nn.Module):
    """1×1 conv without bias (C → 3·s²) → PixelShuffle(s) → PReLU(3) → top-left crop to target × target."""

    def __init__(self, in_channels: int, input_size: tuple[int, int], target_size: int) -> None:
        super().__init__()
        if in_channels < 1 or min(input_size) < 1 or target_size < 1:
            raise ValueError(
                f"ISRDDecoder needs positive sizes, got in_channels={in_channels}, "
                f"input_size={input_size}, target_size={target_size}"
            )
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.target_size = int(target_size)
        self.scale = isrd_scale(self.input_size, self.target_size)
        self.project = nn.Conv2d(in_channels, 3 * self.scale**2, kernel_size=1, bias=False)
        self.shuffle = nn.PixelShuffle(self.scale)
        self.activation = nn.PReLU(3)

    def forward(self, input_map: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] → [B, 3, target, target]."""
        image = self.activation(self.shuffle(self.project(input_map)))
        return image[:, :, : self.target_size, : self.target_size]


def isrd_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 between the decoded image and the (detached) teacher-resolution image."""
    if reconstruction.shape != target.shape:
        raise ValueError(
            f"ISRD reconstruction {tuple(reconstruction.shape)} does not match the teacher image "
            f"{tuple(target.shape)}; the teacher view must be at teacher.resolution"
        )
    return F.l1_loss(reconstruction, target.detach())


class ISRDTerm(nn.Module):
    """The `isrd` row: decode the student's input tap to the teacher's view, L1 to it."""

    def __init__(self, context: TermContext) -> None:
        super().__init__()
        student = context.student
        self.decoder = ISRDDecoder(student.input_channels, student.input_size, context.teacher_resolution)

    def forward(self, student: Taps, teacher: Taps | None, labels: torch.Tensor, teacher_image: torch.Tensor | None) -> torch.Tensor:
        if teacher_image is None:
            raise ValueError("the isrd term needs teacher_image (the teacher-resolution view)")
        return isrd_loss(self.decoder(student.input_map), teacher_image)


register(LossTerm(
    name="isrd", default=10.0, build=ISRDTerm, order=20, needs_lower_resolution=True,
    doc="ISRD weight η (paper: 10 at 2× fewer pixels per side, 50 at 4×); student only",
    paper="Guo et al., TPAMI 2024",
))
