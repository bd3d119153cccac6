"""A stage follows the thread count its caller lends it, step by step, records the time-weighted mean, and
gives the caller's count back when it ends, also when it fails (latency is timed after it, on the trial's
own threads)."""

from __future__ import annotations

import pytest
import torch

from pxd.config import PipelineConfig
from pxd.data import load_dataset
from pxd.models import create_model
from pxd.train import train_stage


class Stop(Exception):
    pass


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train(tiny_raw, *, cpu_threads=None, on_epoch=None):
    cfg = PipelineConfig.from_dict(tiny_raw)
    data = load_dataset(cfg.dataset, cfg.seed)
    model = create_model(cfg.teacher, data.num_classes, field="teacher")
    return train_stage("teacher", model, data, resolution=cfg.teacher.resolution,
                       image_resolution=cfg.teacher.resolution, teacher=None, distill=None, train=cfg.train, epochs=2,
                       seed=cfg.seed, device=torch.device("cpu"), on_epoch=on_epoch, progress=False,
                       cpu_threads=cpu_threads)


def test_a_stage_without_lent_threads_records_its_own(tiny_raw, one_thread):
    assert _train(tiny_raw).metrics["train_threads"] == 1.0


def test_a_stage_trains_on_lent_threads_and_gives_them_back(tiny_raw, one_thread):
    seen: list[int] = []

    def lent() -> int:
        seen.append(torch.get_num_threads())
        return 2

    result = _train(tiny_raw, cpu_threads=lent)
    assert seen[0] == 1 and set(seen[1:]) == {2}, "asked before every step, from the first"
    # the set-up before the first step ran on one thread: the mean is just under 2
    assert 1.5 < result.metrics["train_threads"] < 2.0
    assert torch.get_num_threads() == 1


def test_threads_lent_partway_count_for_the_time_they_were_used(tiny_raw, one_thread):
    epochs_done: list[int] = []
    result = _train(tiny_raw, cpu_threads=lambda: 2 if epochs_done else 1,
                    on_epoch=lambda _kind, epoch, _record: epochs_done.append(epoch))
    assert 1.0 < result.metrics["train_threads"] < 2.0
    assert torch.get_num_threads() == 1


def test_a_stage_that_fails_still_gives_the_lent_threads_back(tiny_raw, one_thread):
    def stop(_kind: str, _epoch: int, _record: dict) -> None:
        raise Stop

    with pytest.raises(Stop):
        _train(tiny_raw, cpu_threads=lambda: 2, on_epoch=stop)
    assert torch.get_num_threads() == 1
