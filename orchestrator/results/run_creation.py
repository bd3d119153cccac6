"""One run per creation: a run creation MLflow's client retried after its answer was lost leaves no second run."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from orchestrator.results.schema import Tag

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = ["new_run_token", "drop_duplicate_runs"]


def new_run_token() -> dict[str, str]:
    """The tag that makes one run's creation recognisable (`Tag.CREATED_AS`)."""
    return {Tag.CREATED_AS: uuid.uuid4().hex}


def drop_duplicate_runs(client: MlflowClient, experiment_id: str, tags: Mapping[str, str], kept: str,
                        retried: Sequence[str] = ("unwatched",)) -> list[str]:
    """Delete the runs that one creation left besides `kept`. MLflow's client retries a POST whose answer was
    lost (the tracking server died after committing it), and the server then creates a second run: the one
    whose id the caller never saw would stay RUNNING forever (for a trial, an extra, lost attempt). Returns
    the ids deleted. One search, made only when `retried` (what `orchestrator.tracking.retries.watch_retries`
    saw around the creation; by default: unknown) holds a request sent more than once."""
    if not retried:
        return []
    token = tags[Tag.CREATED_AS]
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{Tag.CREATED_AS}` = '{token}'", max_results=50)
    duplicates = [run.info.run_id for run in runs if run.info.run_id != kept]
    for run_id in duplicates:
        client.delete_run(run_id)
    return duplicates
