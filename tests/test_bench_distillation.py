"""bench/distillation.py end to end on a tiny synthetic set: one stored teacher shared by every seed, the
chosen variants only, and Δ vs CE paired by seed with its 95 % interval."""

from __future__ import annotations

import json

import pytest
import torch

from bench import distillation
from pxd.models import create_model
from pxd.sections import ModelConfig
from tests.conftest import write_photo_folder


def test_paired_interval_is_students_t_over_the_seeds():
    mean, low, high = distillation.paired_interval([0.01, 0.03, 0.02])
    assert mean == pytest.approx(0.02)
    assert (high - mean) == pytest.approx(4.303 * 0.01 / 3 ** 0.5)  # t(0.975, 2) · sd / √n
    assert low == pytest.approx(2 * mean - high)


def _photos(root, classes: int = 3, train: int = 6, val: int = 4) -> None:
    write_photo_folder(root, side=32, classes=classes, train=train, val=val)


def test_the_bench_distils_every_seed_from_one_stored_teacher(tmp_path, monkeypatch):
    monkeypatch.setenv("PXD_CACHE_DIR", str(tmp_path / "cache"))  # the decoded photos: not the user's cache
    _photos(tmp_path / "photos")
    teacher = create_model(ModelConfig(arch="resnet10t", resolution=32), 3, field="teacher")
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    out = tmp_path / "out.json"
    distillation.main(["--dataset", str(tmp_path / "photos"), "--seeds", "0", "1", "--resolution", "32",
                       "--student-resolutions", "16", "--train-per-class", "0", "--epochs", "1", "--batch-size", "8",
                       "--teacher-checkpoint", str(tmp_path / "teacher.pt"), "--variants", "ce", "one_stage",
                       "--kd", "0.5", "--isrd", "0", "--device", "cpu", "--out", str(out)])
    saved = json.loads(out.read_text())
    runs = saved["runs"]
    assert sorted(runs) == ["0", "1"] and sorted(runs["0"]["16"]) == ["ce", "one_stage"]
    # the same teacher (used as is, never trained) for both seeds, on the same validation photos
    assert runs["0"]["16"]["one_stage"]["teacher_val_top1"] == runs["1"]["16"]["one_stage"]["teacher_val_top1"]
    assert "95 % interval" in saved["table"] and "| one_stage |" in saved["table"]
    assert saved["settings"]["teacher_checkpoint"].endswith("teacher.pt")
