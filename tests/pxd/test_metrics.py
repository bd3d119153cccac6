"""The metric registry's words for direction (`Mode`) and its one primary metric."""

from __future__ import annotations

import json

import pytest

from pxd import metrics as registry
from pxd.metrics import Metric, Mode, primary_metric


def test_a_mode_is_its_plain_word_wherever_it_is_written():
    assert Mode.MAX == "max" and Mode("min") is Mode.MIN
    assert str(Mode.MAX) == "max" and f"{Mode.MIN}" == "min"  # f-strings and str(), on every Python
    assert json.dumps([["val_top1", Mode.MAX]]) == '[["val_top1", "max"]]'
    assert {"max": 1}[Mode.MAX] == 1


def test_a_mode_knows_its_sign_opposite_and_which_value_is_better():
    assert (Mode.MAX.sign, Mode.MIN.sign) == (-1.0, 1.0)
    assert Mode.MAX.opposite is Mode.MIN and Mode.MIN.opposite is Mode.MAX
    assert Mode.MAX.better(0.8, 0.7) and not Mode.MAX.better(0.7, 0.7) and Mode.MIN.better(1, 2)
    assert Mode.MAX.best([1, 3, 2]) == 3 and Mode.MIN.best([1, 3, 2]) == 1


def test_a_row_takes_the_word_or_the_enum_and_refuses_anything_else():
    assert Metric(name="x", mode="min", unit="", description="").mode is Mode.MIN
    assert Metric(name="x", mode="max", unit="", description="").constraint_key == "min_x"
    with pytest.raises(ValueError, match="mode must be one of"):
        Metric(name="x", mode="maximise", unit="", description="")


def test_val_top1_is_the_one_primary_metric():
    assert primary_metric() == "val_top1"
    assert registry.get_metric("val_top1").default_reference == 0.0
    with pytest.raises(ValueError, match="val_top1 is already the primary metric"):
        registry.register(Metric(name="top5", mode="max", unit="", description="", primary=True))
    assert "top5" not in registry.METRICS
