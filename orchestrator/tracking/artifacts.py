"""Uploads to a run whose artifact location pxd already holds.

`MlflowClient.log_artifact` / `log_dict` look the run up on the tracking server (one `runs/get` request)
the first time a process uploads to it, to learn where its artifacts go. pxd uploads once or twice to
each new trial and stage run, and holds the run's `artifact_uri` from creating it, so that look-up is one
request per upload: a trial's run and its stage's, two of a trial's ~30 requests at scale
(bench/scale.py). `upload_bytes` writes straight to the artifact location instead, and `run_artifacts` is
that location's repository, to list and download from (MLflow 3's `download_artifacts` also reads the run
back twice and searches its logged models first: ~8 requests a file, 3 this way).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = ["run_artifacts", "upload_bytes", "upload_json"]


def run_artifacts(tracking_uri: str, artifact_uri: str) -> Any:
    """The artifact repository of a run's `artifact_uri` (`run.info.artifact_uri`), through the tracking server
    when artifacts are proxied: `list_artifacts(folder)`, `download_artifacts(path, dst)`, `log_artifact`."""
    # mlflow: imported on first use (start-up cost of the modules that import this one)
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(artifact_uri, tracking_uri=tracking_uri)


def upload_bytes(tracking_uri: str, artifact_uri: str, artifact: str, payload: bytes) -> None:
    """Write `payload` as `artifact` ("folder/name" or "name") under a run's `artifact_uri` (from its
    creation: `run.info.artifact_uri`), through the tracking server when artifacts are proxied."""
    folder, _, name = artifact.rpartition("/")
    with tempfile.TemporaryDirectory(prefix="pxd-upload-") as tmp:
        path = Path(tmp) / name
        path.write_bytes(payload)
        run_artifacts(tracking_uri, artifact_uri).log_artifact(str(path), folder or None)


def upload_json(client: MlflowClient, run_id: str, artifact_uri: str | None, data: Any, artifact: str) -> None:
    """`data` as JSON in the run's `artifact`: straight to `artifact_uri` when the caller holds it, else through
    `MlflowClient.log_dict` (which looks the run up first)."""
    if artifact_uri is None:
        client.log_dict(run_id, data, artifact)
    else:
        upload_bytes(client.tracking_uri, artifact_uri, artifact, json.dumps(data, indent=2).encode())
