"""A stage interrupted after an epoch and resumed from its checkpoint ends exactly like an uninterrupted run."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from pxd.config import PipelineConfig
from pxd.data import load_dataset
from pxd.models import create_model
from pxd.pipeline import run_tas
from pxd.stages import ResumableTraining, StageOutcome
from pxd.train import Checkpointing, StageResult, train_stage


class Interrupted(Exception):
    """Stands in for a killed process: raised by the epoch callback."""


def _to_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _from_bytes(payload: bytes) -> dict:
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def _roundtrip(state: dict) -> dict:
    """What a store does with a training state: bytes out, bytes back in with the safe loader."""
    return _from_bytes(_to_bytes(state))


def _scramble_global_rngs() -> None:
    """A resumed stage runs in another process: whatever the global streams hold there must not matter."""
    torch.manual_seed(12345)
    np.random.seed(12345)
    random.seed(12345)


def _saving_every_epoch(saved: list[dict]) -> Checkpointing:
    return Checkpointing(save=lambda state: saved.append(_roundtrip(state)), interval_s=0)


def _without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in record.items() if k != "epoch_seconds"} for record in history]


def _setup(tiny_raw, kind: str):
    tiny_raw["teacher"]["epochs"] = 4
    # every stateful part: adapters + ISRD decoder (student-side parameters) and the discriminator's own optimiser
    tiny_raw["distill"].update(adversarial=0.1, feature=0.5)
    cfg = PipelineConfig.from_dict(tiny_raw)
    data = load_dataset(cfg.dataset, cfg.seed)
    teacher = None
    if kind == "student":
        torch.manual_seed(cfg.seed)
        teacher = create_model(cfg.teacher, data.num_classes, field="teacher")
    return cfg, data, teacher


def _train(cfg, data, teacher, kind: str, checkpointing: Checkpointing | None = None, on_epoch=None) -> StageResult:
    torch.manual_seed(cfg.seed)
    model_cfg = cfg.teacher if kind == "teacher" else cfg.student
    model = create_model(model_cfg, data.num_classes, field=kind)
    model.drop_rate = 0.3  # dropout before the classifier (timm ResNet's head): draws from torch's global stream
    return train_stage(
        kind, model, data, resolution=model_cfg.resolution, image_resolution=cfg.teacher.resolution,
        teacher=teacher, distill=cfg.distill if teacher is not None else None, train=cfg.train, epochs=4,
        seed=cfg.seed, device=torch.device("cpu"), on_epoch=on_epoch, progress=False, checkpointing=checkpointing,
    )


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_a_resumed_stage_equals_an_uninterrupted_one(tiny_raw, kind):
    cfg, data, teacher = _setup(tiny_raw, kind)
    uninterrupted = _train(cfg, data, teacher, kind)

    saved: list[dict] = []

    def stop_after_epoch_2(_kind: str, epoch: int, _record: dict) -> None:
        if epoch == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        _train(cfg, data, teacher, kind, _saving_every_epoch(saved), on_epoch=stop_after_epoch_2)
    assert [state["epoch"] for state in saved] == [1, 2]

    _scramble_global_rngs()
    epochs_trained: list[int] = []
    resumed = _train(cfg, data, teacher, kind, Checkpointing(resume_from=saved[-1]),
                     on_epoch=lambda _k, epoch, _r: epochs_trained.append(epoch))

    assert epochs_trained == [3, 4]  # resumed after the last saved epoch, not from epoch 1
    assert resumed.state_dict.keys() == uninterrupted.state_dict.keys()
    for name, tensor in uninterrupted.state_dict.items():
        assert torch.equal(tensor, resumed.state_dict[name]), name
    assert _without_timing(resumed.history) == _without_timing(uninterrupted.history)
    assert resumed.metrics["val_top1"] == uninterrupted.metrics["val_top1"]
    assert resumed.metrics["best_epoch"] == uninterrupted.metrics["best_epoch"]


def test_checkpoints_follow_the_interval_and_never_the_last_epoch(tiny_raw):
    cfg, data, teacher = _setup(tiny_raw, "teacher")
    every_epoch: list[dict] = []
    _train(cfg, data, teacher, "teacher", _saving_every_epoch(every_epoch))
    assert [state["epoch"] for state in every_epoch] == [1, 2, 3]  # the finished stage is the provider's to store

    hour: list[int] = []
    _train(cfg, data, teacher, "teacher", Checkpointing(save=hour.append, interval_s=3600))
    assert hour == []


def test_a_state_of_another_stage_is_refused(tiny_raw):
    cfg, data, teacher = _setup(tiny_raw, "teacher")
    saved: list[dict] = []
    _train(cfg, data, teacher, "teacher", _saving_every_epoch(saved))
    with pytest.raises(ValueError, match="cannot resume the student stage"):
        _train(*_setup(tiny_raw, "student"), "student", Checkpointing(resume_from=saved[0]))


class _ResumingProvider:
    """A minimal store: keeps the last checkpoint per key and resumes from it; interrupts once."""

    def __init__(self, interrupt: tuple[str, int] | None) -> None:
        self.saved: dict[str, bytes] = {}
        self.interrupt = interrupt

    def get_or_train(self, kind, key, describe, train) -> StageOutcome:
        assert isinstance(train, ResumableTraining)

        def save(state: dict) -> None:
            self.saved[key] = _to_bytes(state)
            if self.interrupt == (kind, state["epoch"]):
                self.interrupt = None
                raise Interrupted

        resume_from = _from_bytes(self.saved[key]) if key in self.saved else None  # resuming consumes the state
        return StageOutcome(train(Checkpointing(save=save, resume_from=resume_from, interval_s=0)), key, False)


def test_the_pipeline_resumes_each_stage_through_its_provider(tiny_raw):
    tiny_raw["teacher"]["epochs"] = 3
    tiny_raw["assistant"]["epochs"] = 2
    cfg = PipelineConfig.from_dict(tiny_raw)
    uninterrupted = run_tas(cfg, measure_latency=False)

    provider = _ResumingProvider(interrupt=("teacher", 2))
    with pytest.raises(Interrupted):
        run_tas(cfg, provider=provider, measure_latency=False)
    provider.interrupt = ("assistant", 1)
    with pytest.raises(Interrupted):
        run_tas(cfg, provider=provider, measure_latency=False)
    _scramble_global_rngs()
    resumed = run_tas(cfg, provider=provider, measure_latency=False)

    for name, tensor in uninterrupted.student.state_dict().items():
        assert torch.equal(tensor, resumed.student.state_dict()[name]), name
    for kind in ("teacher", "assistant", "student"):
        expected = _without_timing(uninterrupted.stages[kind].result.history)
        assert _without_timing(resumed.stages[kind].result.history) == expected, kind
