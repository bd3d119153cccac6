"""`train.compile_upstream`: the frozen upstream model's forward through torch.compile (inductor, on CPU here)."""

from __future__ import annotations

import pytest
import torch

from pxd.config import ModelConfig, PipelineConfig
from pxd.errors import ConfigError
from pxd.memo import ProcessMemory
from pxd.models import create_model, forward_taps
from pxd.pipeline import run_tas
from pxd.train import upstream_forward

pytestmark = pytest.mark.slow  # compiling takes seconds per model on 2 CPU cores


def _teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="blockwise_resnet", resolution=32, depths=(1, 1, 1, 1),
                                     widths=(16, 16, 32, 32)), 4, field="teacher")
    return model.eval().requires_grad_(False)


def test_a_compiled_upstream_gives_the_taps_of_the_eager_one():
    teacher = _teacher()
    images = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        eager = forward_taps(teacher, images)
        memory = ProcessMemory()
        compiled = upstream_forward(teacher, compiled=True, memory=memory)(images)
        again = upstream_forward(teacher, compiled=True, memory=memory)(images * 0.5)  # the same function, another batch
    for name in ("logits", "input_map", "feature_map"):
        assert torch.allclose(getattr(compiled, name), getattr(eager, name), atol=1e-5, rtol=1e-4), name
    assert memory.compiled_taps is not None  # the process's one compiled function, kept in its memory
    assert len(compiled.stage_maps) == len(eager.stage_maps)
    for got, want in zip(compiled.stage_maps, eager.stage_maps, strict=True):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        assert torch.allclose(again.logits, forward_taps(teacher, images * 0.5).logits, atol=1e-5, rtol=1e-4)


def test_a_pipeline_with_a_compiled_upstream_trains_every_stage_through_it(tiny_raw):
    from torch._dynamo.utils import counters

    tiny_raw["train"]["compile_upstream"] = True
    tiny_raw["dataset"]["train_per_class"] = 18  # 72 images: batches of 16, then a last batch of 8
    torch._dynamo.reset()
    counters.clear()
    result = run_tas(PipelineConfig.from_dict(tiny_raw), measure_latency=False)
    assert set(result.stages) == {"teacher", "assistant", "student"}
    assert 0.0 <= result.metrics["val_top1"] <= 1.0
    # the upstream forwards went through dynamo: the teacher's (for the assistant) and the assistant's (for
    # the student) were compiled
    assert counters["stats"]["unique_graphs"] >= 2


def test_compile_upstream_takes_a_boolean(tiny_raw):
    tiny_raw["train"]["compile_upstream"] = "yes"
    with pytest.raises(ConfigError, match=r"train\.compile_upstream.*expected true or false"):
        PipelineConfig.from_dict(tiny_raw)
