"""Re-run a sweep's frontier for new hardware: re-time every trained student, no retraining.

`pxd remeasure SWEEP --hardware LABEL` loads each COMPLETE trial's student from MLflow (checked, from tensors:
`orchestrator.results.students`; a pickled one only with `TimingRequest.trust_pickles`) and times it on the
target hardware with a deployment runtime (`pxd.cost.measure_runtime`: torch, torch-compile, onnxruntime),
either in this process (the current machine) or as Ray tasks on the nodes that carry a Ray custom
resource (`--resource NAME`), so the timing runs there and not on the driver. The latency is logged to the
existing trial runs under the label's metric (`latency_ms.<label>`, from the registry) with its spread
(`latency_cv.<label>`) and what was measured where (tag `pxd.hardware.<label>`); the frontier with that
latency as the compute axis goes to the sweep's run under `hardware/<label>/`. Re-running a label
replaces its numbers: MLflow shows a metric's latest value, and the tag and the artifacts are overwritten.

Students that time alike (the same architecture at the same input size: `pxd.cost.LatencyCache`'s key,
which the sweep shares its latencies by) are timed once and share that timing, so timing noise cannot
split copies of one model on the frontier. A request that cannot measure what it says (`check_request`)
is refused before any model loads; a run that times no student records nothing for its label.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.results import schema
from orchestrator.results.frontier import TrialRow, frontier_table
from orchestrator.results.students import load_student
from pxd.errors import ConfigError
from pxd.metrics import check_hardware_label, get_metric, hardware_cv_metric, hardware_metric, primary_metric

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

    from pxd.runtimes import Runtime

__all__ = ["TimingRequest", "check_request", "time_student", "remeasure", "hardware_objectives", "hardware_table",
           "compare_tables"]

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
    dtype: str = "float32"  # float32 | bfloat16 | float16 (torch runtimes, under autocast on CPU or CUDA)
    # load students an earlier pxd logged as pickles (`--trust-pickles`): it runs code from the artifact store
    trust_pickles: bool = False


_DEVICES = ("cpu", "cuda")
_DTYPES = ("float32", "bfloat16", "float16")
_COUNTS = (("--threads", "threads", 1), ("--batch", "batch_size", 1), ("--repeats", "repeats", 2),
           ("--warmup", "warmup", 0))


def check_request(request: TimingRequest, *, local: bool) -> None:
    """Refuse, before any model loads, a request that cannot measure what it says. `local`: the timing
    runs in this process, so its device must exist here (on Ray nodes, `_check_resource` looks)."""
    import torch  # torch, mlflow and ray in this module: imported on first use (start-up cost of the CLI)

    from pxd.runtimes import RUNTIMES  # deferred with torch, which it imports

    try:
        check_hardware_label(request.label)
    except ValueError as exc:
        raise ConfigError("--hardware", str(exc)) from None
    for flag, name, minimum in _COUNTS:
        if getattr(request, name) < minimum:
            raise ConfigError(flag, f"must be ≥ {minimum}, got {getattr(request, name)}")
    if request.device not in _DEVICES:
        raise ConfigError("--device", f"use cpu or cuda, got {request.device!r}")
    if request.dtype not in _DTYPES:
        raise ConfigError("--dtype", f"use one of {', '.join(_DTYPES)}, got {request.dtype!r}")
    runtime = _registered_runtime(request.runtime, RUNTIMES)
    if request.dtype not in runtime.dtypes:
        honoured = [r.name for r in RUNTIMES.values() if request.dtype in r.dtypes]
        raise ConfigError("--dtype", f"{request.dtype} is for the runtimes {', '.join(honoured)} (under autocast, on CPU "
                                     f"or CUDA); {request.runtime} times {', '.join(runtime.dtypes)}: drop --dtype")
    if local and request.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", "cuda, but CUDA is not available on this machine (torch.cuda.is_available() "
                                      "is False), where the timing would run; use --device cpu, run pxd remeasure "
                                      "on a machine with an NVIDIA GPU, or time on Ray nodes with one (--resource)")


def _registered_runtime(name: str, runtimes: Mapping[str, Runtime]) -> Runtime:
    """The request's runtime from `runtimes` (`pxd.runtimes.RUNTIMES`), with its optional module installed."""
    if name not in runtimes:
        raise ConfigError("--runtime", f"use one of {', '.join(runtimes)} (pxd.runtimes), got {name!r}")
    runtime = runtimes[name]
    if runtime.module is not None and importlib.util.find_spec(runtime.module) is None:
        raise ConfigError("--runtime", f"{runtime.name} needs {runtime.module}, which is not installed; {runtime.install}")
    return runtime


def _load_student(model_uri: str, tracking_uri: str, request: TimingRequest) -> Any:
    """The student, checked and rebuilt from tensors (`orchestrator.results.students.load_student`)."""
    return load_student(model_uri, tracking_uri, trust_pickles=request.trust_pickles)


def time_student(model_uri: str, resolution: int, request: TimingRequest, tracking_uri: str) -> dict[str, Any]:
    """Load a logged student and time it here; returns the timing and where it ran (host, node, threads)."""
    return _time_model(_load_student(model_uri, tracking_uri, request), resolution, request)


def _time_model(model: Any, resolution: int, request: TimingRequest) -> dict[str, Any]:
    # pxd.cost brings torch (start-up cost)
    import torch

    from pxd.cost import measure_runtime

    timing = measure_runtime(model, resolution, runtime=request.runtime, device=request.device,
                             dtype=getattr(torch, request.dtype), threads=request.threads, warmup=request.warmup,
                             repeats=request.repeats, batch_size=request.batch_size)
    return {**timing.to_dict(), "hostname": socket.gethostname(), "node_id": _node_id(), "pid": os.getpid()}


def _node_id() -> str:
    try:
        import ray  # start-up cost

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    except Exception:  # noqa: BLE001 - outside Ray there is no node id to report
        return "local"


def _resolution(row: TrialRow) -> int:
    return int(round(math.sqrt(row.metrics["pixels"])))


def remeasure(client: MlflowClient, tracking_uri: str, sweep: str, request: TimingRequest, *,
              resource: str | None = None, report: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time every COMPLETE trial of `sweep` for `request.label`; log it; recompute that frontier.

    Returns the hardware frontier table plus `timed` and `skipped` (run id → reason). A student that
    fails to load or run is reported and skipped; when no student could be timed, `ConfigError` and
    nothing is recorded for the label (no label, no reference latency, no frontier).
    """
    report = report or (lambda line: print(line, file=sys.stderr, flush=True))
    check_request(request, local=resource is None)
    parent = schema.require_sweep_run(client, sweep)
    sweep = parent.data.tags.get(schema.Tag.SWEEP, sweep)  # its name, also when given by run id
    every_row = schema.collect_rows(client, parent)
    rows = [r for r in every_row if r.state == "COMPLETE" and r.model_uri]
    if not rows:
        raise ConfigError("sweep", f"{sweep} has no complete trial with a logged student to time")
    if resource is not None:
        _check_resource(resource, request)
    results, skipped = _time_all(rows, request, tracking_uri, resource, report)
    if not results:
        first = next(iter(skipped.values()), "")
        raise ConfigError("--hardware", f"no student of {sweep} could be timed on {request.label} ({len(skipped)} "
                                        f"skipped; the first: {first}); nothing was recorded for {request.label}. "
                                        "Check --device, --runtime and --dtype against the target")
    metric, cv = hardware_metric(request.label).name, hardware_cv_metric(request.label)
    measured_before = any(metric in row.metrics for row in every_row)
    for row in rows:
        if row.run_id not in results:
            continue
        timing = results[row.run_id]
        client.log_metric(row.run_id, metric, timing["latency_ms"])
        client.log_metric(row.run_id, cv, timing["latency_cv"])
        client.set_tag(row.run_id, schema.hardware_tag(request.label), json.dumps(timing, default=str))
        if timing["noisy"] and timing["timed_run"] == row.run_id:
            report(f"[pxd] warning: {row.run_id} latency on {request.label} varies by {timing['latency_cv']:.0%} "
                   "between repeats (noisy): raise --repeats, fix --threads, or quieten the machine")
    # a fixed reference per label: twice the slowest student of the first run that measured any (a reference
    # kept by a run that measured none, as pxd < this version could record, is replaced)
    reference_key = _reference_tag(request.label)
    if reference_key not in parent.data.tags or not measured_before:
        slowest = max(timing["latency_ms"] for timing in results.values())
        client.set_tag(parent.info.run_id, reference_key, str(2.0 * slowest))
    client.set_tag(parent.info.run_id, schema.hardware_tag(request.label), json.dumps(asdict(request)))
    labels = set(hardware_labels(client.get_run(parent.info.run_id))) | {request.label}
    client.set_tag(parent.info.run_id, schema.Tag.HARDWARE_LABELS, json.dumps(sorted(labels)))
    from orchestrator.results.artifacts import log_frontier  # imports matplotlib: on first use (start-up cost)

    table = hardware_table(client, parent.info.run_id, request.label)
    parent = client.get_run(parent.info.run_id)
    log_frontier(client, parent, table, f"hardware/{request.label}", png_axes=(metric,))
    # the sweep's own Pareto page again, now with this hardware's latency among its cost axes
    objectives, reference, ideal = schema.sweep_objectives(parent)
    own = frontier_table(schema.collect_rows(client, parent), objectives, reference, ideal)
    log_frontier(client, parent, own, "frontier", png_axes=tuple(m for m, _ in objectives if m != primary_metric()))
    # timed_runs: the trials whose students were timed (a copy shares one of them)
    return {**table, "timed": sorted(results), "timed_runs": sorted({t["timed_run"] for t in results.values()}),
            "skipped": skipped}


def _reference_tag(label: str) -> str:
    return schema.hardware_tag(label) + ".reference"


def _timing_key(model: Any, resolution: int, request: TimingRequest) -> str:
    """What decides a student's timing: the sweep's latency-sharing key (architecture, parameter shapes,
    input size) with this request's settings."""
    from pxd.cost import LatencyCache  # torch (start-up cost)

    settings = {k: v for k, v in asdict(request).items() if k not in ("label", "trust_pickles")}
    return LatencyCache(scope=f"remeasure:{request.label}").key(model, resolution, {}, settings)


def _shared(timing: dict[str, Any], timed_run: str) -> dict[str, Any]:
    return {**timing, "timed_run": timed_run}


def _time_all(rows: list[TrialRow], request: TimingRequest, tracking_uri: str, resource: str | None,
              report: Callable[[str], None]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Each distinct student timed once (`_timing_key`); its copies share the timing (`timed_run` names the
    trial whose student was timed)."""
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    total = len(rows)
    groups: dict[str, list[TrialRow]] = {}  # timing key → its trials, the first one the trial timed
    for index, row in enumerate(rows, 1):
        try:
            model = _load_student(row.model_uri, tracking_uri, request)
            key = _timing_key(model, _resolution(row), request)
            if key in groups:
                timed = groups[key][0].run_id
                groups[key].append(row)
                if timed in results:
                    results[row.run_id] = _shared(results[timed], timed)
                    report(f"[pxd] {index}/{total} {row.run_id} shares the timing of {timed} (same "
                           f"architecture and input size): {results[row.run_id]['latency_ms']:.3f} ms")
                continue
            groups[key] = [row]
            if resource is None:
                results[row.run_id] = _shared(_time_model(model, _resolution(row), request), row.run_id)
                report(f"[pxd] {index}/{total} timed {row.run_id} on {request.label}: "
                       f"{results[row.run_id]['latency_ms']:.3f} ms")
        except Exception as exc:  # noqa: BLE001 - one bad model must not stop the others; it is reported
            skipped[row.run_id] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            report(f"[pxd] {index}/{total} skipped {row.run_id}: {skipped[row.run_id]}")
    if resource is None:
        for members in groups.values():  # the copies of a student that failed to run
            for row in members:
                if row.run_id not in results and row.run_id not in skipped:
                    skipped[row.run_id] = f"shares the timing of {members[0].run_id}, which failed"
        return results, skipped
    _time_on_ray(groups, request, tracking_uri, resource, report, results, skipped)
    return results, skipped


def _check_resource(resource: str, request: TimingRequest) -> None:
    """Refuse, before any model loads, a resource no Ray node offers, or CUDA timing on nodes without a GPU."""
    import ray  # start-up cost

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    offering = [offered for offered in nodes if offered.get(resource, 0) > 0]
    if not offering:
        names = sorted({k for offered in nodes for k in offered if not k.startswith("node:")})
        raise ConfigError("--resource", f"no Ray node offers the custom resource {resource!r} (cluster resources: "
                                        f"{names}); start the target node with "
                                        f"`ray start --resources '{{\"{resource}\": 1}}'`")
    if request.device == "cuda" and not any(offered.get("GPU", 0) > 0 for offered in offering):
        raise ConfigError("--device", f"cuda, but no Ray node offering {resource!r} has a GPU; use --device cpu, "
                                      "or give the target node its GPU (`ray start --num-gpus 1 ...`)")


def _time_on_ray(groups: dict[str, list[TrialRow]], request: TimingRequest, tracking_uri: str, resource: str,
                 report: Callable[[str], None], results: dict[str, dict[str, Any]], skipped: dict[str, str]) -> None:
    import ray  # start-up cost

    # a task reserving no GPU sees none (Ray hides them from it)
    gpus = 1 if request.device == "cuda" else 0
    task = ray.remote(num_cpus=request.threads, num_gpus=gpus, resources={resource: 1}, max_retries=0)(time_student)
    pending = {task.remote(members[0].model_uri, _resolution(members[0]), request, tracking_uri): members
               for members in groups.values()}
    total, done_count = sum(len(members) for members in groups.values()), 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        members = pending.pop(ready[0])
        timed_run = members[0].run_id
        try:
            timing = ray.get(ready[0])
        except Exception as exc:  # noqa: BLE001 - reported and skipped, as above
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            for row in members:
                done_count += 1
                skipped[row.run_id] = reason
                report(f"[pxd] {done_count}/{total} skipped {row.run_id}: {reason}")
            continue
        for row in members:
            done_count += 1
            results[row.run_id] = _shared(timing, timed_run)
            how = "timed" if row.run_id == timed_run else f"shares the timing of {timed_run}"
            report(f"[pxd] {done_count}/{total} {row.run_id} {how} on {request.label} "
                   f"(node {timing['hostname']}): {timing['latency_ms']:.3f} ms")


def hardware_labels(parent: Run) -> list[str]:
    return list(json.loads(parent.data.tags.get(schema.Tag.HARDWARE_LABELS, "[]")))


def hardware_objectives(objectives: list[tuple[str, str]], label: str) -> list[tuple[str, str]]:
    """The sweep's objectives with `label`'s latency as the compute axis (replacing latency_ms, gmacs or
    params_m, in that order of preference; appended when the sweep had no compute axis)."""
    latency = hardware_metric(label)
    for axis in _COMPUTE_AXES:
        if any(name == axis for name, _ in objectives):
            return [(latency.name, latency.mode) if name == axis else (name, mode) for name, mode in objectives]
    return [*objectives, (latency.name, latency.mode)]


def hardware_table(client: MlflowClient, sweep: str, label: str) -> dict[str, Any]:
    """The frontier of a sweep on hardware `label` (trials not timed there are not eligible)."""
    parent = schema.require_sweep_run(client, sweep)
    if label not in hardware_labels(parent):
        raise ConfigError("--hardware", f"sweep {parent.data.tags.get(schema.Tag.SWEEP)} was never timed on {label!r} "
                                        f"(measured: {hardware_labels(parent) or 'none'}); run pxd remeasure first")
    objectives, reference, ideal = schema.sweep_objectives(parent)
    rows = schema.collect_rows(client, parent)
    metric = hardware_metric(label).name
    measured = [r.metrics[metric] for r in rows if metric in r.metrics]
    # the label's fixed reference, which `remeasure` keeps in a tag (read only here: this may be a read-only open)
    key = _reference_tag(label)
    latency_reference = float(parent.data.tags[key]) if key in parent.data.tags else 2.0 * max(measured, default=1.0)
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
