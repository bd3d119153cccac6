"""Opt-in: the ImageFolder loader on the real photos in ../shared/datasets (skipped when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pxd.config import DatasetConfig
from pxd.data import load_dataset

DATASETS = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


def _root(name: str) -> Path:
    root = DATASETS / name
    if not root.is_dir():
        pytest.skip(f"{root} is absent (real photos are optional; see ../shared/datasets/README.md)")
    return root


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("PXD_CACHE_DIR", str(tmp_path / "pxd-cache"))


@pytest.mark.datasets
@pytest.mark.parametrize("name, classes, size", [("flowers128", 5, 128), ("eurosat64", 10, 64)])
def test_real_imagefolder_loads(name, classes, size):
    cfg = DatasetConfig(kind="imagefolder", path=str(_root(name)), image_size=size, train_per_class=3, val_per_class=2)
    data = load_dataset(cfg, seed=0)
    assert data.num_classes == classes
    assert data.train.images.shape == (3 * classes, 3, size, size)
    assert data.val.images.shape == (2 * classes, 3, size, size)
    assert sorted(set(data.train.labels.tolist())) == list(range(classes))
    assert data.train.images.float().std() > 10, "decoded photos, not blank tensors"


@pytest.mark.datasets
def test_real_imagefolder_uses_every_image_by_default_and_maps_it_the_second_time():
    cfg = DatasetConfig(kind="imagefolder", path=str(_root("eurosat64")), image_size=64)
    first = load_dataset(cfg, seed=0)
    assert len(first.train) == 4000 and len(first.val) == 1000 and first.caps == {}
    second = load_dataset(cfg, seed=1)
    assert second.fingerprint == first.fingerprint
    assert second.train.images[1234].float().std() > 10 and (second.val.images[-1] == first.val.images[-1]).all()
