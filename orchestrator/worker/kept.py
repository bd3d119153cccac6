"""What a kept worker process holds between trials: one object, created once per process and passed in.

With `search.reuse_actors` a Ray worker process runs trial after trial. `WorkerState` is everything it keeps
between them — the dataset's splits, the stage store's verified checkpoints and look-ups, and the library's
process memory (upstream modules, static costs, latency timings) — so a test builds a fresh one instead of
resetting module globals. `TuneTrial` (orchestrator.worker.trainable) creates it on the process's first trial.

`PXD_OVERHEAD_CUTS=0` turns every cut off, to measure them (bench/overhead.py): it is read here, once, when
the state is created. Then nothing is kept between trials, every trial times its own student's latency (no
`pxd.cost.LatencyCache`) and nothing warms up in the background.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.stages.memory import StageMemory
from pxd.cost import LatencyCache
from pxd.data import cache_root, load_dataset
from pxd.memo import ProcessMemory

if TYPE_CHECKING:
    from pxd.config import PipelineConfig
    from pxd.types import DatasetSplits

__all__ = ["OVERHEAD_CUTS_ENV", "WorkerState", "overhead_cuts_from_environment"]

OVERHEAD_CUTS_ENV = "PXD_OVERHEAD_CUTS"


def overhead_cuts_from_environment() -> bool:
    """False when `PXD_OVERHEAD_CUTS` is "0" (every cut off, to measure them)."""
    return os.environ.get(OVERHEAD_CUTS_ENV, "1") != "0"


@dataclass
class WorkerState:
    """Everything a worker process keeps between trials (see the module docstring)."""

    overhead_cuts: bool = True
    stages: StageMemory = field(default_factory=StageMemory)
    library: ProcessMemory = field(default_factory=ProcessMemory)
    # (dataset config, seed) → its splits; one entry: a sweep has one dataset
    datasets: dict[tuple[Any, int], DatasetSplits] = field(default_factory=dict)

    @classmethod
    def from_environment(cls) -> WorkerState:
        cuts = overhead_cuts_from_environment()
        return cls(overhead_cuts=cuts, stages=StageMemory(remember_found=cuts))

    def dataset(self, config: PipelineConfig) -> DatasetSplits | None:
        """The trial's dataset, loaded once per worker process: a reused process does not generate the
        synthetic set or map a decoded dataset again. None (the pipeline loads it itself) when the overhead
        cuts are off. Splits are only ever read, so trials can share them."""
        if not self.overhead_cuts:
            return None
        key = (config.dataset, config.seed)
        if key not in self.datasets:
            self.datasets.clear()
            self.datasets[key] = load_dataset(config.dataset, config.seed, progress=False)
        return self.datasets[key]

    def pipeline_memory(self) -> ProcessMemory | None:
        """What the pipeline keeps between runs in this process (upstream modules, static costs); None when
        the overhead cuts are off."""
        return self.library if self.overhead_cuts else None

    def latency_cache(self, scope: str, config: PipelineConfig) -> LatencyCache | None:
        """Latency measured once per architecture and input within the sweep (`scope`), shared by its trials
        on this machine (beside its decoded datasets); None when the overhead cuts are off."""
        if not self.overhead_cuts:
            return None
        return LatencyCache(scope=scope, directory=cache_root(config.dataset) / "latency", memory=self.library)
