"""The cross-entropy control (`pxd.control`): one per student architecture × side × schedule × seed,
trained on labels alone, and what `gain_vs_ce` compares against."""

from __future__ import annotations

import copy

import pytest
import torch

from pxd.config import PipelineConfig
from pxd.control import control_key, control_metrics, train_ce_control
from pxd.data import load_dataset
from pxd.pipeline import run_tas
from pxd.stages import TrainingProvider
from tests.conftest import TINY_CONFIG


def _cfg(**sections: dict) -> PipelineConfig:
    raw = copy.deepcopy(TINY_CONFIG)
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return PipelineConfig.from_dict(raw)


def test_a_control_key_ignores_everything_upstream_and_follows_the_student():
    base = control_key(_cfg(), "data")
    # the teacher, the assistant and the distillation weights do not change what the control trains
    for other in (_cfg(distill={"kd": 0.3, "temperature": 2.0, "isrd": 0.0}), _cfg(assistant={"enabled": False}),
                  _cfg(teacher={"epochs": 5})):
        assert control_key(other, "data") == base
    # the student, its schedule, its optimiser, the seed and the data do
    changed = [_cfg(student={"resolution": 8}), _cfg(student={"epochs": 2}), _cfg(train={"lr": 0.01}),
               _cfg(student={"widths": [8, 16, 16, 16]})]
    assert len({control_key(c, "data") for c in changed} | {base}) == len(changed) + 1
    seeded = PipelineConfig.from_dict({**copy.deepcopy(TINY_CONFIG), "seed": 1})
    assert control_key(seeded, "data") != base
    assert control_key(_cfg(), "other data") != base


def test_the_control_is_the_student_trained_on_labels_alone():
    """A student distilled with every distillation weight at 0 and no assistant is trained exactly as its
    control is: the same weights, so gain_vs_ce is 0 (the control starts from the student's initial weights
    and sees the same batches)."""
    cfg = _cfg(distill={"kd": 0.0, "isrd": 0.0}, assistant={"enabled": False}, student={"epochs": 2})
    data = load_dataset(cfg.dataset, cfg.seed)
    plain = run_tas(cfg, data=data, measure_latency=False)
    control = train_ce_control(cfg, provider=TrainingProvider(), data=data)
    assert control.key == control_key(cfg, data.fingerprint) and control.result.kind == "control"
    for name, tensor in plain.stages["student"].result.state_dict.items():
        assert torch.equal(tensor, control.result.state_dict[name]), name
    metrics = control_metrics(plain.metrics, control)
    assert metrics["gain_vs_ce"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["control_val_top1"] == plain.metrics["val_top1"]


def test_gain_vs_ce_is_the_students_accuracy_minus_the_controls():
    cfg = _cfg(student={"epochs": 1})
    data = load_dataset(cfg.dataset, cfg.seed)
    control = train_ce_control(cfg, provider=TrainingProvider(), data=data)
    metrics = control_metrics({"val_top1": 0.75}, control)
    assert metrics["gain_vs_ce"] == pytest.approx(0.75 - control.result.metrics["val_top1"])
