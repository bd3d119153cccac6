"""The sweep's MLflow experiment and parent run: created (or found on resume), and marked when a launch fails."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from orchestrator.results import schema
from orchestrator.tracking import credentials

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from orchestrator.space.spec import SweepSpec

__all__ = ["ensure_experiment", "open_parent_run", "end_parent_run"]


def end_parent_run(tracking_uri: str, parent_run_id: str, exc: BaseException) -> None:
    """A launch that ends in an error marks its sweep's parent run as MLflow's own `with start_run()` does:
    KILLED for an interrupt that reaches pxd (Tune itself takes a first Ctrl-C during `fit`, ends the
    trials and returns, and the sweep then finishes as usual), else FAILED (a resume sets it RUNNING again). Best effort, with no retries:
    the tracking server may be what failed, and the error must reach the user now."""

    status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
    previous = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        MlflowClient(tracking_uri).set_terminated(parent_run_id, status=status)
    except Exception:  # noqa: BLE001 - the launch's own error is the one to show
        pass
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = previous


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The space's experiment, created if needed; it opens in MLflow's model-training view (MLflow 3 shows
    the GenAI view unless the experiment says otherwise)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        experiment_id = str(experiment.experiment_id)
    else:
        try:
            experiment_id = str(client.create_experiment(name))
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            # another sweep of the same space, launched at the same moment, created it first
            experiment_id = str(client.get_experiment_by_name(name).experiment_id)
    client.set_experiment_tag(experiment_id, *schema.EXPERIMENT_KIND)
    return experiment_id


def open_parent_run(client: MlflowClient, experiment_id: str, name: str, spec: SweepSpec, storage_url: str, *,
                resume: bool) -> str:
    if resume:
        found = schema.find_sweep_run(client, name)
        if found is not None:
            client.update_run(found.info.run_id, status="RUNNING")
            return str(found.info.run_id)
    search = spec.require_search()
    objectives = search.objective_pairs
    storage_shown = credentials.redact(storage_url)
    run = client.create_run(experiment_id, run_name=name, tags=schema.sweep_run_tags(
        sweep=name, objectives=objectives, reference_point=search.reference_point, ideal_point=search.ideal_point,
        optuna_storage=storage_shown, optuna_study=name,
    ))
    run_id = run.info.run_id
    client.log_param(run_id, schema.Param.SAMPLER, search.sampler.name)
    client.log_param(run_id, schema.Param.SAMPLER_SEED, search.sampler.seed)
    client.log_param(run_id, schema.Param.TRIALS, search.trials)
    client.log_param(run_id, schema.Param.OBJECTIVES, ", ".join(f"{m}:{mode}" for m, mode in objectives))
    client.log_param(run_id, schema.Param.REFERENCE_POINT, json.dumps(search.reference_point))
    client.log_text(run_id, yaml.safe_dump(spec.raw, sort_keys=False), "spec.yaml")
    return str(run_id)
