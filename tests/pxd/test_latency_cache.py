"""Latency timed once per architecture and input (`pxd.cost.LatencyCache`), and the pipeline's timed sections."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pxd.config import PipelineConfig
from pxd.cost import Cost, LatencyCache, measure_cost
from pxd.memo import ProcessMemory
from pxd.pipeline import TIMED_SECTIONS, LatencySettings, run_tas


def _cnn(seed: int, width: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, 5))


def _measure(model: nn.Module, resolution: int, cache: LatencyCache) -> Cost:
    return measure_cost(model, resolution, warmup=0, repeats=1, throughput_batch=2, cache=cache,
                        architecture={"arch": "cnn"})


def test_the_same_architecture_and_input_reuse_one_measurement(tmp_path):
    cache = LatencyCache("sweep-a", tmp_path, memory=ProcessMemory())
    first = _measure(_cnn(0), 16, cache)
    second = _measure(_cnn(1), 16, cache)  # other weights, same architecture
    assert not first.latency_reused and second.latency_reused
    assert second.latency_ms == first.latency_ms and second.throughput_ips == first.throughput_ips
    assert second.gmacs == first.gmacs  # the static figures are counted, not cached


def test_another_resolution_architecture_or_scope_is_timed_again(tmp_path):
    memory = ProcessMemory()
    cache = LatencyCache("sweep-a", tmp_path, memory=memory)
    _measure(_cnn(0), 16, cache)
    assert not _measure(_cnn(0), 24, cache).latency_reused
    assert not _measure(_cnn(0, width=16), 16, cache).latency_reused
    assert not _measure(_cnn(0), 16, LatencyCache("sweep-b", tmp_path, memory=memory)).latency_reused
    assert not measure_cost(_cnn(0), 16, warmup=0, repeats=2, throughput_batch=2, cache=cache,
                            architecture={"arch": "cnn"}).latency_reused  # other timing settings


def test_another_process_reuses_the_measurement_on_disk(tmp_path):
    first = _measure(_cnn(0), 16, LatencyCache("sweep-a", tmp_path, memory=ProcessMemory()))
    # as a new trial process starts: its own, empty memory
    again = _measure(_cnn(0), 16, LatencyCache("sweep-a", tmp_path, memory=ProcessMemory()))
    assert again.latency_reused and again.latency_ms == first.latency_ms


def test_a_process_memory_alone_is_shared_by_its_caches_and_a_cache_with_neither_keeps_nothing():
    memory = ProcessMemory()
    assert not _measure(_cnn(0), 16, LatencyCache("sweep-a", memory=memory)).latency_reused
    assert _measure(_cnn(1), 16, LatencyCache("sweep-a", memory=memory)).latency_reused  # another cache, same memory
    assert not _measure(_cnn(0), 16, LatencyCache("sweep-a", memory=ProcessMemory())).latency_reused
    bare = LatencyCache("sweep-a")
    assert not _measure(_cnn(0), 16, bare).latency_reused and not _measure(_cnn(0), 16, bare).latency_reused


def test_without_a_cache_every_call_is_timed(tmp_path):
    assert not measure_cost(_cnn(0), 16, warmup=0, repeats=1, throughput_batch=2).latency_reused
    assert not measure_cost(_cnn(0), 16, warmup=0, repeats=1, throughput_batch=2).latency_reused


def test_the_pipeline_reports_its_sections_and_reuses_latency(tiny_raw, tmp_path):
    cfg = PipelineConfig.from_dict(tiny_raw)
    latency = LatencySettings(repeats=1, warmup=0, cache=LatencyCache("run", tmp_path))
    first = run_tas(cfg, progress=False, latency=latency)
    second = run_tas(cfg, progress=False, latency=latency)
    assert set(first.timings) == set(TIMED_SECTIONS)
    assert all(seconds >= 0 for seconds in first.timings.values())
    # nothing reused by the default provider: "training" is every stage's training time
    trained = sum(o.result.metrics["train_seconds"] for o in first.stages.values())
    assert first.timings["training"] == pytest.approx(trained)
    assert not first.cost["latency_reused"] and second.cost["latency_reused"]
    assert second.metrics["latency_ms"] == first.metrics["latency_ms"]
