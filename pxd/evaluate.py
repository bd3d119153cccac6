"""Top-1 accuracy of a model on a split, with the evaluation view at the model's resolution."""

from __future__ import annotations

import torch
from torch import nn

from pxd.data import TwoViewSampler, iterate_batches
from pxd.device import autocast_dtype, to_memory_format
from pxd.types import ImageSet

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: ImageSet,
    *,
    resolution: int,
    image_resolution: int,
    eval_crop: float,
    batch_size: int,
    device: torch.device,
    channels_last: bool = False,
) -> float:
    """Top-1 accuracy with the evaluation view (resize + center crop) at `resolution`."""
    was_training = model.training
    model.eval()
    sampler = TwoViewSampler(image_resolution, resolution, train=False, eval_crop=eval_crop)
    correct, total = 0, 0
    amp = autocast_dtype(device)
    for images, labels in iterate_batches(split, batch_size, shuffle=False, generator=None, device=device):
        _, view = sampler(images)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(to_memory_format(view, device, channels_last))
        correct += int((logits.argmax(dim=1) == labels.to(device)).sum())
        total += int(labels.shape[0])
    model.train(was_training)
    return correct / max(total, 1)
