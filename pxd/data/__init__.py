"""Datasets decoded once into uint8 tensors, and the two-view sampling pixel distillation trains on."""

from __future__ import annotations

from pxd.config import DatasetConfig
from pxd.data.folder import cifar_layout, imagefolder_layout, load_cifar, load_imagefolder
from pxd.data.synthetic import make_synthetic
from pxd.data.views import TwoViewSampler, iterate_batches
from pxd.errors import ConfigError
from pxd.types import DatasetSplits

__all__ = ["load_dataset", "check_dataset", "make_synthetic", "load_imagefolder", "load_cifar", "TwoViewSampler", "iterate_batches"]


def load_dataset(cfg: DatasetConfig, seed: int) -> DatasetSplits:
    """The train and val splits `cfg` describes; `seed` drives generation (synthetic) and per-class caps."""
    if cfg.kind == "synthetic":
        return make_synthetic(cfg, seed)
    if cfg.kind == "imagefolder":
        return load_imagefolder(cfg, seed)
    if cfg.kind == "cifar10":
        return load_cifar(cfg, seed, num_classes=10)
    if cfg.kind == "cifar100":
        return load_cifar(cfg, seed, num_classes=100)
    raise ConfigError("dataset.kind", f"unknown {cfg.kind!r}; use one of synthetic, imagefolder, cifar10, cifar100")


def check_dataset(cfg: DatasetConfig) -> None:
    """The loaders' layout checks without decoding: a bad path fails before any compute is launched."""
    if cfg.kind == "imagefolder":
        imagefolder_layout(cfg)
    elif cfg.kind in ("cifar10", "cifar100"):
        cifar_layout(cfg, num_classes=10 if cfg.kind == "cifar10" else 100)
