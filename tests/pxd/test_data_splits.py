"""Honest splits and real-size data: val held out of train, an optional test split, caps off by default."""

from __future__ import annotations

import logging

import pytest
import torch

from pxd.config import DatasetConfig, PipelineConfig
from pxd.data import load_dataset
from pxd.errors import ConfigError
from pxd.evaluate import evaluate
from pxd.pipeline import run_tas
from tests.pxd.test_data_cache import folder_cfg, write_jpeg_tree


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("PXD_CACHE_DIR", str(tmp_path / "pxd-cache"))


def _rows(images: torch.Tensor) -> set[bytes]:
    return {image.numpy().tobytes() for image in images}


def test_without_val_folder_a_stratified_seeded_fraction_of_train_is_held_out(tmp_path):
    tree = write_jpeg_tree(tmp_path / "data", {"train": 10})
    data = load_dataset(folder_cfg(tree, val_fraction=0.2), 0)
    assert torch.bincount(data.val.labels).tolist() == [2, 2, 2]  # stratified: 20 % of every class
    assert torch.bincount(data.train.labels).tolist() == [8, 8, 8]
    assert not _rows(data.val.images) & _rows(data.train.images)  # disjoint
    assert len(_rows(data.val.images) | _rows(data.train.images)) == 30  # and nothing lost
    assert data.test is None

    # The run's seed does not move the split (every trial validates on the same images) ...
    assert torch.equal(load_dataset(folder_cfg(tree, val_fraction=0.2), 1).val.images, data.val.images)
    # ... split_seed does, and a repeated load gives the same split.
    again = load_dataset(folder_cfg(tree, val_fraction=0.2), 0)
    assert torch.equal(again.val.images, data.val.images) and again.fingerprint == data.fingerprint
    other = load_dataset(folder_cfg(tree, val_fraction=0.2, split_seed=1), 0)
    assert _rows(other.val.images) != _rows(data.val.images) and other.fingerprint != data.fingerprint


def test_a_test_folder_becomes_the_test_split(tmp_path):
    tree = write_jpeg_tree(tmp_path / "data", {"train": 3, "val": 2, "test": 2})
    data = load_dataset(folder_cfg(tree), 0)
    assert data.test is not None and data.test.images.shape == (6, 3, 16, 16)
    assert data.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert len(data.val) == 6 and len(data.train) == 9


def test_caps_default_to_every_image_for_real_data(tmp_path, caplog):
    tree = write_jpeg_tree(tmp_path / "data", {"train": 60, "val": 30}, size=8)
    cfg = DatasetConfig(kind="imagefolder", path=str(tree), image_size=8)
    assert cfg.per_class_caps() == (0, 0) and DatasetConfig().per_class_caps() == (48, 24)
    with caplog.at_level(logging.WARNING, logger="pxd.data"):
        data = load_dataset(cfg, 0)
    assert len(data.train) == 180 and len(data.val) == 90  # more than synthetic's 48 / 24 per class
    assert data.caps == {} and "caps in force" not in caplog.text


def test_a_cap_in_force_is_printed_and_recorded(tmp_path, caplog):
    tree = write_jpeg_tree(tmp_path / "data", {"train": 5, "val": 3})
    with caplog.at_level(logging.WARNING, logger="pxd.data"):
        data = load_dataset(folder_cfg(tree, train_per_class=2), 0)
    assert torch.bincount(data.train.labels).tolist() == [2, 2, 2] and len(data.val) == 9
    assert data.caps == {"train_per_class": 2}
    assert caplog.text.count("caps in force") == 1 and "using 6 of 15 training" in caplog.text
    picks = {load_dataset(folder_cfg(tree, train_per_class=2), seed).fingerprint for seed in range(4)}
    assert len(picks) > 1  # the run's seed picks which images


def test_synthetic_keeps_its_own_sizes_and_ignores_cache_knobs():
    default = load_dataset(DatasetConfig(image_size=16, num_classes=2), 0)
    assert len(default.train) == 96 and len(default.val) == 48 and default.test is None
    knobs = DatasetConfig(image_size=16, num_classes=2, cache_dir="/elsewhere", on_bad_image="skip", val_fraction=0.3)
    assert load_dataset(knobs, 0).fingerprint == default.fingerprint


@pytest.mark.parametrize(
    "change, field",
    [
        ({"val_fraction": 1.5}, "dataset.val_fraction"),
        ({"val_fraction": 0}, "dataset.val_fraction"),
        ({"on_bad_image": "ignore"}, "dataset.on_bad_image"),
        ({"train_per_class": -1}, "dataset.train_per_class"),
        ({"val_per_class": -2}, "dataset.val_per_class"),
    ],
)
def test_new_dataset_fields_are_validated(tiny_raw, tmp_path, change, field):
    tiny_raw["dataset"] = {"kind": "imagefolder", "path": str(tmp_path), **change}
    with pytest.raises(ConfigError) as caught:
        PipelineConfig.from_dict(tiny_raw)
    assert caught.value.field == field


def _folder_run(tiny_raw, tree) -> PipelineConfig:
    tiny_raw["dataset"] = {"kind": "imagefolder", "path": str(tree), "image_size": 32}
    return PipelineConfig.from_dict(tiny_raw)


def test_test_top1_is_reported_at_the_selected_weights_when_there_is_a_test_split(tiny_raw, tmp_path):
    tree = write_jpeg_tree(tmp_path / "data", {"train": 6, "val": 3, "test": 4}, size=32)
    config = _folder_run(tiny_raw, tree)
    result = run_tas(config, measure_latency=False)
    data = load_dataset(config.dataset, config.seed)
    expected = evaluate(result.student, data.test, resolution=16, image_resolution=32, eval_crop=1.0,
                        batch_size=8, device=torch.device("cpu"))
    assert result.metrics["test_top1"] == pytest.approx(expected)
    assert result.metrics["val_top1"] == result.stages["student"].result.metrics["val_top1"]


def test_test_top1_is_absent_without_a_test_split(tiny_raw, tmp_path):
    tree = write_jpeg_tree(tmp_path / "data", {"train": 6, "val": 3}, size=32)
    result = run_tas(_folder_run(tiny_raw, tree), measure_latency=False)
    assert "test_top1" not in result.metrics and "val_top1" in result.metrics

