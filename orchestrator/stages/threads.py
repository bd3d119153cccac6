"""A trial's CPU threads while it trains or waits for a shared stage: its own, plus what the driver lends it
(`cpu-shares.json` in the sweep's folder, written by `orchestrator.driver.lending`), plus the threads of the
trials waiting for a stage it trains (`cpu-waits/<trial id>.json`). The files are the protocol between the
driver and its trials; see `orchestrator.driver.lending` for when CPUs are lent."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["SHARES_FILE", "WAITS_DIR", "SharedThreads", "wait_path", "write_shares"]

SHARES_FILE = "cpu-shares.json"
WAITS_DIR = "cpu-waits"


def write_shares(path: Path, shares: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(shares, sort_keys=True))
    os.replace(tmp, path)  # a trial reading it sees the old or the new file, never half of one


def wait_path(sweep_dir: Path, trial_id: str) -> Path:
    return sweep_dir / WAITS_DIR / f"{''.join(c if c.isalnum() or c in '-_' else '_' for c in trial_id)}.json"


class SharedThreads:
    """A trial's `cpu_threads` (`pxd.train.CpuThreads`): its own threads, plus what the driver lends it,
    plus the threads of the trials waiting for a stage it is training; read at most once every
    `interval_s`. The stage store tells it which stage the trial trains (`holding`) or waits for
    (`start_waiting` / `stop_waiting`)."""

    def __init__(self, path: str | Path, trial_id: str, base: int, interval_s: float = 1.0) -> None:
        self.path = Path(path)
        self.trial_id = trial_id
        self.base = max(1, int(base))
        self.interval_s = interval_s
        self._checked = -float("inf")
        self._stamp: int | None = None
        self._extra = 0
        self._from_waiters = 0
        self._held: set[str] = set()
        self._wait = wait_path(self.path.parent, trial_id)
        self._waiting_for: str | None = None

    def __call__(self) -> int:
        now = time.monotonic()
        if now - self._checked >= self.interval_s:
            self._checked = now
            self._read()
        return self.base + self._extra + self._from_waiters

    @contextmanager
    def holding(self, key: str) -> Iterator[None]:
        """This trial trains stage `key`: trials waiting for it lend it their threads meanwhile."""
        self._held.add(key)
        self._checked = -float("inf")
        try:
            yield
        finally:
            self._held.discard(key)
            self._from_waiters = 0

    def start_waiting(self, key: str) -> None:
        """This trial waits for stage `key`, which another trial trains: its threads go there. Written once
        per wait, not at every poll of the wait loop."""
        if self._waiting_for == key:
            return
        self._wait.parent.mkdir(parents=True, exist_ok=True)
        write_shares(self._wait, {"key": key, "threads": self.base})
        self._waiting_for = key

    def stop_waiting(self) -> None:
        if self._waiting_for is not None:
            self._wait.unlink(missing_ok=True)
            self._waiting_for = None

    def _read(self) -> None:
        try:
            stamp = self.path.stat().st_mtime_ns
            if stamp != self._stamp:
                self._extra = int(json.loads(self.path.read_text()).get(self.trial_id, 0))
                self._stamp = stamp
        except (OSError, ValueError):
            self._extra = 0  # no file yet (or being replaced): the trial's own threads
        self._from_waiters = sum(wait.get("threads", 0) for wait in self._waits() if wait.get("key") in self._held)

    def _waits(self) -> Iterator[dict[str, Any]]:
        if not self._held:
            return
        for path in self._wait.parent.glob("*.json"):
            try:
                wait = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # withdrawn (or being written) as we read
            if isinstance(wait, dict):
                yield wait
