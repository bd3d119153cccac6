"""Simulated training: a stage's training replaced by a short sleep and a deterministic score.

For benchmarks and tests of the orchestration only (bench/scale.py runs 1,000 trials on 2 CPU cores with
it): everything around a stage stays real (the models are built, the stage is stored, looked up, leased and
loaded, its epochs are reported and logged, the student is timed and logged), but `SimulatedTraining`
takes the place of `pxd.train.train_stage`: it sleeps `seconds_per_epoch` per epoch, calls `on_epoch` as
training would, and returns the model's initial weights with a `val_top1` that is a fixed function of what
the stage was given (its kind, input size, the model's size, the distillation and optimiser settings, the
seed), so the same sampled params always score the same and the searcher and the frontier see a landscape
that depends on them.

Never on by default: `pxd.pipeline.run_tas(train=...)` takes `train_stage` unless a caller passes a
`SimulatedTraining`; the orchestrator passes one only when `PXD_SIMULATED_TRAINING` is set
(`orchestrator.worker.kept`). A simulated stage has a stage key of its own (`SIMULATED_IDENTITY` joins
its identity), so it is never taken for a trained one, and a caller marks its runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from pxd.train import EpochCallback, StageResult

__all__ = ["SIMULATED_IDENTITY", "SimulatedTraining", "simulated_score"]

# joins every stage's identity (`pxd.stages.stage_keys`) when training is simulated; bump the version when the
# score changes
SIMULATED_IDENTITY = {"simulated_training": 1}


def simulated_score(kind: str, *, resolution: int, image_resolution: int, parameters: int, settings: dict[str, Any],
                    seed: int) -> float:
    """A `val_top1` in [0.05, 0.98] that grows with the input size and the model's size, plus a fixed offset
    in ±0.06 hashed from everything the stage was given (its distillation and optimiser settings included)."""
    text = json.dumps({"kind": kind, "resolution": resolution, "parameters": parameters, "seed": seed, **settings},
                      sort_keys=True, default=str)
    offset = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF * 0.12 - 0.06
    size = math.sqrt(resolution / max(image_resolution, 1))
    capacity = min(1.0, math.log10(max(parameters, 10)) / 7)
    return min(0.98, max(0.05, 0.25 + 0.45 * size + 0.2 * capacity + offset))


@dataclass(frozen=True)
class SimulatedTraining:
    """Called as `pxd.train.train_stage` is, with the same arguments; trains nothing (see the module docstring)."""

    seconds_per_epoch: float
    # what joins each stage's identity and its stored run's params (`pxd.pipeline.run_tas`)
    identity: ClassVar[dict[str, int]] = SIMULATED_IDENTITY

    def __call__(self, kind: str, model: nn.Module, data: Any = None, *, resolution: int, image_resolution: int,
                 teacher: nn.Module | None = None, distill: Any = None, train: Any = None, epochs: int, seed: int,
                 on_epoch: EpochCallback | None = None, checkpointing: Any = None, **_: Any) -> StageResult:
        settings = {"distill": _fields(distill), "train": _fields(train)}
        parameters = sum(p.numel() for p in model.parameters())
        final = simulated_score(kind, resolution=resolution, image_resolution=image_resolution,
                                parameters=parameters, settings=settings, seed=seed)
        started = time.perf_counter()
        history = []
        for epoch in range(1, epochs + 1):
            time.sleep(self.seconds_per_epoch)
            # a learning curve that reaches the final score at the last epoch
            record = {"val_top1": final * (epoch / epochs) ** 0.3, "train_loss": 2.0 / epoch,
                      "epoch": float(epoch), "epoch_seconds": self.seconds_per_epoch}
            history.append(record)
            if on_epoch is not None:
                on_epoch(kind, epoch, dict(record))
        state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
        metrics = {"val_top1": final, "best_epoch": float(epochs), "epochs": float(epochs),
                   "train_seconds": time.perf_counter() - started, "train_threads": 1.0}
        return StageResult(kind=kind, state_dict=state, metrics=metrics, history=history)


def _fields(section: Any) -> dict[str, Any]:
    return dataclasses.asdict(section) if dataclasses.is_dataclass(section) else {}
