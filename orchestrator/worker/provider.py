"""The stage provider a trial (and the teacher warm-up) uses: the MLflow stage store, with leases in the
sweep's lease database and what the worker process keeps."""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.stages.leases import LocalLeases, SqlLeases
from orchestrator.stages.store import MlflowStageStore

if TYPE_CHECKING:
    from orchestrator.stages.memory import StageMemory
    from orchestrator.stages.threads import SharedThreads
    from orchestrator.worker.context import TrialContext

__all__ = ["make_provider"]


def make_provider(context: TrialContext, memory: StageMemory | None = None, parent_run_id: str | None = None,
                  lending: SharedThreads | None = None) -> MlflowStageStore:
    """The stage provider a trial uses: the MLflow store with leases in the sweep's lease database."""
    leases = SqlLeases(context.lease_url) if context.lease_url else LocalLeases()
    return MlflowStageStore(
        context.tracking_uri,
        leases=leases,
        force_retrain=context.force_retrain or not context.reuse_stages,
        wait_timeout_s=context.stage_wait_timeout_s,
        trial_run_id=parent_run_id,
        sweep_name=context.sweep_name,
        lending=lending,
        memory=memory,
    )
