"""Data types shared across the library."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["ImageSet", "DatasetSplits", "Taps", "TapInfo"]


@dataclass
class ImageSet:
    """Decoded images: uint8 [N, 3, H, W] and int64 labels [N].

    Real datasets map `images` read-only from the on-disk cache (`pxd.data.cache`): never write into it;
    every transform makes a new tensor.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class DatasetSplits:
    """What a run trains on: `val` selects epochs and frontiers; `test`, when the data has one, is
    evaluated once at the selected weights and reported (`test_top1`), never used to choose."""

    train: ImageSet
    val: ImageSet
    classes: list[str]
    fingerprint: str  # sha256 hex of everything that determines the data (content, not location)
    eval_crop: float = 1.0  # center-crop fraction used at evaluation
    test: ImageSet | None = None
    caps: dict[str, int] = field(default_factory=dict)  # per-class caps in force, e.g. {"train_per_class": 100}
    skipped: list[str] = field(default_factory=list)  # unreadable images left out (dataset.on_bad_image: skip)

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
