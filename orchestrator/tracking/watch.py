"""The runs of a filter, read as they end, so that a sweep's end reads only what ended last.

A sweep's end needs every trial run (its frontier) and every stage run the sweep trained (its totals).
Read back in one search each when the sweep is over, that grows with the sweep: ~1.2 s for 200 trial
runs on a loaded 2-core machine, a minute at a few thousand (bench/scale.py). `RunsWatch` reads them
while the sweep runs instead, in a thread of the driver: every `interval_s` it searches the runs of its
filter that ended since the latest end it has seen, less `skew_ms` (the runs end on other machines, whose
clocks may differ a little: a run that ends that much "in the past" is still read). At the sweep's end
`final()` reads only what ended since, and the runs still RUNNING (lost attempts, for the reconciliation).

A run's tags and metrics are read after it ends: pxd writes a trial's or a stage's record, then ends its
run, and a run ended again later (a lost attempt closed FAILED) has a new end time and is read again.
A failed read (the tracking server restarting) is skipped; the next one reads from the same point, and
`final()` reads through MLflow's own retries, so the end still sees every run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

__all__ = ["RunsWatch"]

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 15.0
CLOCK_SKEW_MS = 60_000


class RunsWatch:
    """The runs matching `filter_string` in the experiment `experiment_id()` names (None while it does not
    exist yet), kept by run id as they end. `start()` reads in a thread of its own; `final()` stops it and
    returns every run, newest first, as one `search_runs` at the end would."""

    def __init__(self, client: MlflowClient, experiment_id: Callable[[], str | None], filter_string: str, *,
                 interval_s: float = WATCH_INTERVAL_S, skew_ms: int = CLOCK_SKEW_MS) -> None:
        self.client, self.experiment_id, self.filter_string = client, experiment_id, filter_string
        self.interval_s, self.skew_ms = interval_s, skew_ms
        self.runs: dict[str, Run] = {}
        self.latest_end_ms: int | None = None  # the latest end time read so far
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> RunsWatch:
        self._thread = threading.Thread(target=self._loop, name="pxd-runs-watch", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.read_ended()
            except Exception as exc:  # noqa: BLE001 - the next read, or final(), reads from the same point
                logger.debug("runs watch: read skipped (%s)", exc)

    def _search(self, experiment: str, extra: str) -> list[Run]:
        return list(self.client.search_runs([experiment], filter_string=f"{self.filter_string} and {extra}",
                                            max_results=50000))

    def read_ended(self) -> None:
        """Read the runs that ended since the latest end seen (less the clock skew)."""
        with self._lock:
            experiment = self.experiment_id()
            if experiment is None:
                return
            since = 0 if self.latest_end_ms is None else self.latest_end_ms - self.skew_ms
            ended = self._search(experiment, f"attributes.end_time >= {since}")
            for run in ended:
                self.runs[run.info.run_id] = run
                if run.info.end_time is not None:
                    self.latest_end_ms = max(self.latest_end_ms or 0, run.info.end_time)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def final(self) -> list[Run]:
        """Stop watching; every run of the filter: those ended (read now what ended last) and those RUNNING."""
        self.stop()
        self.read_ended()
        experiment = self.experiment_id()
        runs = dict(self.runs)
        if experiment is not None:
            for run in self._search(experiment, "attributes.status = 'RUNNING'"):
                runs[run.info.run_id] = run
        return sorted(runs.values(), key=lambda run: run.info.start_time or 0, reverse=True)
