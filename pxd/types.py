"""Data types shared across the library."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ImageSet", "DatasetSplits", "Taps", "TapInfo"]


@dataclass
class ImageSet:
    """Decoded images kept in memory: uint8 [N, 3, H, W] and int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class DatasetSplits:
    train: ImageSet
    val: ImageSet
    classes: list[str]
    fingerprint: str  # sha256 hex of everything that determines the data
    eval_crop: float = 1.0  # center-crop fraction used at evaluation

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class Taps:
    """What a distiller sees of one forward pass."""

    logits: torch.Tensor  # [B, num_classes]
    input_map: torch.Tensor  # NCHW map of the input module (CNN stem / first stage; ViT first tokens)
    feature_map: torch.Tensor  # NCHW map of the last stage


@dataclass(frozen=True)
class TapInfo:
    """Shapes of a model's taps at one input resolution (from a dry forward pass)."""

    input_channels: int
    input_size: tuple[int, int]
    feature_channels: int
    feature_size: tuple[int, int]
