"""The Ray Tune trainable: one sampled config → one TAS pipeline → one MLflow child run.

Every trial reports to Tune each epoch (`stage`, `epoch`, `epoch_val_top1`) and once at the end with
the final metrics (`val_top1`, `gmacs`, `params_m`, `pixels`, `latency_ms`) that the Optuna searcher
tells the study. A trial that raises or diverges ends its MLflow run as FAILED with the error recorded
on the run (tag `pxd.error`, artifact `error.txt`) and re-raises, so Tune and Optuna record a failure
and the trial never enters the frontier.
"""

from __future__ import annotations

import json
import math
import socket
import traceback
from dataclasses import dataclass
from typing import Any

__all__ = ["TrialContext", "run_trial", "flatten", "FINAL_METRICS"]

FINAL_METRICS = ("val_top1", "gmacs", "params_m", "pixels", "latency_ms")


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs from the driver; picklable, sent once to every trial."""

    spec: Any  # orchestrator.spec.SweepSpec
    sweep_name: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    reuse_stages: bool = True
    force_retrain: bool = False
    stage_wait_timeout_s: float = 3600.0
    lease_url: str | None = None  # SQL database for single-flight stage leases


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}: MLflow params and Optuna names use dotted paths."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _trial_id() -> str:
    from ray import tune

    try:
        return str(tune.get_context().get_trial_id())
    except Exception:  # noqa: BLE001 - outside Tune (tests call run_trial directly)
        return "local"


def run_trial(params: dict[str, Any], context: TrialContext) -> dict[str, Any]:
    """Run one trial; returns (and reports to Tune) the final metrics."""
    import mlflow
    from ray import tune

    from orchestrator.spec import constraint_values, is_feasible, materialize
    from orchestrator.stage_store import make_provider
    from pxd.pipeline import LatencySettings, run_tas

    config = materialize(context.spec, params)
    trial_id = _trial_id()
    mlflow.set_tracking_uri(context.tracking_uri)
    tags = {
        "mlflow.parentRunId": context.parent_run_id,
        "pxd.sweep": context.sweep_name,
        "pxd.trial_id": trial_id,
        "pxd.kind": "trial",
        "pxd.state": "RUNNING",
        "pxd.sampled": json.dumps(params, sort_keys=True, default=str),
        "pxd.hostname": socket.gethostname(),
        "pxd.node_id": _node_id(),
    }
    run_name = f"{config.student.arch}@{config.student.resolution}-{trial_id}"
    with mlflow.start_run(experiment_id=context.experiment_id, run_name=run_name, tags=tags) as run:
        run_id = run.info.run_id
        mlflow.log_params({k: ("" if v is None else v) for k, v in flatten(config.to_dict()).items()})

        def on_epoch(kind: str, epoch: int, record: dict[str, float]) -> None:
            mlflow.log_metrics({f"{kind}.{k}": v for k, v in record.items() if k != "epoch" and math.isfinite(v)}, step=epoch)
            tune.report({"stage": kind, "epoch": epoch, "epoch_val_top1": record["val_top1"], "mlflow_run_id": run_id})

        try:
            provider = make_provider(context, parent_run_id=run_id)
            search = context.spec.search
            latency = LatencySettings(search.latency_device, search.latency_repeats, search.latency_warmup)
            result = run_tas(config, provider=provider, on_epoch=on_epoch, progress=False, latency=latency)
        except BaseException as exc:
            mlflow.set_tags({"pxd.state": "FAILED", "pxd.error": f"{type(exc).__name__}: {exc}"[:4900]})
            mlflow.log_text(traceback.format_exc(), "error.txt")
            mlflow.end_run(status="FAILED")
            raise

        metrics = dict(result.metrics)
        feasible = is_feasible(context.spec, metrics)
        reused = [o for o in result.stages.values() if o.reused]
        stage_totals = {
            "stages_reused": float(len(reused)),
            "stages_trained": float(len(result.stages) - len(reused)),
            # training time the reused stages took when they were trained, i.e. what reuse saved
            "stage_seconds_saved": sum(o.result.metrics.get("train_seconds", 0.0) for o in reused),
        }
        mlflow.log_metrics({k: float(v) for k, v in {**metrics, **stage_totals}.items()})
        mlflow.log_dict(result.cost, "cost.json")
        stage_tags = {}
        for kind, outcome in result.stages.items():
            stage_tags[f"pxd.stage.{kind}.key"] = outcome.key
            stage_tags[f"pxd.stage.{kind}.reused"] = str(outcome.reused).lower()
            if outcome.ref:
                stage_tags[f"pxd.stage.{kind}.run_id"] = outcome.ref
        model_uri = _log_student(result.student, config.student.resolution)
        mlflow.set_tags({
            **stage_tags,
            "pxd.state": "COMPLETE",
            "pxd.feasible": str(feasible).lower(),
            "pxd.full_budget": "true",
            "pxd.model_uri": model_uri,
            "pxd.device": result.cost.get("device", ""),
        })
    final = {name: float(metrics[name]) for name in metrics}
    final.update(
        mlflow_run_id=run_id,
        model_uri=model_uri,
        feasible=feasible,
        constraints=constraint_values(context.spec, metrics),
        **stage_totals,
        done=True,
    )
    if _in_tune():
        tune.report(final)
    return final


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def _in_tune() -> bool:
    return _trial_id() != "local"


def _log_student(student: Any, resolution: int) -> str:
    """Log the student so it can be loaded and served: an input example at its own resolution."""
    import mlflow
    import numpy as np
    import timm
    import torch

    example = np.zeros((1, 3, resolution, resolution), dtype=np.float32)
    student.eval()
    info = mlflow.pytorch.log_model(
        student,
        name="student",
        input_example=example,
        # explicit requirements: inferring them starts a subprocess per trial
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}"],
    )
    return str(info.model_uri)
