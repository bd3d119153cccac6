"""Batches and two-view sampling for pixel distillation, computed on the batch's device.

Pixel Distillation (Guo et al., TPAMI 2024, Sec. 3) feeds the teacher a high-resolution image and
the student the *same* image at low resolution. `TwoViewSampler` therefore draws one random-resized
crop and flip per image, resamples it to the teacher resolution `R_T`, and makes the student view by
an antialiased bilinear downsample of that teacher view to `R_S`: the two views show exactly the same
crop. Crops are resampled for the whole batch in one `torchvision.ops.roi_align` call (adaptive
sampling averages several bilinear samples per output pixel, which antialiases downsampling), so it
runs wherever the uint8 batch lives, CPU or GPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from pxd.types import ImageSet

__all__ = ["IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD", "TwoViewSampler", "iterate_batches", "sample_crop_boxes"]

# Same values as timm.data.IMAGENET_DEFAULT_MEAN/STD (not imported: importing timm costs a second).
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def iterate_batches(
    images: ImageSet,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield `(uint8 images [B, 3, H, W], int64 labels [B])` on `device` (default: where the images are).

    With `shuffle=True` (training) the order is a permutation drawn from `generator` (a CPU
    generator) and a last batch of one image is dropped, because BatchNorm needs at least two.
    With `shuffle=False` (evaluation) every image is yielded once, in order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1 (got {batch_size})")
    source = images.images.device
    target = torch.device(device) if device is not None else source
    count = len(images)
    order = torch.randperm(count, generator=generator) if shuffle else None
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        if shuffle and stop - start < 2:
            break
        if order is None:
            batch, labels = images.images[start:stop], images.labels[start:stop]
        else:
            index = order[start:stop]
            batch = images.images.index_select(0, index.to(source))
            labels = images.labels.index_select(0, index.to(images.labels.device))
        # Asynchronous only host → device; a device → host copy must finish before the host reads it.
        non_blocking = source.type == "cpu"
        yield batch.to(target, non_blocking=non_blocking), labels.to(target, non_blocking=non_blocking)


def sample_crop_boxes(
    count: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> torch.Tensor:
    """Random-resized-crop boxes `(x1, y1, x2, y2)` [count, 4] on the CPU, one per image.

    torchvision's `RandomResizedCrop.get_params`, vectorised and without rounding to whole pixels:
    area fraction uniform in `scale`, log aspect ratio uniform in `log(ratio)`, the first of
    `attempts` draws that fits, else a centre crop with the aspect ratio clamped into `ratio`.
    """
    area = torch.empty(count, attempts).uniform_(scale[0], scale[1], generator=generator) * height * width
    log_ratio = torch.empty(count, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    offset_x = torch.rand(count, generator=generator)
    offset_y = torch.rand(count, generator=generator)
    aspect = torch.exp(log_ratio)
    crop_w, crop_h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    fits = (crop_w <= width) & (crop_h <= height)
    first = fits.to(torch.int64).argmax(dim=1, keepdim=True)
    crop_w, crop_h = crop_w.gather(1, first).squeeze(1), crop_h.gather(1, first).squeeze(1)

    image_ratio = width / height
    if image_ratio < ratio[0]:
        fallback_w, fallback_h = float(width), width / ratio[0]
    elif image_ratio > ratio[1]:
        fallback_w, fallback_h = height * ratio[1], float(height)
    else:
        fallback_w, fallback_h = float(width), float(height)
    found = fits.any(dim=1)
    crop_w = torch.where(found, crop_w, torch.full_like(crop_w, fallback_w))
    crop_h = torch.where(found, crop_h, torch.full_like(crop_h, fallback_h))
    x1 = torch.where(found, offset_x, torch.full_like(offset_x, 0.5)) * (width - crop_w)
    y1 = torch.where(found, offset_y, torch.full_like(offset_y, 0.5)) * (height - crop_h)
    return torch.stack([x1, y1, x1 + crop_w, y1 + crop_h], dim=1)


def center_crop_box(height: int, width: int, fraction: float) -> torch.Tensor:
    """The square centre crop `(x1, y1, x2, y2)` whose side is `fraction` of the shorter image side."""
    side = fraction * min(height, width)
    x1, y1 = (width - side) / 2, (height - side) / 2
    return torch.tensor([x1, y1, x1 + side, y1 + side])


class TwoViewSampler:
    """Make the (teacher view, student view) pair of a uint8 batch, normalised, on the batch's device.

    Training (`train=True`): per image, one random-resized crop (`scale`, `ratio`) and, with
    probability 1/2, a horizontal flip, drawn from `generator`. Evaluation: the centre crop covering
    `eval_crop` of the shorter side, the same for every image. In both cases the teacher view is the
    crop resampled to `teacher_resolution`, and the student view is the teacher view downsampled
    (bilinear, antialiased) to `student_resolution`; when the two resolutions are equal the student
    view is the teacher view (the same tensor).
    """

    def __init__(
        self,
        teacher_resolution: int,
        student_resolution: int,
        *,
        train: bool,
        eval_crop: float = 1.0,
        scale: tuple[float, float] = (0.35, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
        mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
    ) -> None:
        if not 1 <= student_resolution <= teacher_resolution:
            raise ValueError(
                f"need 1 ≤ student_resolution ≤ teacher_resolution (got {student_resolution}, {teacher_resolution})"
            )
        if not 0 < eval_crop <= 1:
            raise ValueError(f"eval_crop must be in (0, 1] (got {eval_crop})")
        if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"need 0 < scale[0] ≤ scale[1] ≤ 1 and 0 < ratio[0] ≤ ratio[1] (got {scale}, {ratio})")
        self.teacher_resolution = teacher_resolution
        self.student_resolution = student_resolution
        self.train = train
        self.eval_crop = eval_crop
        self.scale = scale
        self.ratio = ratio
        self.flip = flip
        self.mean = mean
        self.std = std

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`images`: uint8 [B, 3, H, W] on any device → float32 (teacher [B,3,R_T,R_T], student [B,3,R_S,R_S])."""
        count, _, height, width = images.shape
        if self.train:
            boxes = sample_crop_boxes(count, height, width, self.scale, self.ratio, generator)
            # Drawn even when flip is off, so turning flips off does not change the crops of a seed.
            flips = (torch.rand(count, generator=generator) < 0.5) & self.flip
        else:
            boxes = center_crop_box(height, width, self.eval_crop).expand(count, 4)
            flips = torch.zeros(count, dtype=torch.bool)
        teacher = self._resample(images, boxes, flips)
        if self.student_resolution == self.teacher_resolution:
            student = teacher
        else:
            size = (self.student_resolution, self.student_resolution)
            student = F.interpolate(teacher, size=size, mode="bilinear", align_corners=False, antialias=True)
        teacher_view = self._normalise(teacher)
        return teacher_view, (teacher_view if student is teacher else self._normalise(student))

    def _resample(self, images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        device = images.device
        index = torch.arange(images.shape[0], dtype=torch.float32).unsqueeze(1)
        rois = torch.cat([index, boxes.to(torch.float32)], dim=1).to(device)
        size = (self.teacher_resolution, self.teacher_resolution)
        # aligned=True: box (0, 0, W, H) maps output pixel centres onto input pixel centres exactly;
        # sampling_ratio=-1: ceil(crop / output) samples per bin, i.e. averaging when downsampling.
        crops = roi_align(images.float(), rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        flips = flips.to(device).view(-1, 1, 1, 1)
        return torch.where(flips, crops.flip(-1), crops)

    def _normalise(self, views: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=views.device, dtype=views.dtype).view(1, -1, 1, 1) * 255
        std = torch.tensor(self.std, device=views.device, dtype=views.dtype).view(1, -1, 1, 1) * 255
        return (views - mean) / std
