"""`pxd stages`: every stored stage with its key, kind, metrics, checkpoint size and state."""

from __future__ import annotations

import json
from typing import Any

from mlflow.tracking import MlflowClient

from orchestrator.results.schema import STAGES_EXPERIMENT, Tag
from pxd.metrics import primary_metric

__all__ = ["list_stages"]


def list_stages(tracking_uri: str) -> list[dict[str, Any]]:
    """Every stored stage: key, kind, metrics, checkpoint size, state."""

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(STAGES_EXPERIMENT)
    if experiment is None:
        return []
    rows = []
    for run in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"], max_results=5000):
        tags = run.data.tags
        usable = tags.get(Tag.STAGE_COMPLETE) == "true" and tags.get(Tag.STAGE_CORRUPT) != "true" and run.info.status == "FINISHED"
        state = "ok" if usable else ("corrupt" if tags.get(Tag.STAGE_CORRUPT) == "true" else run.info.status.lower())
        if state == run.info.status.lower() and tags.get(Tag.STAGE_COMPLETE) != "true" and Tag.STAGE_PARTIAL in tags:
            state = f"incomplete (epoch {json.loads(tags[Tag.STAGE_PARTIAL])['epoch']})"
        rows.append({
            "key": tags.get(Tag.STAGE_KEY, ""),
            "stage": tags.get(Tag.STAGE, ""),
            "arch": run.data.params.get("arch", ""),
            "resolution": run.data.params.get("resolution", ""),
            primary_metric(): run.data.metrics.get(primary_metric(), float("nan")),
            "train_seconds": run.data.metrics.get("train_seconds", float("nan")),
            "size_mb": run.data.metrics.get("checkpoint_bytes", 0.0) / 1e6,
            "state": state,
            "run_id": run.info.run_id,
        })
    return rows
