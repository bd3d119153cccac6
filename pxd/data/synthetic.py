"""The embedded synthetic dataset: procedural, seeded, and fair to pixel distillation.

A class is a combination of attributes, so classes share them and a teacher's soft targets carry
real similarity information (`circle-h` is closer to `circle-v` than to `square-v`):

- **shape** (coarse: a circle, a square, ...) with its own hue: visible at any resolution;
- **texture orientation** (fine): two superposed sinusoidal gratings on the object, both horizontal
  (`-h`) or both vertical (`-v`), with periods of `GRATINGS` × `image_size` (5.1 px and 10.2 px at
  64 px) jittered per image, under pixel noise and a random background gradient.

Downsampling *attenuates* the orientation cue but never erases it. At 64 px both gratings are clear.
At 32 px (2× fewer pixels per side) the fine one sits just above the Nyquist limit (2.6 px) and is
attenuated, the coarse one is plain but faint; at 16 px the fine one aliases away and the coarse one
is the attenuated one (2.6 px). So each halving of the side keeps a weaker, noisier version of the
cue: cross-entropy at a short budget learns it poorly, with 10× the images it nearly reaches the
ceiling, and a teacher that sees it clearly can say what the student's faint input means
(`bench/distillation.py`; its figures are in docs/benchmarks.md). `make_synthetic` keeps the
`DatasetConfig` knobs (`image_size`, `num_classes`, `train_per_class`, `val_per_class`).

Labels are ``shape · 2 + orientation``: ``num_classes`` 8 is 4 shapes × 2 orientations; an odd count
leaves the last shape with one orientation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import torch

from pxd.sections import DatasetConfig
from pxd.types import DatasetSplits, ImageSet

__all__ = ["GENERATOR_VERSION", "SHAPES", "ORIENTATIONS", "GRATINGS", "make_synthetic", "synthetic_class_names"]

# Bump when the images a (config, seed) produces change: it is part of the fingerprint.
GENERATOR_VERSION = "pxd-synthetic-v3"
SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross")
ORIENTATIONS = ("h", "v")
# (period as a fraction of image_size (±10 % per image, both gratings alike), amplitude): 5.1 px and
# 10.2 px at 64 px, so the cue is near the Nyquist limit, attenuated, at 32 px for one and 16 px for the
# other; neither is so fine that it aliases away at a quarter of the side, where no amount of data would
# teach cross-entropy the cue
GRATINGS = ((0.08, 0.10), (0.16, 0.10))
_PERIOD_JITTER = 0.10
_NOISE_STD = 0.06
_GOLDEN = 0.6180339887


def synthetic_class_names(num_classes: int) -> list[str]:
    """Readable names, e.g. `circle-h`; class 2s and 2s+1 share shape s (and its hue)."""
    names = []
    for label in range(num_classes):
        shape_index = label // len(ORIENTATIONS)
        shape = SHAPES[shape_index % len(SHAPES)]
        if shape_index >= len(SHAPES):  # shapes repeat with another hue once they run out
            shape = f"{shape}{shape_index // len(SHAPES) + 1}"
        names.append(f"{shape}-{ORIENTATIONS[label % len(ORIENTATIONS)]}")
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
    shape_index = labels // len(ORIENTATIONS)
    orientation = labels % len(ORIENTATIONS)

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return torch.empty(count, *shape).uniform_(low, high, generator=gen)

    radius = uniform(0.24, 0.34) * size
    centre_x = radius + uniform(0.0, 1.0) * (size - 2 * radius)
    centre_y = radius + uniform(0.0, 1.0) * (size - 2 * radius)
    hue = (shape_index.double() * _GOLDEN % 1.0).float() + uniform(-0.03, 0.03)
    colour = _hsv_to_rgb(hue % 1.0, uniform(0.45, 0.75), uniform(0.5, 0.8))  # [N, 3]
    background_level = uniform(0.15, 0.85)
    gradient_angle = uniform(0.0, 2 * math.pi)
    gradient_strength = uniform(-0.15, 0.15)
    jitter = 1 + uniform(-_PERIOD_JITTER, _PERIOD_JITTER)
    phases = [uniform(0.0, 2 * math.pi) for _ in GRATINGS]
    noise = torch.randn(count, 3, size, size, generator=gen) * _NOISE_STD

    coords = torch.arange(size, dtype=torch.float32)
    ys = coords.view(1, size, 1).expand(count, size, size)
    xs = coords.view(1, 1, size).expand(count, size, size)
    u = (xs - centre_x.view(-1, 1, 1)) / radius.view(-1, 1, 1)
    v = (ys - centre_y.view(-1, 1, 1)) / radius.view(-1, 1, 1)

    # Background: grey level plus a linear gradient in a random direction, from -1 to 1 across the image.
    ramp = (xs * torch.cos(gradient_angle).view(-1, 1, 1) + ys * torch.sin(gradient_angle).view(-1, 1, 1)) / size
    background = (background_level.view(-1, 1, 1) + gradient_strength.view(-1, 1, 1) * 2 * ramp).unsqueeze(1)

    alpha = _shape_alpha(shape_index % len(SHAPES), u, v, radius).unsqueeze(1)  # [N, 1, S, S]
    image = background * (1 - alpha) + colour.view(-1, 3, 1, 1) * alpha

    across = torch.where(orientation.view(-1, 1, 1) == 0, ys, xs)  # h gratings vary along y
    grating = torch.zeros_like(across)
    for (period_fraction, amplitude), phase in zip(GRATINGS, phases):
        period = (period_fraction * size * jitter).view(-1, 1, 1)
        grating = grating + amplitude * torch.sin(2 * math.pi * across / period + phase.view(-1, 1, 1))
    # A smooth envelope (not the hard shape mask) has no low-frequency side lobes that would leak the
    # orientation into a downsample by some other route than the attenuated grating itself.
    envelope = torch.exp(-(u * u + v * v) / (2 * 0.55**2))
    image = image + (envelope * grating).unsqueeze(1) + noise

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
