"""bench/gpu_packing.py's pieces that run without a GPU: the trials it draws from the quickstart's space,
and the folder stage store its worker processes share (a stage trains once, later trials load it)."""

from __future__ import annotations

import pytest
import torch

from bench.gpu_packing import ARCHS, BASE, FileStageStore, draw_trials, trial_config
from pxd.config import PipelineConfig
from pxd.train import StageResult


def test_trials_are_drawn_from_the_quickstart_space_and_repeat_with_the_seed():
    trials = draw_trials(12, seed=3)
    assert trials == draw_trials(12, seed=3) and trials != draw_trials(12, seed=4)
    for trial in trials:
        cfg = PipelineConfig.from_dict(trial_config(BASE, trial))  # every drawn trial is a valid config
        assert cfg.student.arch in ARCHS and cfg.student.resolution in (16, 32, 48)
        assert 0.0 <= cfg.distill.isrd <= 2.0 and cfg.distill.temperature in (1.0, 2.0)


def test_the_folder_store_trains_a_stage_once_and_hands_it_to_later_trials(tmp_path):
    store, calls = FileStageStore(tmp_path), []

    def train() -> StageResult:
        calls.append(1)
        return StageResult("assistant", {"w": torch.ones(2)}, {"val_top1": 0.5, "train_seconds": 1.0})

    first = store.get_or_train("assistant", "k1", {}, train)
    again = store.get_or_train("assistant", "k1", {}, train)
    other = store.get_or_train("assistant", "k2", {}, train)
    assert (first.reused, again.reused, other.reused) == (False, True, False) and len(calls) == 2
    assert torch.equal(again.result.state_dict["w"], torch.ones(2)) and again.result.metrics["val_top1"] == 0.5
    assert not list(tmp_path.glob("*.partial"))


def test_a_failed_training_leaves_nothing_a_later_trial_would_load(tmp_path):
    store = FileStageStore(tmp_path)

    def diverges() -> StageResult:
        raise RuntimeError("diverged")

    with pytest.raises(RuntimeError):
        store.get_or_train("student", "k", {}, diverges)
    assert not list(tmp_path.glob("*.pt"))
