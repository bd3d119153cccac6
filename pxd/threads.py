"""The CPU threads a stage trains with: fixed, or following what a caller lends it step by step."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

__all__ = ["CpuThreads", "ThreadUse"]

# cpu_threads() → the CPU threads the stage may use from now on; asked before every step (a sweep lends the
# CPUs of its idle trial slots to the trials still running: `orchestrator.driver.lending`). Keep it cheap.
CpuThreads = Callable[[], int]


class ThreadUse:
    """torch's intra-op threads through one stage: follows `cpu_threads` (when given), counts
    thread-seconds, and restores the count it found when closed, so that what runs after the stage (latency
    timing) never sees lent threads. A thread count changes float summation order, so a stage that ran on
    lent threads can differ from a run on one thread in the last digits."""

    def __init__(self, cpu_threads: CpuThreads | None) -> None:
        self.source = cpu_threads
        self.found = self.threads = torch.get_num_threads()
        self.started = self.since = time.perf_counter()
        self.thread_seconds = 0.0

    def update(self) -> None:
        if self.source is None:
            return
        wanted = max(1, int(self.source()))
        if wanted != self.threads:
            now = time.perf_counter()
            self.thread_seconds += (now - self.since) * self.threads
            self.since = now
            torch.set_num_threads(wanted)
            self.threads = wanted

    def mean(self) -> float:
        """Time-weighted mean of the threads used so far."""
        now = time.perf_counter()
        elapsed = now - self.started
        return (self.thread_seconds + (now - self.since) * self.threads) / elapsed if elapsed > 0 else float(self.threads)

    def __enter__(self) -> ThreadUse:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.threads != self.found:
            torch.set_num_threads(self.found)
            self.threads = self.found
