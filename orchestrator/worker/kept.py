"""What a kept worker process holds between trials: one object, created once per process and passed in.

With `search.reuse_actors` a Ray worker process runs trial after trial. `WorkerState` is everything it keeps
between them — the dataset's splits, the stage store's verified checkpoints and look-ups, and the library's
process memory (upstream modules, static costs, latency timings) — so a test builds a fresh one instead of
resetting module globals. `TuneTrial` (orchestrator.worker.trainable) creates it on the process's first trial.

`PXD_OVERHEAD_CUTS=0` turns every cut off, to measure them (bench/overhead.py): it is read here, once, when
the state is created. Then nothing is kept between trials, every trial times its own student's latency (no
`pxd.cost.LatencyCache`) and nothing warms up in the background.

`PXD_SIMULATED_TRAINING=<seconds per epoch>` (benchmarks and tests only, never on by default: bench/scale.py)
replaces every stage's training with a sleep and a deterministic score (`pxd.simulated`) while every
orchestration call stays real; read here, once, like the cuts, and passed to the pipeline (`stage_trainer`).
The trial and stage runs it produces are marked (`Tag.SIMULATED_TRAINING`, a param) and their stages have
keys of their own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.stages.memory import StageMemory
from pxd.cost import LatencyCache
from pxd.data import cache_root, load_dataset
from pxd.memo import ProcessMemory
from pxd.simulated import SimulatedTraining
from pxd.train import StageTrainer, train_stage

if TYPE_CHECKING:
    from pxd.config import PipelineConfig
    from pxd.types import DatasetSplits

__all__ = ["OVERHEAD_CUTS_ENV", "SIMULATED_TRAINING_ENV", "WorkerState", "overhead_cuts_from_environment",
           "simulated_training_from_environment"]

OVERHEAD_CUTS_ENV = "PXD_OVERHEAD_CUTS"
SIMULATED_TRAINING_ENV = "PXD_SIMULATED_TRAINING"


def overhead_cuts_from_environment() -> bool:
    """False when `PXD_OVERHEAD_CUTS` is "0" (every cut off, to measure them)."""
    return os.environ.get(OVERHEAD_CUTS_ENV, "1") != "0"


def simulated_training_from_environment() -> SimulatedTraining | None:
    """A `SimulatedTraining` sleeping `PXD_SIMULATED_TRAINING` seconds per epoch when that is set (benchmarks and
    tests only), else None: stages train for real."""
    value = os.environ.get(SIMULATED_TRAINING_ENV, "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{SIMULATED_TRAINING_ENV}={value!r}: give the seconds each simulated epoch sleeps "
                         "(e.g. 0.5), or unset it to train for real") from None
    return SimulatedTraining(seconds_per_epoch=max(0.0, seconds))


@dataclass
class WorkerState:
    """Everything a worker process keeps between trials (see the module docstring)."""

    overhead_cuts: bool = True
    simulated: SimulatedTraining | None = None  # `PXD_SIMULATED_TRAINING`: no stage trains for real
    stages: StageMemory = field(default_factory=StageMemory)
    library: ProcessMemory = field(default_factory=ProcessMemory)
    # (dataset config, seed) → its splits; one entry: a sweep has one dataset
    datasets: dict[tuple[Any, int], DatasetSplits] = field(default_factory=dict)

    @classmethod
    def from_environment(cls) -> WorkerState:
        cuts = overhead_cuts_from_environment()
        return cls(overhead_cuts=cuts, stages=StageMemory(remember_found=cuts),
                   simulated=simulated_training_from_environment())

    def stage_trainer(self) -> StageTrainer:
        """What trains the trial's stages: `train_stage`, or the simulated stand-in."""
        return self.simulated if self.simulated is not None else train_stage

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
