"""The data layer: synthetic set, local datasets, batches and two-view sampling. CPU, tiny, seeded."""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pxd.config import DatasetConfig
from pxd.data import TwoViewSampler, iterate_batches, load_cifar, load_dataset, load_imagefolder
from pxd.data.synthetic import make_synthetic
from pxd.data.views import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from pxd.errors import DatasetError
from pxd.types import ImageSet


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """Decoded datasets go to a per-test cache, never to the user's ~/.cache."""
    monkeypatch.setenv("PXD_CACHE_DIR", str(tmp_path / "pxd-cache"))

# ---------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_same_seed_same_bytes_and_different_seed_different_images():
    cfg = DatasetConfig(image_size=32, num_classes=4, train_per_class=5, val_per_class=3)
    first, again, other = make_synthetic(cfg, 0), make_synthetic(cfg, 0), make_synthetic(cfg, 1)
    assert torch.equal(first.train.images, again.train.images)
    assert torch.equal(first.val.images, again.val.images)
    assert first.fingerprint == again.fingerprint
    assert not torch.equal(first.train.images, other.train.images)
    assert first.fingerprint != other.fingerprint
    bigger = make_synthetic(dataclasses.replace(cfg, image_size=48), 0)
    assert bigger.fingerprint != first.fingerprint


def test_synthetic_shapes_dtypes_balance_and_names():
    cfg = DatasetConfig(image_size=40, num_classes=5, train_per_class=6, val_per_class=3, eval_crop=0.875)
    data = make_synthetic(cfg, 3)
    assert data.train.images.shape == (30, 3, 40, 40) and data.val.images.shape == (15, 3, 40, 40)
    assert data.train.images.dtype == torch.uint8 and data.train.labels.dtype == torch.int64
    assert data.train.images.is_contiguous()
    assert torch.bincount(data.train.labels).tolist() == [6] * 5
    assert torch.bincount(data.val.labels).tolist() == [3] * 5
    assert data.classes[:2] == ["circle-h", "circle-v"] and len(set(data.classes)) == 5
    assert data.num_classes == 5 and data.eval_crop == 0.875
    # Images use the range, not a constant: background, object and noise.
    assert data.train.images.float().std() > 20


def test_synthetic_val_does_not_depend_on_train_size():
    cfg = DatasetConfig(image_size=32, num_classes=2, train_per_class=4, val_per_class=4)
    small, large = make_synthetic(cfg, 0), make_synthetic(dataclasses.replace(cfg, train_per_class=9), 0)
    assert torch.equal(small.val.images, large.val.images)


# The synthetic set's resolution properties (cue attenuated, not erased): tests/pxd/test_synthetic.py


def test_load_dataset_dispatches_on_kind():
    cfg = DatasetConfig(image_size=16, num_classes=2, train_per_class=2, val_per_class=2)
    assert torch.equal(load_dataset(cfg, 5).train.images, make_synthetic(cfg, 5).train.images)


# ---------------------------------------------------------------------------------------------
# ImageFolder

CLASS_COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "fish": (30, 30, 200)}


def _write_tree(root: Path, per_class: dict[str, int]) -> Path:
    for split in ("train", "val"):
        for name, colour in CLASS_COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(per_class[split]):
                suffix = ".png" if index % 2 == 0 else ".jpg"
                Image.new("RGB", (20, 30), colour).save(folder / f"img_{index:02d}{suffix}")
    return root


@pytest.fixture
def image_tree(tmp_path):
    return _write_tree(tmp_path / "data", {"train": 4, "val": 2})


def _folder_cfg(path: Path, **overrides) -> DatasetConfig:
    fields = {"image_size": 16, "train_per_class": 0, "val_per_class": 0, **overrides}
    return DatasetConfig(kind="imagefolder", path=str(path), **fields)


def test_imagefolder_loads_classes_labels_and_pixels(image_tree):
    data = load_dataset(_folder_cfg(image_tree, eval_crop=0.9), 0)
    assert data.classes == ["cat", "dog", "fish"] and data.eval_crop == 0.9
    assert data.train.images.shape == (12, 3, 16, 16) and data.train.images.dtype == torch.uint8
    assert data.val.images.shape == (6, 3, 16, 16)
    assert torch.bincount(data.train.labels).tolist() == [4, 4, 4]
    for split in (data.train, data.val):
        for image, label in zip(split.images, split.labels):
            colour = torch.tensor(CLASS_COLOURS[data.classes[label]], dtype=torch.float32)
            assert (image.float().mean((1, 2)) - colour).abs().max() < 8  # JPEG is close, not exact


def test_imagefolder_resizes_shorter_side_then_crops_the_centre(tmp_path):
    root = _write_tree(tmp_path / "data", {"train": 1, "val": 1})
    wide = Image.new("RGB", (40, 20), (0, 255, 0))  # green centre half, red/blue outer quarters
    wide.paste((255, 0, 0), (0, 0, 10, 20))
    wide.paste((0, 0, 255), (30, 0, 40, 20))
    wide.save(root / "train" / "cat" / "img_00.png")
    image = load_imagefolder(_folder_cfg(root), 0).train.images[0]
    # Shorter side 20 → 16, so 40 → 32 and the centre 16 columns are the green half: no squashing.
    assert image[1, :, 2:-2].min() > 200 and image[0, :, 2:-2].max() < 40 and image[2, :, 2:-2].max() < 40


def test_imagefolder_caps_per_class_deterministically(image_tree):
    cfg = _folder_cfg(image_tree, train_per_class=3, val_per_class=1)
    first, again = load_imagefolder(cfg, 0), load_imagefolder(cfg, 0)
    assert torch.bincount(first.train.labels).tolist() == [3, 3, 3]
    assert torch.bincount(first.val.labels).tolist() == [1, 1, 1]
    assert torch.equal(first.train.images, again.train.images) and first.fingerprint == again.fingerprint
    picks = {load_imagefolder(cfg, seed).fingerprint for seed in range(6)}
    assert len(picks) > 1  # the seed chooses which images


def test_imagefolder_fingerprint_changes_when_a_file_changes(image_tree):
    cfg = _folder_cfg(image_tree)
    before = load_imagefolder(cfg, 0).fingerprint
    assert load_imagefolder(cfg, 0).fingerprint == before
    target = image_tree / "val" / "dog" / "img_00.png"
    Image.new("RGB", (20, 30), (1, 2, 3)).save(target)
    os.utime(target, ns=(1_000_000_000, 1_000_000_000))
    assert load_imagefolder(cfg, 0).fingerprint != before
    assert load_imagefolder(dataclasses.replace(cfg, image_size=8), 0).fingerprint != before


def _expect_dataset_error(cfg: DatasetConfig, *needles: str) -> str:
    with pytest.raises(DatasetError) as caught:
        load_dataset(cfg, 0)
    assert caught.value.field == "dataset.path"
    for needle in needles:
        assert needle in str(caught.value)
    return str(caught.value)


def test_imagefolder_missing_train_names_the_layout(image_tree):
    (image_tree / "train").rename(image_tree / "training")
    _expect_dataset_error(_folder_cfg(image_tree), "no train/ folder", "train/", "<class_a>/")


def test_imagefolder_class_mismatch_names_the_classes(image_tree):
    (image_tree / "val" / "fish").rename(image_tree / "val" / "bird")
    _expect_dataset_error(_folder_cfg(image_tree), "missing in val/: ['fish']", "only in val/: ['bird']")


def test_imagefolder_empty_class_folder_is_named(image_tree):
    for image in (image_tree / "train" / "dog").iterdir():
        image.unlink()
    _expect_dataset_error(_folder_cfg(image_tree), str(image_tree / "train" / "dog"), "no images")


def test_imagefolder_unreadable_image_is_named(image_tree):
    broken = image_tree / "train" / "cat" / "img_99.jpg"
    broken.write_bytes(b"not a jpeg")
    _expect_dataset_error(_folder_cfg(image_tree), "cannot read image", str(broken))


def test_imagefolder_missing_path(tmp_path):
    _expect_dataset_error(_folder_cfg(tmp_path / "nowhere"), "not a folder", "expected layout")


# ---------------------------------------------------------------------------------------------
# CIFAR (python pickle format)


def _cifar_batch(count: int, num_classes: int, start: int, label_key: str) -> dict:
    labels = [(start + i) % num_classes for i in range(count)]
    # Image i: channel c is filled with (2·label + c); checks the [N, 3072] → [N, 3, 32, 32] layout.
    data = np.stack([np.repeat(np.array([2 * lab + c for c in range(3)], np.uint8), 1024) for lab in labels])
    return {"data": data, label_key: labels, "batch_label": "fake"}


def _write_pickle(path: Path, content) -> None:
    with path.open("wb") as handle:
        pickle.dump(content, handle)


def _write_cifar10(folder: Path, per_batch: int = 4) -> Path:
    folder.mkdir(parents=True)
    for index in range(1, 6):
        _write_pickle(folder / f"data_batch_{index}", _cifar_batch(per_batch, 10, per_batch * index, "labels"))
    _write_pickle(folder / "test_batch", _cifar_batch(10, 10, 0, "labels"))
    _write_pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    return folder


def test_cifar10_test_batch_becomes_test_val_comes_from_train_and_parent_folder_works(tmp_path):
    _write_cifar10(tmp_path / "cifar-10-batches-py")
    for path in (tmp_path, tmp_path / "cifar-10-batches-py"):
        cfg = DatasetConfig(kind="cifar10", path=str(path), val_fraction=0.5)
        data = load_dataset(cfg, 0)
        # 20 training images, 2 per class: half of each class is held out as val.
        assert data.train.images.shape == (10, 3, 32, 32) and data.val.images.shape == (10, 3, 32, 32)
        assert data.test is not None and data.test.images.shape == (10, 3, 32, 32)
        assert torch.bincount(data.val.labels, minlength=10).tolist() == [1] * 10
        assert data.classes == [f"class{i}" for i in range(10)]
        assert data.test.labels.tolist() == list(range(10))
        for split in (data.train, data.val, data.test):
            expected = split.labels.view(-1, 1) * 2 + torch.arange(3).view(1, 3)
            assert torch.equal(split.images[:, :, 5, 7].long(), expected)


def test_cifar_caps_and_fingerprint(tmp_path):
    folder = _write_cifar10(tmp_path / "c10", per_batch=8)  # 4 training images per class
    cfg = DatasetConfig(kind="cifar10", path=str(folder), train_per_class=2, val_per_class=1, val_fraction=0.5)
    data = load_cifar(cfg, 0, 10)
    assert torch.bincount(data.train.labels, minlength=10).tolist() == [2] * 10  # 2 left after holding out 2
    assert torch.bincount(data.val.labels, minlength=10).tolist() == [1] * 10
    assert len(data.test) == 10  # the test set is never capped
    assert data.caps == {"train_per_class": 2, "val_per_class": 1}
    before = data.fingerprint
    _write_pickle(folder / "test_batch", _cifar_batch(20, 10, 0, "labels"))
    os.utime(folder / "test_batch", ns=(1_000_000_000, 1_000_000_000))
    assert load_cifar(cfg, 0, 10).fingerprint != before


def test_cifar100_layout(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _write_pickle(folder / "train", _cifar_batch(200, 100, 0, "fine_labels"))
    _write_pickle(folder / "test", _cifar_batch(100, 100, 0, "fine_labels"))
    _write_pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": []})
    data = load_dataset(DatasetConfig(kind="cifar100", path=str(tmp_path)), 0)
    assert data.num_classes == 100 and len(data.train) + len(data.val) == 200 and len(data.test) == 100
    assert torch.bincount(data.val.labels, minlength=100).tolist() == [1] * 100  # 2 per class: one held out


def test_cifar_missing_batch_is_named(tmp_path):
    folder = _write_cifar10(tmp_path / "c10")
    (folder / "data_batch_3").unlink()
    cfg = DatasetConfig(kind="cifar10", path=str(folder))
    _expect_dataset_error(cfg, "missing data_batch_3", "test_batch", "batches.meta")


class _OpensAFile:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_cifar_pickle_cannot_run_code(tmp_path):
    folder = _write_cifar10(tmp_path / "c10")
    marker = tmp_path / "written-by-pickle"
    _write_pickle(folder / "test_batch", {"data": _OpensAFile(str(marker)), "labels": []})
    _expect_dataset_error(DatasetConfig(kind="cifar10", path=str(folder)), "test_batch", "refusing")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# batches


def _numbered_set(count: int) -> ImageSet:
    images = torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1).expand(count, 3, 4, 4).contiguous()
    return ImageSet(images=images, labels=torch.arange(count))


def test_eval_batches_keep_order_and_the_last_partial_batch():
    batches = list(iterate_batches(_numbered_set(9), 4, shuffle=False, device="cpu"))
    assert [len(labels) for _, labels in batches] == [4, 4, 1]
    assert torch.cat([labels for _, labels in batches]).tolist() == list(range(9))
    assert all(torch.equal(images[:, 0, 0, 0].long(), labels) for images, labels in batches)


def test_training_batches_shuffle_with_the_generator_and_drop_a_single_leftover():
    def order(seed: int, count: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        batches = list(iterate_batches(_numbered_set(count), 4, shuffle=True, generator=generator))
        assert all(len(labels) >= 2 for _, labels in batches)
        return torch.cat([labels for _, labels in batches]).tolist()

    assert order(0, 9) == order(0, 9) and len(order(0, 9)) == 8  # 4 + 4, the single leftover dropped
    assert sorted(order(0, 10)) == list(range(10))  # a leftover of two is kept
    assert order(0, 10) != order(1, 10) and order(0, 10) != list(range(10))


# ---------------------------------------------------------------------------------------------
# two views


def _coordinate_images(count: int, height: int = 64, width: int = 64) -> torch.Tensor:
    """Channel 0 = x, channel 1 = y (0..255 across the image), channel 2 = 128."""
    x = torch.linspace(0, 255, width).view(1, width).expand(height, width)
    y = torch.linspace(0, 255, height).view(height, 1).expand(height, width)
    image = torch.stack([x, y, torch.full_like(x, 128)]).round().to(torch.uint8)
    return image.unsqueeze(0).expand(count, 3, height, width).contiguous()


def _unnormalise(view: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return (view * std + mean) * 255


def _crop_geometry(view: torch.Tensor) -> torch.Tensor:
    """Per image: centre x, centre y, x span (negative when flipped), y span, in ramp units (0..255).

    Spans come from the slope between the second and the second-to-last pixel (the outermost ones
    are biased by clamping at the border) times the view's size: the width of the crop it shows.
    """
    pixels = _unnormalise(view)
    x, y = pixels[:, 0], pixels[:, 1]
    size = view.shape[-1]
    span_x = (x[:, :, -2] - x[:, :, 1]).mean(1) / (size - 3) * size
    span_y = (y[:, -2] - y[:, 1]).mean(1) / (size - 3) * size
    return torch.stack([x.mean((1, 2)), y.mean((1, 2)), span_x, span_y], 1)


def test_views_have_the_requested_shapes_and_are_seeded():
    images = _coordinate_images(6)
    sampler = TwoViewSampler(48, 12, train=True)
    teacher, student = sampler(images, torch.Generator().manual_seed(0))
    assert teacher.shape == (6, 3, 48, 48) and student.shape == (6, 3, 12, 12)
    assert teacher.dtype == torch.float32 and student.dtype == torch.float32
    again = sampler(images, torch.Generator().manual_seed(0))
    assert torch.equal(teacher, again[0]) and torch.equal(student, again[1])
    other = sampler(images, torch.Generator().manual_seed(1))
    assert not torch.equal(teacher, other[0])


def test_both_views_show_the_same_crop_and_flip():
    images = _coordinate_images(32)
    teacher, student = TwoViewSampler(64, 16, train=True)(images, torch.Generator().manual_seed(3))
    teacher_geometry, student_geometry = _crop_geometry(teacher), _crop_geometry(student)
    # Centres agree to a couple of grey levels; extents shrink by the ramp lost at the view's edge pixels.
    assert (teacher_geometry[:, :2] - student_geometry[:, :2]).abs().max() < 2.5
    assert torch.equal(teacher_geometry[:, 2] > 0, student_geometry[:, 2] > 0)
    assert ((student_geometry[:, 2:] / teacher_geometry[:, 2:] - 1).abs() < 0.03).all()
    # A different image's crop would not match: the crops themselves vary a lot.
    assert teacher_geometry[:, 0].std() > 10
    flipped = teacher_geometry[:, 2] < 0
    assert 0 < flipped.sum() < 32  # flips happen, not always
    # Crop area within scale (0.35, 1) of the 64 × 64 image (the ramp rises 255 over 63 pixels).
    crop_w, crop_h = teacher_geometry[:, 2].abs() * 63 / 255, teacher_geometry[:, 3] * 63 / 255
    area = crop_w * crop_h / 64**2
    assert (area > 0.34).all() and (area < 1.01).all()
    assert ((crop_w / crop_h > 0.74) & (crop_w / crop_h < 1.35)).all()


def test_student_view_is_the_antialiased_downsample_of_the_teacher_view():
    stripes = torch.zeros(2, 3, 64, 64, dtype=torch.uint8)
    stripes[:, :, ::2] = 255  # period-2 stripes: must average away at half size, not alias
    for train in (False, True):
        teacher, student = TwoViewSampler(64, 32, train=train, scale=(1.0, 1.0), ratio=(1.0, 1.0))(
            stripes, torch.Generator().manual_seed(0)
        )
        expected = F.interpolate(_unnormalise(teacher), size=32, mode="bilinear", antialias=True)
        assert torch.allclose(_unnormalise(student), expected, atol=1e-3)
        # Interior rows only: at the border the filter is cut off and renormalised (as in PIL).
        assert (_unnormalise(student)[:, :, 1:-1] - 127.5).abs().max() < 1


def test_eval_view_is_a_deterministic_centre_crop():
    images = _coordinate_images(3, height=48, width=80)
    sampler = TwoViewSampler(32, 16, train=False, eval_crop=0.5)
    teacher, student = sampler(images)
    assert torch.equal(teacher, sampler(images)[0]) and torch.equal(teacher[0], teacher[2])
    geometry = _crop_geometry(teacher)
    assert (geometry[:, 0] - 127.5).abs().max() < 1 and (geometry[:, 1] - 127.5).abs().max() < 1
    # Side = 0.5 × 48 px = 24 px; the x ramp rises 255 over 79 px, the y ramp over 47 px.
    assert (geometry[:, 2] - 24 * 255 / 79).abs().max() < 1 and (geometry[:, 3] - 24 * 255 / 47).abs().max() < 1
    assert student.shape == (3, 3, 16, 16)


def test_eval_at_native_size_is_the_image_and_equal_resolutions_share_the_view():
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    teacher, student = TwoViewSampler(16, 16, train=False)(images)
    assert torch.allclose(_unnormalise(teacher), images.float(), atol=1e-3)
    assert torch.equal(teacher, student)


def test_normalisation_matches_timm():
    from timm.data import IMAGENET_DEFAULT_MEAN as timm_mean
    from timm.data import IMAGENET_DEFAULT_STD as timm_std

    assert IMAGENET_DEFAULT_MEAN == timm_mean and IMAGENET_DEFAULT_STD == timm_std
