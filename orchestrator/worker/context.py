"""What a trial needs from the driver (`TrialContext`): picklable, sent once to every trial."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.space.spec import SweepSpec

__all__ = ["TrialContext"]


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs from the driver; picklable, sent once to every trial."""

    spec: SweepSpec
    sweep_name: str
    tracking_uri: str = field(repr=False)  # may hold credentials (`orchestrator.tracking.credentials`)
    experiment_id: str
    parent_run_id: str
    reuse_stages: bool = True
    force_retrain: bool = False
    stage_wait_timeout_s: float = 3600.0
    lease_url: str | None = field(default=None, repr=False)  # SQL database for single-flight stage leases
    cpu_shares_path: str | None = None  # where the driver lends idle CPUs (`orchestrator.driver.lending`); None: never
