"""Datasets as uint8 tensors (real ones mapped from a per-machine on-disk cache), and two-view sampling."""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Iterator
from contextlib import contextmanager

from pxd.data.cache import cache_root
from pxd.data.cifar import cifar_layout, load_cifar
from pxd.data.folder import imagefolder_layout, load_imagefolder
from pxd.data.synthetic import make_synthetic
from pxd.data.views import TwoViewSampler, iterate_batches
from pxd.errors import ConfigError
from pxd.sections import DatasetConfig
from pxd.types import DatasetSplits

__all__ = [
    "load_dataset",
    "check_dataset",
    "cache_root",
    "make_synthetic",
    "load_imagefolder",
    "load_cifar",
    "TwoViewSampler",
    "iterate_batches",
]


def load_dataset(cfg: DatasetConfig, seed: int, *, progress: bool | None = None) -> DatasetSplits:
    """The splits `cfg` describes; `seed` drives generation (synthetic) and per-class caps.

    Real datasets are decoded into the on-disk cache the first time (with a progress bar when
    `progress`, default: stderr is a terminal) and mapped read-only afterwards.
    """
    if cfg.kind == "synthetic":
        train, val = cfg.per_class_caps()
        # make_synthetic hashes its whole config: knobs it ignores are reset so they cannot split its
        # fingerprint (and the stage keys), and unset sizes become the synthetic defaults.
        sized = dataclasses.replace(cfg, train_per_class=train, val_per_class=val, cache_dir=None,
                                    val_fraction=DatasetConfig.val_fraction, split_seed=DatasetConfig.split_seed,
                                    on_bad_image=DatasetConfig.on_bad_image)
        return make_synthetic(sized, seed)
    with _cyclic_gc_paused():
        if cfg.kind == "imagefolder":
            return load_imagefolder(cfg, seed, progress=progress)
        if cfg.kind == "cifar10":
            return load_cifar(cfg, seed, num_classes=10, progress=progress)
        if cfg.kind == "cifar100":
            return load_cifar(cfg, seed, num_classes=100, progress=progress)
    raise ConfigError("dataset.kind", f"unknown {cfg.kind!r}; use one of synthetic, imagefolder, cifar10, cifar100")


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Listing a dataset makes one small tuple per image; with torch loaded, the cyclic collector it keeps
    triggering walks every live object and makes that ~20× slower. Refcounting still frees everything."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def check_dataset(cfg: DatasetConfig) -> None:
    """The loaders' layout checks without decoding: a bad path fails before any compute is launched."""
    if cfg.kind == "imagefolder":
        imagefolder_layout(cfg)
    elif cfg.kind in ("cifar10", "cifar100"):
        cifar_layout(cfg, num_classes=10 if cfg.kind == "cifar10" else 100)
