"""What a sweep launch is asked (`SweepOptions`, the CLI's flags) and what it returns (`SweepOutcome`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.results.frontier import TrialRow

__all__ = ["SweepOptions", "SweepOutcome"]


@dataclass
class SweepOptions:
    name: str | None = None
    resume: bool = False
    tracking_uri: str | None = None
    ray_address: str | None = None
    optuna_storage: str | None = None
    root: str | None = None
    reuse_stages: bool = True
    force_retrain: bool = False
    quiet: bool = False


@dataclass
class SweepOutcome:
    sweep_name: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    table: dict[str, Any]
    rows: list[TrialRow]
    ui: str
    trials_budget: int = 0  # search.trials of this launch
