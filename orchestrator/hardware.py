"""Re-run a sweep's frontier for new hardware: re-time every trained student, no retraining.

`pxd remeasure SWEEP --hardware LABEL` loads each COMPLETE trial's student from MLflow and times it on the
target hardware with a deployment runtime (`pxd.cost.measure_runtime`: torch, torch-compile, onnxruntime),
either in this process (the current machine) or as Ray tasks on the nodes that carry a Ray custom
resource (`--resource NAME`), so the timing runs there and not on the driver. The latency is logged to the
existing trial runs under the label's metric (`latency_ms.<label>`, from the registry) with its spread
(`latency_cv.<label>`) and what was measured where (tag `pxd.hardware.<label>`); the frontier with that
latency as the compute axis goes to the sweep's run under `hardware/<label>/`. Re-running a label
replaces its numbers: MLflow shows a metric's latest value, and the tag and the artifacts are overwritten.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from orchestrator import schema
from orchestrator.frontier import TrialRow, frontier_table
from pxd.errors import ConfigError
from pxd.metrics import check_hardware_label, get_metric, hardware_cv_metric, hardware_metric

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

__all__ = ["TimingRequest", "time_student", "remeasure", "hardware_objectives", "hardware_table", "compare_tables"]

# the compute axes a hardware's latency replaces in the sweep's objectives
_COMPUTE_AXES = ("latency_ms", "gmacs", "params_m")


@dataclass(frozen=True)
class TimingRequest:
    label: str
    runtime: str = "torch"
    device: str = "cpu"
    threads: int = 1
    warmup: int = 5
    repeats: int = 30
    batch_size: int = 16
    dtype: str = "float32"  # float32 | bfloat16 | float16 (torch runtimes on CUDA)


def time_student(model_uri: str, resolution: int, request: TimingRequest, tracking_uri: str) -> dict[str, Any]:
    """Load a logged student and time it here; returns the timing and where it ran (host, node, threads)."""
    import mlflow
    import torch

    from orchestrator.tracking import fluent_tracking_uri
    from pxd.cost import measure_runtime

    with fluent_tracking_uri(tracking_uri):
        model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    timing = measure_runtime(model, resolution, runtime=request.runtime, device=request.device,
                             dtype=getattr(torch, request.dtype), threads=request.threads, warmup=request.warmup,
                             repeats=request.repeats, batch_size=request.batch_size)
    return {**timing.to_dict(), "hostname": socket.gethostname(), "node_id": _node_id(), "pid": os.getpid()}


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except Exception:  # noqa: BLE001 - outside Ray there is no node id to report
        return "local"


def _resolution(row: TrialRow) -> int:
    return int(round(math.sqrt(row.metrics["pixels"])))


def remeasure(client: MlflowClient, tracking_uri: str, sweep: str, request: TimingRequest, *,
              resource: str | None = None, report: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time every COMPLETE trial of `sweep` for `request.label`; log it; recompute that frontier.

    Returns the hardware frontier table plus `timed` and `skipped` (run id → reason). A student that
    fails to load or run is reported and skipped, never fatal.
    """
    report = report or (lambda line: print(line, file=sys.stderr, flush=True))
    check_hardware_label(request.label)
    parent = _sweep_run(client, sweep)
    rows = [r for r in schema.collect_rows(client, parent) if r.state == "COMPLETE" and r.model_uri]
    if not rows:
        raise ConfigError("sweep", f"{sweep} has no complete trial with a logged student to time")
    results, skipped = _time_all(rows, request, tracking_uri, resource, report)
    metric, cv = hardware_metric(request.label).name, hardware_cv_metric(request.label)
    for row in rows:
        if row.run_id not in results:
            continue
        timing = results[row.run_id]
        client.log_metric(row.run_id, metric, timing["latency_ms"])
        client.log_metric(row.run_id, cv, timing["latency_cv"])
        client.set_tag(row.run_id, schema.hardware_tag(request.label), json.dumps(timing, default=str))
        if timing["noisy"]:
            report(f"[pxd] warning: {row.run_id} latency on {request.label} varies by {timing['latency_cv']:.0%} "
                   "between repeats (noisy): raise --repeats, fix --threads, or quieten the machine")
    client.set_tag(parent.info.run_id, schema.hardware_tag(request.label), json.dumps(asdict(request)))
    labels = set(hardware_labels(client.get_run(parent.info.run_id))) | {request.label}
    client.set_tag(parent.info.run_id, schema.Tag.HARDWARE_LABELS, json.dumps(sorted(labels)))
    from orchestrator.sweep import log_frontier

    table = hardware_table(client, parent.info.run_id, request.label)
    parent = client.get_run(parent.info.run_id)
    log_frontier(client, parent, table, f"hardware/{request.label}", png_axes=(metric,))
    # the sweep's own Pareto page again, now with this hardware's latency among its cost axes
    objectives, reference, ideal = schema.sweep_objectives(parent)
    own = frontier_table(schema.collect_rows(client, parent), objectives, reference, ideal)
    log_frontier(client, parent, own, "frontier", png_axes=tuple(m for m, _ in objectives if m != "val_top1"))
    return {**table, "timed": sorted(results), "skipped": skipped}


def _time_all(rows: list[TrialRow], request: TimingRequest, tracking_uri: str, resource: str | None,
              report: Callable[[str], None]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    total = len(rows)
    if resource is None:
        for index, row in enumerate(rows, 1):
            try:
                results[row.run_id] = time_student(row.model_uri, _resolution(row), request, tracking_uri)
                report(f"[pxd] {index}/{total} timed {row.run_id} on {request.label}: "
                       f"{results[row.run_id]['latency_ms']:.3f} ms")
            except Exception as exc:  # noqa: BLE001 - one bad model must not stop the others; it is reported
                skipped[row.run_id] = f"{type(exc).__name__}: {exc}"
                report(f"[pxd] {index}/{total} skipped {row.run_id}: {skipped[row.run_id]}")
        return results, skipped
    import ray

    available = ray.cluster_resources()
    if available.get(resource, 0) <= 0:
        raise ConfigError("--resource", f"no Ray node offers the custom resource {resource!r} (cluster resources: "
                                        f"{sorted(k for k in available if not k.startswith('node:'))}); start the target "
                                        f"node with `ray start --resources '{{\"{resource}\": 1}}'`")
    task = ray.remote(num_cpus=request.threads, resources={resource: 1}, max_retries=0)(time_student)
    pending = {task.remote(row.model_uri, _resolution(row), request, tracking_uri): row for row in rows}
    done_count = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        row = pending.pop(ready[0])
        done_count += 1
        try:
            results[row.run_id] = ray.get(ready[0])
            report(f"[pxd] {done_count}/{total} timed {row.run_id} on {request.label} "
                   f"(node {results[row.run_id]['hostname']}): {results[row.run_id]['latency_ms']:.3f} ms")
        except Exception as exc:  # noqa: BLE001 - reported and skipped, as above
            skipped[row.run_id] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            report(f"[pxd] {done_count}/{total} skipped {row.run_id}: {skipped[row.run_id]}")
    return results, skipped


def _sweep_run(client: MlflowClient, sweep: str) -> Run:
    parent = schema.find_sweep_run(client, sweep)
    if parent is None:
        raise ConfigError("sweep", f"no sweep named or with run id {sweep!r} at {client.tracking_uri}; check the name "
                                   "and --tracking-uri/--root")
    return parent


def hardware_labels(parent: Run) -> list[str]:
    return list(json.loads(parent.data.tags.get(schema.Tag.HARDWARE_LABELS, "[]")))


def hardware_objectives(objectives: list[tuple[str, str]], label: str) -> list[tuple[str, str]]:
    """The sweep's objectives with `label`'s latency as the compute axis (replacing latency_ms, gmacs or
    params_m, in that order of preference; appended when the sweep had no compute axis)."""
    metric = hardware_metric(label).name
    for axis in _COMPUTE_AXES:
        if any(name == axis for name, _ in objectives):
            return [(metric, "min") if name == axis else (name, mode) for name, mode in objectives]
    return [*objectives, (metric, "min")]


def hardware_table(client: MlflowClient, sweep: str, label: str) -> dict[str, Any]:
    """The frontier of a sweep on hardware `label` (trials not timed there are not eligible)."""
    parent = _sweep_run(client, sweep)
    if label not in hardware_labels(parent):
        raise ConfigError("--hardware", f"sweep {parent.data.tags.get(schema.Tag.SWEEP)} was never timed on {label!r} "
                                        f"(measured: {hardware_labels(parent) or 'none'}); run pxd remeasure first")
    objectives, reference, ideal = schema.sweep_objectives(parent)
    rows = schema.collect_rows(client, parent)
    metric = hardware_metric(label).name
    measured = [r.metrics[metric] for r in rows if metric in r.metrics]
    # a fixed reference per label: twice the slowest student measured the first time, kept in a tag
    key = schema.hardware_tag(label) + ".reference"
    if key in parent.data.tags:
        latency_reference = float(parent.data.tags[key])
    else:
        latency_reference = 2.0 * max(measured, default=1.0)
        client.set_tag(parent.info.run_id, key, str(latency_reference))
    axes = hardware_objectives(objectives, label)
    kept = {name for name, _ in axes}
    reference = {**{k: v for k, v in reference.items() if k in kept}, metric: latency_reference}
    ideal = {**{k: v for k, v in ideal.items() if k in kept}, metric: get_metric(metric).ideal}
    table = frontier_table(rows, axes, reference, ideal)
    table["hardware"] = label
    return table


def compare_tables(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Which models leave and which join the frontier between two hardware targets."""
    front = {name: {r["run_id"]: r for r in table["rows"] if r["on_frontier"]} for name, table in
             (("first", first), ("second", second))}
    stay = sorted(set(front["first"]) & set(front["second"]))
    leave = sorted(set(front["first"]) - set(front["second"]))
    join = sorted(set(front["second"]) - set(front["first"]))
    return {"first": first["hardware"], "second": second["hardware"], "stay": stay, "leave": leave, "join": join,
            "rows": {run: {**front["first"].get(run, {}), **front["second"].get(run, {})} for run in stay + leave + join}}
