"""Where a stage's tensors and models run: the training device, its autocast dtype, the memory format of
batches, and which data is kept on the device."""

from __future__ import annotations

import torch

from pxd.types import ImageSet

__all__ = ["resolve_device", "autocast_dtype", "to_memory_format", "place_data"]


def resolve_device(name: str) -> torch.device:
    """`train.device` as a torch device: "auto" is CUDA when one is visible."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    return torch.device(name)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (no loss scaling needed), full precision on CPU."""
    return torch.bfloat16 if device.type == "cuda" else None


def to_memory_format(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """`x` in channels_last on CUDA when asked (`train.channels_last`), else as it is."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and device.type == "cuda" else x


def place_data(images: ImageSet, device: torch.device, budget_bytes: int) -> ImageSet:
    """Keep decoded uint8 images on the training device when they fit, so batches never cross PCIe."""
    if device.type == "cpu" or images.images.numel() > budget_bytes:
        return images
    return ImageSet(images.images.to(device), images.labels.to(device))
