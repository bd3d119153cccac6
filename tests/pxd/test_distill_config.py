"""Distillation settings: defaults from the paper, stage keys from the loss table, checks before compute."""

from __future__ import annotations

import copy
import logging

import pytest

from pxd.config import AssistantConfig, DistillConfig, PipelineConfig
from pxd.errors import ConfigError
from pxd.losses import stage_loss_weights
from pxd.pipeline import ASSISTANT_GAP_WARNING, _pipeline_warnings
from pxd.stages import StageOutcome, stage_keys
from pxd.train import StageResult


def test_defaults_are_the_papers_convex_kd_and_init_student_is_off():
    distill = DistillConfig()
    assert (distill.kd, distill.temperature) == (0.9, 4.0)  # official configs/ts/cub: ALPHA 0.9, TEMP 4
    assert 10.0 <= distill.isrd <= 50.0  # official FSR.ETA: 10 (2×) / 50 (4×)
    assert AssistantConfig().init_student is False  # pxd's addition, opt-in


def test_stage_weights_are_exactly_the_active_terms():
    distill = DistillConfig(kd=0.9, isrd=10.0, attention=0.0)
    low = stage_loss_weights(distill, distilling=True, student_resolution=16, teacher_resolution=64)
    assert low == pytest.approx({"ce": 0.1, "kd": 0.9, "isrd": 10.0, "temperature": 4.0})
    same = stage_loss_weights(distill, distilling=True, student_resolution=64, teacher_resolution=64)
    assert "isrd" not in same  # the one place the rule lives: the table's needs_lower_resolution
    assert stage_loss_weights(distill, distilling=False, student_resolution=64, teacher_resolution=64) == {"ce": 1.0}


def _keys(raw, **distill):
    raw = copy.deepcopy(raw)
    raw["distill"].update(distill)
    return stage_keys(PipelineConfig.from_dict(raw), "data")


def test_stage_key_changes_with_an_active_weight_and_not_with_an_inactive_one(tiny_raw):
    tiny_raw["distill"] = {"kd": 0.9, "temperature": 4.0, "isrd": 10.0}
    base = _keys(tiny_raw)
    # isrd is inactive for the assistant (teacher's resolution), active for the student
    isrd = _keys(tiny_raw, isrd=20.0)
    assert isrd["assistant"] == base["assistant"] and isrd["student"] != base["student"]
    # kd is active in both
    kd = _keys(tiny_raw, kd=0.5)
    assert kd["teacher"] == base["teacher"] and kd["assistant"] != base["assistant"] and kd["student"] != base["student"]
    # with kd = 0 the temperature is not used: changing it splits nothing
    ce_only = _keys(tiny_raw, kd=0.0)
    assert _keys(tiny_raw, kd=0.0, temperature=2.0) == ce_only
    # a zero-weight term's companions do not matter; the label term's effective weight does
    assert _keys(tiny_raw, kd=1.0, ce=1.0) == _keys(tiny_raw, kd=1.0, ce=0.5)  # (1 − α) = 0 either way


def test_attention_with_only_1x1_student_maps_fails_before_any_training(tiny_raw):
    tiny_raw["student"]["resolution"] = 4  # blockwise_resnet: every stage is 1×1 at 4 px
    tiny_raw["distill"]["attention"] = 1.0
    with pytest.raises(ConfigError) as err:
        PipelineConfig.from_dict(tiny_raw)
    assert err.value.field == "distill.attention"


def test_a_stage_with_no_active_term_is_a_config_error(tiny_raw):
    tiny_raw["distill"] = {"ce": 0.0, "kd": 0.0, "isrd": 1.0}  # the assistant would have nothing
    with pytest.raises(ConfigError, match="assistant"):
        PipelineConfig.from_dict(tiny_raw)
    tiny_raw["assistant"]["enabled"] = False  # the one-stage student still has ISRD
    PipelineConfig.from_dict(tiny_raw)


def _outcome(kind: str, top1: float, warnings: list[str] | None = None) -> StageOutcome:
    result = StageResult(kind, {}, {"val_top1": top1}, warnings=warnings or [])
    return StageOutcome(result=result, key=kind, reused=False)


def test_an_assistant_far_below_its_teacher_is_a_warning(caplog: pytest.LogCaptureFixture):
    fine = {"teacher": _outcome("teacher", 0.9), "assistant": _outcome("assistant", 0.85), "student": _outcome("student", 0.6)}
    assert _pipeline_warnings(fine) == []
    gap = 0.9 - ASSISTANT_GAP_WARNING - 0.05
    bad = dict(fine, assistant=_outcome("assistant", gap, ["distill.attention: skipped stage 4"]))
    with caplog.at_level(logging.WARNING):
        warnings = _pipeline_warnings(bad)
    assert warnings[0] == "assistant: distill.attention: skipped stage 4"
    assert "below its teacher" in warnings[1] and "below its teacher" in caplog.text


def test_run_tas_reports_warnings_as_a_list(tiny_raw):
    from pxd.pipeline import run_tas

    tiny_raw["distill"] = {"kd": 0.9, "isrd": 10.0, "attention": 1.0}
    result = run_tas(PipelineConfig.from_dict(tiny_raw), measure_latency=False)
    assert isinstance(result.warnings, list)
    # the 16 px blockwise student's last stages are 1×1: skipped, and said so
    assert any("student: distill.attention: skipped" in w for w in result.warnings)


@pytest.mark.parametrize("section", ["distill", "assistant"])
def test_kd_above_one_is_refused_with_the_conversion_from_the_additive_kd(tiny_raw, section):
    """kd is α of (1 − α)·CE + α·T²·KL: above 1 a stage would train without its labels, silently."""
    raw = copy.deepcopy(tiny_raw)
    target = raw["distill"] if section == "distill" else raw.setdefault("assistant", {}).setdefault("distill", {})
    target["kd"] = 2.0
    with pytest.raises(ConfigError) as err:
        PipelineConfig.from_dict(raw)
    message = str(err.value)
    assert message.startswith(f"{'distill' if section == 'distill' else 'assistant.distill'}.kd: must be ≤ 1 (got 2)")
    assert "α = kd / (1 + kd)" in message
    target["kd"] = 1.0  # KD only: the edge is allowed
    assert PipelineConfig.from_dict(raw)
