"""The embedded synthetic dataset: procedural, seeded, and one where input resolution truly matters.

Classes come in pairs. Both classes of a pair share a coarse appearance (a shape and a hue, drawn
with random position, size, colour jitter, a background gradient and pixel noise) and differ only
in the orientation of a fine stripe texture on the object: horizontal (`-h`) or vertical (`-v`).
The stripe period is graded per pair, as a fraction of `image_size` so it scales with it:

    tier     period (64 px images)   gone once the image is downsampled to
    fine     2 px  (size / 32)       1/2  (32 px)
    medium   4 px  (size / 16)       1/4  (16 px)
    coarse   8 px  (size / 8)        1/8  (8 px)

An antialiased (triangle-filter) downsample by a factor equal to the period averages a full
stripe cycle into every output pixel, so the two classes of that pair become identical in
distribution while the pair itself stays recognisable by shape and colour. With the default 8
classes (tiers fine, medium, coarse, fine) the best achievable top-1 therefore falls from ~1.0 at
64 px to ~0.75 at 32 px, ~0.625 at 16 px and ~0.5 at 8 px: the low-resolution student has
something real to gain from the high-resolution teacher.

The texture is modulated by a smooth Gaussian envelope rather than the hard shape mask, so it has no
low-frequency side lobes that could leak orientation through a downsample.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import torch

from pxd.config import DatasetConfig
from pxd.types import DatasetSplits, ImageSet

__all__ = ["GENERATOR_VERSION", "SHAPES", "DETAIL_TIERS", "make_synthetic", "synthetic_class_names", "stripe_period"]

# Bump when the images a (config, seed) produces change: it is part of the fingerprint.
GENERATOR_VERSION = "pxd-synthetic-v1"
SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross")
# (name, stripe period as a fraction of image_size)
DETAIL_TIERS = (("fine", 1 / 32), ("medium", 1 / 16), ("coarse", 1 / 8))
ORIENTATIONS = ("h", "v")

_TEXTURE_AMPLITUDE = 0.2
_NOISE_STD = 0.03
_GOLDEN = 0.6180339887


def stripe_period(image_size: int, tier: int) -> int:
    """Stripe period in pixels for a tier: an even number ≥ 2 (a 50 % duty square wave)."""
    return max(2, 2 * round(image_size * DETAIL_TIERS[tier][1] / 2))


def synthetic_class_names(num_classes: int) -> list[str]:
    """Readable names, e.g. `circle-fine-h`; pair g is classes 2g and 2g+1."""
    names = []
    for label in range(num_classes):
        group = label // 2
        shape = SHAPES[group % len(SHAPES)]
        if group >= len(SHAPES):  # shapes repeat with another hue once they run out
            shape = f"{shape}{group // len(SHAPES) + 1}"
        tier = DETAIL_TIERS[group % len(DETAIL_TIERS)][0]
        names.append(f"{shape}-{tier}-{ORIENTATIONS[label % 2]}")
    return names


def make_synthetic(cfg: DatasetConfig, seed: int) -> DatasetSplits:
    """Generate train and val splits in memory; same (cfg, seed) → identical bytes. No download."""
    size, num_classes = cfg.image_size, cfg.num_classes
    train = _make_split(num_classes, cfg.train_per_class, size, _split_seed(seed, "train"))
    val = _make_split(num_classes, cfg.val_per_class, size, _split_seed(seed, "val"))
    description = {"generator": GENERATOR_VERSION, "config": dataclasses.asdict(cfg), "seed": seed}
    fingerprint = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
    return DatasetSplits(
        train=train,
        val=val,
        classes=synthetic_class_names(num_classes),
        fingerprint=fingerprint,
        eval_crop=cfg.eval_crop,
    )


def _split_seed(seed: int, split: str) -> int:
    # Independent streams per split: changing train_per_class leaves the val images unchanged.
    digest = hashlib.sha256(f"{GENERATOR_VERSION}:{seed}:{split}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _make_split(num_classes: int, per_class: int, size: int, seed: int) -> ImageSet:
    gen = torch.Generator().manual_seed(seed)
    count = num_classes * per_class
    # Interleaved labels: every prefix of the split is close to balanced.
    labels = torch.arange(count, dtype=torch.int64) % num_classes
    group = labels // 2
    orientation = labels % 2

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return torch.empty(count, *shape).uniform_(low, high, generator=gen)

    radius = uniform(0.2, 0.3) * size
    centre_x = radius + uniform(0.0, 1.0) * (size - 2 * radius)
    centre_y = radius + uniform(0.0, 1.0) * (size - 2 * radius)
    hue = (group.double() * _GOLDEN % 1.0).float() + uniform(-0.03, 0.03)
    colour = _hsv_to_rgb(hue % 1.0, uniform(0.45, 0.75), uniform(0.5, 0.8))  # [N, 3]
    background_level = uniform(0.15, 0.85)
    gradient_angle = uniform(0.0, 2 * math.pi)
    gradient_strength = uniform(-0.15, 0.15)
    phase = torch.floor(uniform(0.0, 1.0) * size)  # any integer shift; reduced mod period below
    noise = torch.randn(count, 3, size, size, generator=gen) * _NOISE_STD

    coords = torch.arange(size, dtype=torch.float32)
    ys = coords.view(1, size, 1).expand(count, size, size)
    xs = coords.view(1, 1, size).expand(count, size, size)
    u = (xs - centre_x.view(-1, 1, 1)) / radius.view(-1, 1, 1)
    v = (ys - centre_y.view(-1, 1, 1)) / radius.view(-1, 1, 1)

    # Background: grey level plus a linear gradient in a random direction, from -1 to 1 across the image.
    ramp = (xs * torch.cos(gradient_angle).view(-1, 1, 1) + ys * torch.sin(gradient_angle).view(-1, 1, 1)) / size
    background = (background_level.view(-1, 1, 1) + gradient_strength.view(-1, 1, 1) * 2 * ramp).unsqueeze(1)

    alpha = _shape_alpha(group % len(SHAPES), u, v, radius).unsqueeze(1)  # [N, 1, S, S]
    image = background * (1 - alpha) + colour.view(-1, 3, 1, 1) * alpha

    period = torch.tensor([stripe_period(size, tier) for tier in range(len(DETAIL_TIERS))])
    period = period[group % len(DETAIL_TIERS)].view(-1, 1, 1).float()
    across = torch.where(orientation.view(-1, 1, 1) == 0, ys, xs)  # h stripes vary along y
    stripes = torch.remainder(torch.floor((across + phase.view(-1, 1, 1)) / (period / 2)), 2) * 2 - 1
    envelope = torch.exp(-(u * u + v * v) / (2 * 0.5**2))
    image = image + (_TEXTURE_AMPLITUDE * envelope * stripes).unsqueeze(1) + noise

    images = (image.clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
    return ImageSet(images=images, labels=labels)


def _shape_alpha(shape_id: torch.Tensor, u: torch.Tensor, v: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Coverage in [0, 1] with a one-pixel soft edge; `u, v` are image coordinates in units of the radius."""
    au, av = u.abs(), v.abs()
    distance = torch.sqrt(u * u + v * v)
    # Signed distance-like functions in radius units: < 0 inside.
    candidates = {
        "circle": distance - 1.0,
        "square": torch.maximum(au, av) - 0.8,
        "triangle": torch.maximum(v - 0.6, au - (v + 1.0) * 0.65),
        "diamond": au + av - 1.1,
        "ring": (distance - 0.75).abs() - 0.28,
        "cross": torch.minimum(torch.maximum(au - 0.3, av - 0.95), torch.maximum(au - 0.95, av - 0.3)),
    }
    signed = torch.zeros_like(u)
    for index, name in enumerate(SHAPES):
        chosen = (shape_id == index).view(-1, 1, 1)
        signed = torch.where(chosen, candidates[name], signed)
    return (0.5 - signed * radius.view(-1, 1, 1)).clamp(0, 1)


def _hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    channels = []
    for n in (5.0, 3.0, 1.0):  # standard closed form: f(n) = v - v s max(0, min(k, 4 - k, 1))
        k = torch.remainder(n + hue * 6, 6)
        channels.append(value - value * saturation * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(channels, dim=1)
