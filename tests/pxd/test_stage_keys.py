"""Stage keys are the address of every stored stage: the same config must keep finding the same stages.

The keys below were computed from the code before the loss terms became a registry; a change to how the
config or the stage identities are built that changes them would orphan every stage users have stored.
Never update them to make a test pass: bump `STAGE_KEY_VERSION` on purpose instead (and change them then).
"""

from __future__ import annotations

import dataclasses

from pxd.config import DistillConfig, PipelineConfig
from pxd.stages import stage_keys

FINGERPRINT = "fingerprint-of-the-data"


def test_the_default_configs_stage_keys_are_pinned():
    assert stage_keys(PipelineConfig(), FINGERPRINT) == {
        "teacher": "65e1442142b11b053ad930dcd9df92d9",
        "assistant": "e705daf20630e016afc0c35711a579ef",
        "student": "17588c8a0777f2e3816ea4ce565f0203",
    }


def test_a_config_with_every_loss_term_on_keeps_its_stage_keys():
    config = PipelineConfig.from_dict({
        "assistant": {"enabled": False},
        "distill": {"kd": 0.5, "isrd": 2.0, "feature": 1.0, "attention": 1000.0, "pairwise": 1.0, "mmd": 0.5,
                    "adversarial": 0.1, "temperature": 2.0},
    })
    assert stage_keys(config, FINGERPRINT) == {
        "teacher": "65e1442142b11b053ad930dcd9df92d9",
        "student": "365a6d9a4caa5c2304fb60b56dd51a2e",
    }


def test_the_distill_sections_field_names_and_defaults_are_the_users():
    """What a user's YAML writes under `distill:` (and `assistant.distill:`), in the order it is shown."""
    assert {f.name: f.default for f in dataclasses.fields(DistillConfig)} == {
        "ce": 1.0, "kd": 0.9, "temperature": 4.0, "isrd": 10.0, "feature": 0.0, "attention": 0.0,
        "pairwise": 0.0, "mmd": 0.0, "adversarial": 0.0,
    }
    assert [f.name for f in dataclasses.fields(DistillConfig)] == [
        "ce", "kd", "temperature", "isrd", "feature", "attention", "pairwise", "mmd", "adversarial"]
