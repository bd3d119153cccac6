"""The TAS pipeline end to end on the embedded dataset, tiny and on CPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pxd.config import PipelineConfig
from pxd.errors import DivergedError
from pxd.memo import ProcessMemory
from pxd.models import create_model
from pxd.pipeline import run_tas
from pxd.stages import StageOutcome, stage_keys
from pxd.weights import init_from


def test_tas_runs_and_reports_student_metrics(tiny_raw):
    config = PipelineConfig.from_dict(tiny_raw)
    result = run_tas(config, measure_latency=False)
    metrics = result.metrics
    assert set(result.stages) == {"teacher", "assistant", "student"}
    assert 0.0 <= metrics["val_top1"] <= 1.0
    assert metrics["pixels"] == 16 * 16
    assert metrics["gmacs"] > 0 and metrics["params_m"] > 0 and metrics["latency_ms"] > 0
    # the student runs at its own resolution
    logits = result.student(torch.zeros(2, 3, 16, 16))
    assert logits.shape == (2, 4)


def test_seeded_runs_are_reproducible(tiny_raw):
    config = PipelineConfig.from_dict(tiny_raw)
    first = run_tas(config, measure_latency=False)
    torch.rand(123)  # whatever ran before in the process must not matter (a fresh process differs here)
    second = run_tas(config, measure_latency=False)
    assert first.metrics["val_top1"] == second.metrics["val_top1"]
    for name, tensor in first.student.state_dict().items():
        assert torch.equal(tensor, second.student.state_dict()[name]), name


def test_one_stage_skips_the_assistant(tiny_raw):
    tiny_raw["assistant"]["enabled"] = False
    result = run_tas(PipelineConfig.from_dict(tiny_raw), measure_latency=False)
    assert set(result.stages) == {"teacher", "student"}


def test_epoch_callback_sees_every_stage_epoch(tiny_raw):
    seen = []
    run_tas(PipelineConfig.from_dict(tiny_raw), on_epoch=lambda kind, epoch, m: seen.append((kind, epoch)), measure_latency=False)
    assert seen == [("teacher", 1), ("teacher", 2), ("assistant", 1), ("student", 1)]


def test_a_diverging_loss_stops_the_stage(tiny_raw):
    tiny_raw["distill"]["temperature"] = 1e30  # T² overflows float32: the KD term is not finite on the first step
    with pytest.raises(DivergedError, match="kd"):
        run_tas(PipelineConfig.from_dict(tiny_raw), measure_latency=False)


def test_stage_keys_depend_on_what_determines_the_result(tiny_raw):
    base = PipelineConfig.from_dict(tiny_raw)
    keys = stage_keys(base, "data-A")
    renamed = stage_keys(dataclasses.replace(base, name="another-sweep"), "data-A")
    assert keys == renamed, "the run name must not change any stage key"
    other_data = stage_keys(base, "data-B")
    assert all(other_data[k] != keys[k] for k in keys)
    # the student's resolution changes only the student stage
    lower = stage_keys(dataclasses.replace(base, student=dataclasses.replace(base.student, resolution=8)), "data-A")
    assert lower["teacher"] == keys["teacher"] and lower["assistant"] == keys["assistant"]
    assert lower["student"] != keys["student"]
    # distillation weights do not change the teacher, and do change the assistant
    weights = stage_keys(dataclasses.replace(base, distill=dataclasses.replace(base.distill, kd=0.5)), "data-A")
    assert weights["teacher"] == keys["teacher"] and weights["assistant"] != keys["assistant"]
    # ISRD only trains the low-resolution student: its weight splits students, not assistants
    isrd = stage_keys(dataclasses.replace(base, distill=dataclasses.replace(base.distill, isrd=0.0)), "data-A")
    assert isrd["assistant"] == keys["assistant"] and isrd["student"] != keys["student"]
    # the device does not change what a stage stands for
    on_gpu = stage_keys(dataclasses.replace(base, train=dataclasses.replace(base.train, device="cuda")), "data-A")
    assert on_gpu == keys
    # nor does the memory format: channels_last changes speed, never the weights a stage stands for
    nhwc = stage_keys(dataclasses.replace(base, train=dataclasses.replace(base.train, channels_last=True)), "data-A")
    assert nhwc == keys
    # nor does compiling the upstream model
    compiled = stage_keys(dataclasses.replace(base, train=dataclasses.replace(base.train, compile_upstream=True)),
                          "data-A")
    assert compiled == keys


def test_student_starts_from_the_assistant_weights_across_resolutions():
    from pxd.config import ModelConfig

    vit = ModelConfig(arch="vit_tiny_patch16_224", resolution=32, patch_size=4)
    source = create_model(vit, 3)
    target = create_model(dataclasses.replace(vit, resolution=16, patch_size=2), 3)
    copied = init_from(source.state_dict(), target)
    assert "pos_embed" in copied and "patch_embed.proj.weight" in copied
    assert torch.equal(target.state_dict()["blocks.0.attn.qkv.weight"], source.state_dict()["blocks.0.attn.qkv.weight"])


class _KeepingProvider:
    """Hands out the same result object for a stage it has seen, as a store's in-memory copy does."""

    def __init__(self) -> None:
        self.results: dict[str, object] = {}

    def get_or_train(self, kind, key, describe, train):
        reused = key in self.results
        if not reused:
            self.results[key] = train()
        return StageOutcome(result=self.results[key], key=key, reused=reused)


def test_a_process_builds_its_teacher_and_assistant_once_and_trains_the_same_student(tiny_raw, monkeypatch):
    from pxd import pipeline

    memory = ProcessMemory()
    built = []
    real_new_model = pipeline._new_model
    monkeypatch.setattr(pipeline, "_new_model", lambda model, *a, **k: built.append(model.arch) or real_new_model(model, *a, **k))
    config = PipelineConfig.from_dict(tiny_raw)
    provider = _KeepingProvider()
    run_tas(config, provider=provider, measure_latency=False, memory=memory)
    assert len(built) == 3  # teacher, assistant, student
    # ISRD weighs the student stage only: the same teacher and assistant, another student
    other_student = dataclasses.replace(config, distill=dataclasses.replace(config.distill, isrd=1.5))
    built.clear()
    kept = run_tas(other_student, provider=provider, measure_latency=False, memory=memory)
    assert built == [config.student.arch]  # only the new student: teacher and assistant were kept
    assert set(kept.stages) == {"teacher", "assistant", "student"} and kept.stages["assistant"].reused

    # the same trial in a process that kept nothing (its stages still come from the store)
    del provider.results[kept.stages["student"].key]
    fresh = run_tas(other_student, provider=provider, measure_latency=False, memory=ProcessMemory())
    assert fresh.metrics["val_top1"] == kept.metrics["val_top1"]
    assert fresh.metrics["gmacs"] == kept.metrics["gmacs"] and fresh.metrics["params_m"] == kept.metrics["params_m"]
    for name, tensor in kept.student.state_dict().items():
        assert torch.equal(tensor, fresh.student.state_dict()[name]), name


def test_a_kept_upstream_is_not_used_for_a_stage_that_trains_again(tiny_raw):
    """A provider that trains the stage again (a store that lost it, force_retrain) gets a new module: the
    kept one is only ever read."""
    memory = ProcessMemory()
    config = PipelineConfig.from_dict(tiny_raw)
    run_tas(config, measure_latency=False, memory=memory)  # the default provider trains: new result objects every time
    kept_teacher = next(m for (kind, _), (_, m) in memory.upstream.items() if kind == "teacher")
    before = {k: v.clone() for k, v in kept_teacher.state_dict().items()}
    second = run_tas(config, measure_latency=False, memory=memory)
    assert all(torch.equal(before[k], v) for k, v in kept_teacher.state_dict().items())
    assert second.stages["teacher"].reused is False


def test_a_teacher_prepared_with_the_process_memory_is_not_built_again_by_the_next_run(tiny_raw, monkeypatch):
    from pxd import pipeline

    memory = ProcessMemory()
    config = PipelineConfig.from_dict(tiny_raw)
    provider = _KeepingProvider()
    prepared = pipeline.prepare_teacher(config, provider=provider, progress=False, memory=memory)
    assert [kind for kind, _ in memory.upstream] == ["teacher"]
    built = []
    real_new_model = pipeline._new_model
    monkeypatch.setattr(pipeline, "_new_model", lambda model, *a, **k: built.append(a[1]) or real_new_model(model, *a, **k))
    result = run_tas(config, provider=provider, measure_latency=False, memory=memory)
    assert built == ["student", "student"]  # the student and the assistant (the student's architecture): no teacher
    assert result.stages["teacher"].reused and result.stages["teacher"].key == prepared.key
