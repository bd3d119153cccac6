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


def test_save_teacher_trains_the_teacher_once_stores_it_and_a_second_run_reuses_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PXD_CACHE_DIR", str(tmp_path / "cache"))
    _photos(tmp_path / "photos")
    stored, out = tmp_path / "teachers" / "t.pt", tmp_path / "out.json"
    argv = ["--dataset", str(tmp_path / "photos"), "--seeds", "3", "--resolution", "32", "--student-resolutions", "16",
            "--train-per-class", "0", "--epochs", "1", "--teacher-epochs", "2", "--teacher-lr", "0.05",
            "--batch-size", "8", "--variants", "ce", "one_stage", "--device", "cpu", "--save-teacher", str(stored),
            "--out", str(out)]
    distillation.main(argv)
    first = json.loads(out.read_text())
    assert stored.exists() and 0.0 <= first["teacher"]["val_top1"] <= 1.0
    assert "teacher   epoch  2" in capsys.readouterr().out  # trained here, with its epochs shown
    # the stored file is a teacher.checkpoint: every seed distilled from it, used as is
    assert first["settings"]["teacher_checkpoint"] == str(stored)
    assert first["runs"]["3"]["16"]["one_stage"]["teacher_val_top1"] == pytest.approx(first["teacher"]["val_top1"])
    before = stored.stat().st_mtime_ns
    distillation.main(argv)
    assert "teacher: reusing" in capsys.readouterr().out and stored.stat().st_mtime_ns == before


def test_save_teacher_and_teacher_checkpoint_together_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        distillation.parse_args(["--save-teacher", str(tmp_path / "a.pt"), "--teacher-checkpoint", str(tmp_path / "b.pt")])
