"""Latency runtimes: one registry entry each (`pxd.runtimes.RUNTIMES`), all timed by the one loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pxd.cost import RuntimeTiming, measure_latency, measure_runtime
from pxd.runtimes import RUNTIMES, Runtime, register, time_calls

RESOLUTION = 8


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def _counting_runtime(calls: list[tuple[int, ...]], *, autocast: bool) -> Runtime:
    def prepare(model, resolution, device, threads):
        def run(batch: torch.Tensor) -> torch.Tensor:
            calls.append(tuple(batch.shape))
            return model(batch)

        return run

    return Runtime("counting", prepare=prepare, autocast=autocast)


def test_the_registry_says_what_each_runtime_needs_and_honours():
    assert {"torch", "torch-compile", "onnxruntime"} <= set(RUNTIMES)
    assert RUNTIMES["torch"].dtypes == ("float32", "bfloat16", "float16")
    assert RUNTIMES["torch-compile"].module is None
    assert RUNTIMES["onnxruntime"].dtypes == ("float32",) and RUNTIMES["onnxruntime"].module == "onnxruntime"


def test_an_unknown_runtime_is_refused_naming_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown runtime 'tensorrt'.*torch-compile"):
        measure_runtime(_cnn(), RESOLUTION, runtime="tensorrt", warmup=0, repeats=2, batch_size=2)
    with pytest.raises(ValueError, match="already registered"):
        register(RUNTIMES["torch"])


def test_a_new_runtime_is_one_entry_timed_by_the_one_loop(monkeypatch):
    calls: list[tuple[int, ...]] = []
    monkeypatch.setitem(RUNTIMES, "counting", _counting_runtime(calls, autocast=False))
    timing = measure_runtime(_cnn(), RESOLUTION, runtime="counting", dtype=torch.bfloat16, warmup=1, repeats=4,
                             batch_size=2)
    assert isinstance(timing, RuntimeTiming) and timing.runtime == "counting"
    assert timing.dtype == "float32"  # a runtime without autocast runs, and reports, float32
    # warm-up and repeats at batch 1, then warm-up and max(3, repeats // 4) at the throughput batch
    assert calls == [(1, 3, RESOLUTION, RESOLUTION)] * 5 + [(2, 3, RESOLUTION, RESOLUTION)] * 4
    assert timing.latency_ms > 0 and timing.throughput_ips > 0 and timing.latency_cv >= 0


def test_a_runtime_with_autocast_honours_bf16():
    timing = measure_runtime(_cnn(), RESOLUTION, runtime="torch", dtype=torch.bfloat16, warmup=0, repeats=2,
                             batch_size=2)
    assert timing.dtype == "bfloat16" and timing.batch_size == 2


def test_the_timing_loop_leaves_out_the_warm_up_and_the_callers_model_alone():
    seen = []
    times = time_calls(lambda batch: seen.append(batch.shape[0]), torch.zeros(2, 3), warmup=2, repeats=3,
                       device=torch.device("cpu"))
    assert len(times) == 3 and len(seen) == 5 and all(t >= 0 for t in times)
    model = _cnn().train()
    measure_latency(model, RESOLUTION, warmup=0, repeats=1)
    assert model.training and next(model.parameters()).dtype == torch.float32


def test_a_runtime_whose_module_is_missing_says_how_to_get_it(monkeypatch):
    missing = Runtime("missing", prepare=lambda model, resolution, device, threads: model,
                      module="pxd_no_such_module", install="pip install 'pxd[missing]'")
    monkeypatch.setitem(RUNTIMES, "missing", missing)
    with pytest.raises(RuntimeError, match=r"optional extra: pip install 'pxd\[missing\]'"):
        measure_runtime(_cnn(), RESOLUTION, runtime="missing", warmup=0, repeats=2, batch_size=2)
