"""The on-disk dataset cache: decoded once, mapped read-only, race-safe, never read when stale or partial."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pxd.data.cache as cache_module
import pxd.data.folder as folder_module
from pxd.config import DatasetConfig, PipelineConfig
from pxd.data import TwoViewSampler, iterate_batches, load_dataset
from pxd.data.cache import MARKER
from pxd.errors import DatasetError
from pxd.stages import stage_keys

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("ant", "bee", "cow")


def write_jpeg_tree(root: Path, per_class: dict[str, int], size: int = 24, seed: int = 0) -> Path:
    """A tiny ImageFolder of seeded noise JPEGs (each file different, so each decode is real work)."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8) // 4 + 60 * label
                Image.fromarray(pixels).save(folder / f"{name}_{index:03d}.jpg", quality=90)
    return root


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("PXD_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def tree(tmp_path) -> Path:
    return write_jpeg_tree(tmp_path / "data", {"train": 4, "val": 2})


@pytest.fixture
def decode_calls(monkeypatch) -> list[Path]:
    """Every image decode, recorded."""
    calls: list[Path] = []
    real = folder_module.decode_image

    def counting(path: Path, size: int):
        calls.append(path)
        return real(path, size)

    monkeypatch.setattr(folder_module, "decode_image", counting)
    return calls


def folder_cfg(path: Path, **overrides) -> DatasetConfig:
    return DatasetConfig(kind="imagefolder", path=str(path), **{"image_size": 16, **overrides})


def cache_entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.iterdir() if p.is_dir() and p.name not in ("file-hashes", "cifar-labels"))


def test_decoded_once_then_mapped_read_only(tree, cache_dir, decode_calls):
    first = load_dataset(folder_cfg(tree), 0)
    assert len(decode_calls) == 18  # 3 classes × (4 train + 2 val)
    (entry,) = cache_entries(cache_dir)
    marker_mtime = (entry / MARKER).stat().st_mtime_ns
    assert (entry / "train.u8").stat().st_size == 12 * 3 * 16 * 16

    second = load_dataset(folder_cfg(tree), 0)
    assert len(decode_calls) == 18, "the second load must map the cache, not decode"
    assert (entry / MARKER).stat().st_mtime_ns == marker_mtime
    assert second.fingerprint == first.fingerprint
    for split in ("train", "val"):
        assert torch.equal(getattr(first, split).images, getattr(second, split).images)
        assert torch.equal(getattr(first, split).labels, getattr(second, split).labels)
    # The tensors are views of the read-only mapping of the cache file, not copies.
    assert _mapping_of(second.train.images.data_ptr()) == (str(entry / "train.u8"), "r")
    assert second.train.images.is_contiguous() and second.train.images.dtype == torch.uint8
    # Training reads it as before: batches and two views come out right.
    images, labels = next(iterate_batches(second.train, 5, shuffle=True, generator=torch.Generator().manual_seed(0)))
    teacher, student = TwoViewSampler(16, 8, train=True)(images, torch.Generator().manual_seed(0))
    assert teacher.shape == (5, 3, 16, 16) and student.shape == (5, 3, 8, 8) and torch.isfinite(teacher).all()


def _mapping_of(address: int) -> tuple[str, str]:
    """(file, r/w) of the memory mapping holding `address`, from /proc/self/maps."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux)")
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, stop = (int(bound, 16) for bound in fields[0].split("-"))
        if start <= address < stop:
            return (fields[5] if len(fields) > 5 else ""), fields[1][:2].replace("-", "")
    return "", ""


def test_decoded_pixels_match_a_direct_decode(tree, cache_dir):
    data = load_dataset(folder_cfg(tree), 0)
    path = tree / "val" / "bee" / "bee_001.jpg"
    direct = folder_module.decode_image(path, 16)
    assert torch.equal(data.val.images[3], torch.from_numpy(direct))  # val: ant 0-1, bee 0-1, ...
    assert data.val.labels.tolist() == [0, 0, 1, 1, 2, 2]


_RACER = textwrap.dedent(
    """
    import hashlib, json, sys, time
    from pathlib import Path
    import pxd.data.folder as folder_module
    from pxd.config import DatasetConfig
    from pxd.data import load_dataset

    tree, ready_dir, me = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    calls = []
    real = folder_module.decode_image
    def slow(path, size):
        calls.append(path)
        time.sleep(0.05)  # long enough that the other process arrives mid-build
        return real(path, size)
    folder_module.decode_image = slow
    (ready_dir / me).touch()
    deadline = time.time() + 60
    while len(list(ready_dir.iterdir())) < 2 and time.time() < deadline:
        time.sleep(0.01)
    data = load_dataset(DatasetConfig(kind="imagefolder", path=str(tree), image_size=16), 0)
    digest = hashlib.sha256()
    for split in (data.train, data.val):
        digest.update(split.images.numpy().tobytes())
        digest.update(split.labels.numpy().tobytes())
    print(json.dumps({"decoded": len(calls), "sha": digest.hexdigest(), "fingerprint": data.fingerprint}))
    """
)


def test_two_processes_racing_build_once_and_read_the_same_data(tree, cache_dir, tmp_path):
    ready = tmp_path / "ready"
    ready.mkdir()
    env = {**os.environ, "PXD_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(REPO)}
    racers = [
        subprocess.Popen([sys.executable, "-c", _RACER, str(tree), str(ready), name], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in ("a", "b")
    ]
    results = []
    for racer in racers:
        out, err = racer.communicate(timeout=180)
        assert racer.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["decoded"] for r in results) == [0, 18], results  # one built, the other waited and mapped
    assert results[0]["sha"] == results[1]["sha"] and results[0]["fingerprint"] == results[1]["fingerprint"]
    assert len(cache_entries(cache_dir)) == 1  # no building-* folder left behind


def _entry_after_first_load(tree: Path, cache_dir: Path) -> tuple[Path, torch.Tensor]:
    data = load_dataset(folder_cfg(tree), 0)
    (entry,) = cache_entries(cache_dir)
    return entry, data.train.images.clone()


def test_a_half_written_cache_is_never_read(tree, cache_dir, decode_calls, caplog):
    entry, expected = _entry_after_first_load(tree, cache_dir)
    (entry / MARKER).unlink()  # as if the builder died before finishing
    (entry / "train.u8").write_bytes(b"\0" * (entry / "train.u8").stat().st_size)
    decode_calls.clear()
    with caplog.at_level(logging.WARNING, logger="pxd.data"):
        again = load_dataset(folder_cfg(tree), 0)
    assert len(decode_calls) == 18
    assert torch.equal(again.train.images, expected)
    assert "did not finish" in caplog.text


def test_a_build_left_by_a_crashed_process_is_cleaned_up(tree, cache_dir, decode_calls):
    entry, expected = _entry_after_first_load(tree, cache_dir)
    leftover = entry.with_name(f"{entry.name}.building-99999")
    shutil.copytree(entry, leftover)
    shutil.rmtree(entry)
    again = load_dataset(folder_cfg(tree), 0)
    assert torch.equal(again.train.images, expected)
    assert not leftover.exists() and cache_entries(cache_dir) == [entry]


@pytest.mark.parametrize("field, value", [("format", 0), ("fingerprint", "0" * 64), ("pxd_version", "0.0.0-other")])
def test_a_cache_from_another_version_or_other_data_is_never_used(tree, cache_dir, decode_calls, field, value):
    entry, expected = _entry_after_first_load(tree, cache_dir)
    marker = json.loads((entry / MARKER).read_text())
    marker[field] = value
    (entry / MARKER).write_text(json.dumps(marker))
    (entry / "train.u8").write_bytes(b"\xff" * (entry / "train.u8").stat().st_size)  # would show if read
    decode_calls.clear()
    again = load_dataset(folder_cfg(tree), 0)
    assert len(decode_calls) == 18
    assert torch.equal(again.train.images, expected)


def test_another_pxd_version_uses_its_own_cache(tree, cache_dir, decode_calls, monkeypatch):
    _entry_after_first_load(tree, cache_dir)
    monkeypatch.setattr(cache_module, "pxd_version", lambda: "9.9.9")
    decode_calls.clear()
    load_dataset(folder_cfg(tree), 0)
    assert len(decode_calls) == 18 and len(cache_entries(cache_dir)) == 2


def test_corrupt_and_truncated_images_are_named_before_training(tree, cache_dir):
    broken = tree / "train" / "bee" / "bee_000.jpg"
    broken.write_bytes(b"not a jpeg")
    truncated = tree / "val" / "cow" / "cow_001.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(DatasetError) as caught:
        load_dataset(folder_cfg(tree), 0)
    message = str(caught.value)
    assert caught.value.field == "dataset.path" and "2 image(s) cannot be decoded" in message
    assert str(broken) in message and str(truncated) in message and "on_bad_image: skip" in message


def test_skip_mode_leaves_bad_images_out_with_a_count(tree, cache_dir, decode_calls, caplog):
    broken = tree / "train" / "bee" / "bee_000.jpg"
    broken.write_bytes(b"not a jpeg")
    with caplog.at_level(logging.WARNING, logger="pxd.data"):
        data = load_dataset(folder_cfg(tree, on_bad_image="skip"), 0)
    assert len(data.train) == 11 and torch.bincount(data.train.labels).tolist() == [4, 3, 4]
    assert data.train.images.shape == (11, 3, 16, 16)
    assert data.skipped == ["train/bee/bee_000.jpg"]
    assert "left out 1 unreadable image(s)" in caplog.text and str(broken) in caplog.text
    # The same cache, read in error mode, still refuses (and does not decode again).
    calls = len(decode_calls)
    with pytest.raises(DatasetError, match="bee_000.jpg"):
        load_dataset(folder_cfg(tree), 0)
    assert len(decode_calls) == calls


def test_too_little_disk_is_a_clear_error_before_decoding(tree, cache_dir, decode_calls, monkeypatch):
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DatasetError) as caught:
        load_dataset(folder_cfg(tree), 0)
    assert caught.value.field == "dataset.cache_dir"
    assert str(cache_dir) in str(caught.value) and "GiB" in str(caught.value)
    assert decode_calls == []


def test_cache_dir_setting_wins_over_the_environment(tree, cache_dir, tmp_path):
    chosen = tmp_path / "chosen"
    load_dataset(folder_cfg(tree, cache_dir=str(chosen)), 0)
    assert len(cache_entries(chosen)) == 1 and not cache_dir.exists()


def _fingerprint(path: Path) -> str:
    return load_dataset(folder_cfg(path), 0).fingerprint


def test_fingerprint_is_content_not_location_so_copies_share_stage_keys(tree, cache_dir, tmp_path, decode_calls):
    copy = tmp_path / "elsewhere" / "copy-of-data"
    shutil.copytree(tree, copy)  # new paths, new mtimes, new inodes
    os.utime(copy / "train" / "ant" / "ant_000.jpg", ns=(1, 1))
    original, copied = _fingerprint(tree), _fingerprint(copy)
    assert original == copied
    assert len(decode_calls) == 18  # the copy maps the same cache
    config = PipelineConfig()
    assert stage_keys(config, original) == stage_keys(config, copied)


def test_fingerprint_changes_when_one_byte_changes(tree, cache_dir):
    before = _fingerprint(tree)
    target = tree / "val" / "ant" / "ant_000.jpg"
    stat = target.stat()
    content = bytearray(target.read_bytes())
    content[len(content) // 2] ^= 0xFF  # same size, and the mtime put back: only the bytes differ
    target.write_bytes(bytes(content))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _fingerprint(tree) != before
    assert load_dataset(folder_cfg(tree, image_size=8), 0).fingerprint != _fingerprint(tree)


def test_fingerprint_ignores_knobs_that_do_not_change_the_data(tree, cache_dir, tmp_path):
    before = _fingerprint(tree)
    assert load_dataset(folder_cfg(tree, cache_dir=str(tmp_path / "c2"), on_bad_image="skip"), 0).fingerprint == before
    assert load_dataset(folder_cfg(tree), 1).fingerprint == before  # no caps: the seed picks nothing


def test_warm_load_does_not_rehash_unchanged_files(tree, cache_dir, monkeypatch):
    import pxd.data.fingerprint as fingerprint_module

    _fingerprint(tree)
    hashed: list[Path] = []
    real = fingerprint_module._hash_file
    monkeypatch.setattr(fingerprint_module, "_hash_file", lambda path: hashed.append(path) or real(path))
    _fingerprint(tree)
    assert hashed == []
    (tree / "train" / "ant" / "ant_000.jpg").write_bytes((tree / "train" / "ant" / "ant_001.jpg").read_bytes())
    _fingerprint(tree)
    assert hashed == [tree / "train" / "ant" / "ant_000.jpg"]

