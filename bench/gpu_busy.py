"""GPU busy fraction over a sweep, sampled with NVML.

    with GpuBusySampler(index=0, interval_s=0.1) as sampler:
        ... run the sweep ...
    sampler.summary(start=t0, end=t1)   # over the whole run, or a window of it (time.time() seconds)

NVML's `utilization.gpu` is the percentage of its last sample period (1/6 s to 1 s, by product) during
which at least one kernel ran on the GPU: its mean over a window is the fraction of that window the GPU
was busy. Memory used is sampled beside it. `bench/overhead.py --gpu-busy` runs a sweep inside a sampler
and prints the busy fraction over the sweep and over its trial phase. Needs `pip install nvidia-ml-py`
(the `gpu` extra) and an NVIDIA GPU; without them `GpuBusySampler` raises `NvmlUnavailable` at once, before
any sweep starts. Not part of the test suite's measurements.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used here: no `pynvml` module, no NVIDIA driver or no GPU at the given index."""


def _nvml() -> Any:
    try:
        import pynvml
    except ImportError as error:
        raise NvmlUnavailable(
            "GPU busy sampling needs NVML's Python binding: pip install 'nvidia-ml-py' (pxd's `gpu` extra)"
        ) from error
    return pynvml


class GpuBusySampler:
    """A background thread reading NVML's utilisation of one GPU every `interval_s` seconds."""

    def __init__(self, index: int = 0, interval_s: float = 0.1) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.index = index
        self.interval_s = interval_s
        self.samples: list[tuple[float, float, float]] = []  # (time.time(), busy 0–1, memory used MiB)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pynvml: Any = None
        self._handle: Any = None
        self.name = ""

    def __enter__(self) -> "GpuBusySampler":
        pynvml = _nvml()
        try:
            pynvml.nvmlInit()
        except Exception as error:  # pynvml.NVMLError_* (no driver, no library)
            raise NvmlUnavailable(f"NVML did not start ({error}): no NVIDIA driver or GPU on this machine") from error
        try:
            count = pynvml.nvmlDeviceGetCount()
            if not 0 <= self.index < count:
                raise NvmlUnavailable(f"GPU index {self.index} does not exist: NVML sees {count} GPU(s)")
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            name = pynvml.nvmlDeviceGetName(self._handle)
            self.name = name.decode() if isinstance(name, bytes) else str(name)
        except BaseException:
            pynvml.nvmlShutdown()
            raise
        self._pynvml = pynvml
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="gpu-busy-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            rates = self._pynvml.nvmlDeviceGetUtilizationRates(self._handle)
            memory = self._pynvml.nvmlDeviceGetMemoryInfo(self._handle)
            self.samples.append((time.time(), rates.gpu / 100.0, memory.used / 2**20))
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._pynvml is not None:
            self._pynvml.nvmlShutdown()
            self._pynvml = None

    def summary(self, start: float | None = None, end: float | None = None) -> dict[str, Any]:
        return summarise(self.samples, start, end) | {"gpu": self.name, "index": self.index}


def summarise(samples: list[tuple[float, float, float]], start: float | None = None,
              end: float | None = None) -> dict[str, Any]:
    """Busy fraction (mean utilisation), the share of samples with any kernel running, and peak memory,
    over the samples whose time lies in [start, end] (all of them where a bound is None)."""
    window = [s for s in samples if (start is None or s[0] >= start) and (end is None or s[0] <= end)]
    if not window:
        return {"samples": 0, "busy_fraction": float("nan"), "any_kernel_fraction": float("nan"),
                "memory_used_max_mib": float("nan"), "span_s": 0.0}
    busy = [s[1] for s in window]
    return {"samples": len(window), "busy_fraction": statistics.fmean(busy),
            "any_kernel_fraction": sum(b > 0 for b in busy) / len(busy),
            "memory_used_max_mib": max(s[2] for s in window), "span_s": window[-1][0] - window[0][0]}
