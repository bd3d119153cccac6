"""The GPU busy sampler of bench/overhead.py --gpu-busy (bench/gpu_busy.py): its window arithmetic on
hand-made samples, and the error a machine without NVML gets before any sweep starts."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_busy import GpuBusySampler, NvmlUnavailable, summarise

ROOT = Path(__file__).resolve().parents[1]


def _has_nvml_gpu() -> bool:
    try:
        with GpuBusySampler(0):
            return True
    except NvmlUnavailable:
        return False


def test_busy_fraction_is_the_mean_utilisation_inside_the_window():
    # (time, busy 0–1, memory MiB): idle start-up, a busy trial phase, an idle wind-down
    samples = [(0.0, 0.0, 100.0), (1.0, 0.0, 100.0), (2.0, 0.9, 900.0), (3.0, 1.0, 1200.0),
               (4.0, 0.5, 800.0), (5.0, 0.0, 150.0)]
    whole = summarise(samples)
    assert whole["samples"] == 6 and whole["busy_fraction"] == pytest.approx(2.4 / 6)
    assert whole["any_kernel_fraction"] == pytest.approx(3 / 6) and whole["memory_used_max_mib"] == 1200.0
    trial_phase = summarise(samples, start=2.0, end=4.0)
    assert trial_phase["samples"] == 3 and trial_phase["busy_fraction"] == pytest.approx(0.8)
    assert trial_phase["span_s"] == 2.0
    empty = summarise(samples, start=10.0)
    assert empty["samples"] == 0 and math.isnan(empty["busy_fraction"])


@pytest.mark.skipif(_has_nvml_gpu(), reason="this machine has an NVIDIA GPU: NVML starts")
def test_without_a_gpu_the_benchmark_stops_before_any_sweep_with_one_clear_error():
    with pytest.raises(NvmlUnavailable, match="NVML|nvidia-ml-py"):
        with GpuBusySampler(0):
            pass
    done = subprocess.run([sys.executable, "bench/overhead.py", "--gpu-busy"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2, done.stderr
    assert "--gpu-busy:" in done.stderr and "[bench]" not in done.stderr  # no sweep began
