"""What bench/scale.py reads back once its sweep has ended: the tracking server's access log (every request
it answered, by endpoint and by phase) and the runs and trials the sweep recorded (MLflow and Optuna)."""

from __future__ import annotations

import collections
import re
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from mlflow.tracking import MlflowClient

from orchestrator.results import schema
from orchestrator.results.schema import STAGES_EXPERIMENT, Tag
from orchestrator.space.spec import load_spec

if TYPE_CHECKING:
    from bench.scale import Driver, ScaleSettings
    from tests.orchestrator.test_cluster import Cluster

# uvicorn's access line (MLflow's uvicorn_log_config.yaml): `2026/12/07 06:25:35 INFO: 127.0.0.1:5123 - "POST /api/... HTTP/1.1" 200`
_ACCESS = re.compile(r'^(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d) .*?"([A-Z]+) (\S+) HTTP/[\d.]+" (\d{3})')
_MASKS = [(re.compile(r"m-[0-9a-f]{32}"), "<model>"), (re.compile(r"[0-9a-f]{32}"), "<run>"),
          (re.compile(r"/\d+(?=/|$)"), "/<n>")]


def request_counts(log: Path, *, since: float = 0.0, until: float = float("inf")) -> list[tuple[float, str, int]]:
    """(epoch second, "METHOD endpoint" with ids masked, status) of each request the server logged in
    [since, until], health checks left out."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        match = _ACCESS.match(line)
        if match is None:
            continue
        stamp = time.mktime(time.strptime(match.group(1), "%Y/%m/%d %H:%M:%S"))
        path = match.group(3).split("?", 1)[0]
        if path == "/health" or not int(since) <= stamp <= until:
            continue
        for pattern, mask in _MASKS:
            path = pattern.sub(mask, path)
        found.append((stamp, f"{match.group(2)} {path}", int(match.group(4))))
    return found


def read_back(cluster: Cluster, settings: ScaleSettings, driver: Driver, requests: list[tuple[float, str, int]], *,
              sweep: str) -> dict[str, Any]:
    """The figures bench/scale.py reports (its docstring says what each is)."""
    client = MlflowClient(cluster.tracking_uri)
    parent = schema.find_sweep_run(client, sweep)
    if parent is None:
        raise RuntimeError(f"no sweep run {sweep!r} at {cluster.tracking_uri}")
    runs = schema.trial_runs(client, parent)
    complete = sorted((r for r in runs if r.data.tags.get(Tag.STATE) == "COMPLETE"), key=lambda r: r.info.start_time)
    per_trial = collections.Counter(r.data.tags[Tag.TRIAL_ID] for r in complete)
    study = optuna.load_study(study_name=sweep, storage=cluster.optuna_storage)
    states = collections.Counter(t.state.name for t in study.get_trials(deepcopy=False))
    left = _left_running(client, runs, parent, sweep) | {"optuna_trials": states.get("RUNNING", 0)}
    spec = load_spec(settings.space)
    trial_s = spec.base.student_epochs * settings.seconds_per_epoch  # a trial's own simulated training
    orchestration = [(r.info.end_time - r.info.start_time) / 1000
                     - r.data.metrics.get(schema.SweepMetric.STAGE_SECONDS_TRAINED, 0.0) for r in complete]
    fifth = max(1, len(orchestration) // 5)
    sections = _section_values(complete, orchestration)
    first_start = min(r.info.start_time for r in runs) / 1000 if runs else driver.started
    last_end = max((r.info.end_time or 0) for r in runs) / 1000 if runs else driver.ended
    trials = settings.trials
    finished = parent_end(client, parent)
    return {
        "trials": trials,
        "nodes": settings.nodes,
        "concurrency": settings.slots,
        "sampler": settings.sampler,
        "trials_complete": len(per_trial),
        "trials_completed_twice": sum(count > 1 for count in per_trial.values()),
        "trial_runs": len(runs),
        "simulated_trial_runs": sum(r.data.tags.get(Tag.SIMULATED_TRAINING) == "true" for r in runs),
        "nodes_used": len({r.data.tags.get(Tag.NODE_ID) for r in complete}),
        "optuna_trials": dict(states),
        "runs_left_running": sum(left.values()),
        "left_running": left,
        "trials_per_min": 60 * trials / driver.wall_s,
        "trial_phase_trials_per_min": 60 * len(complete) / max(last_end - first_start, 1e-9),
        "driver_wall_s": driver.wall_s,
        "driver_cpu_s": driver.cpu_s,
        "driver_cpu_s_per_trial": driver.cpu_s / trials,
        "driver_cores": driver.cpu_s / driver.wall_s,
        "driver_rss_mb": driver.max_rss_mb,
        **_requests(requests, trials, first_start, last_end),
        "orchestration_s": {"first_fifth_median": statistics.median(orchestration[:fifth]) if orchestration else None,
                            "last_fifth_median": statistics.median(orchestration[-fifth:]) if orchestration else None,
                            "median": statistics.median(orchestration) if orchestration else None},
        "growth_ratio": (statistics.median(orchestration[-fifth:]) / statistics.median(orchestration[:fifth])
                         if orchestration else None),
        # the least-squares trend of orchestration seconds over the trials in start order, per 1,000 trials:
        # growth that the fifths' medians can hide or invent (warm-up at the start, the last trials' tail)
        "orchestration_slope_s_per_1000": (1000 * statistics.linear_regression(range(len(orchestration)), orchestration).slope
                                           if len(orchestration) > 1 else None),
        "orchestration_sections_s": _sections(sections, fifth),
        "per_trial": _per_trial(complete, orchestration, sections, first_start),
        "simulated_trial_s": trial_s,
        "wall_over_ideal": driver.wall_s / (trials * trial_s / settings.slots),
        "start_s": first_start - driver.started,  # Ray, the server checks, the parent run, the teacher warm-up
        "end_of_sweep_s": driver.ended - last_end,
        "finish_s": finished - last_end if finished else None,  # reconciliation and frontier, to the sweep run's end
        "killed_node": driver.killed_node,
    }


def _section_values(runs: list[Any], orchestration: list[float]) -> dict[str, list[float]]:
    """Each trial's orchestration seconds by section: the `overhead.<section>_s` metrics the trial logged, and
    "other", what they leave out (the final result's log, the run's end, anything between)."""
    prefix, suffix = "overhead.", "_s"
    names = sorted({k[len(prefix):-len(suffix)] for r in runs for k in r.data.metrics
                    if k.startswith(prefix) and k.endswith(suffix)})
    values = {name: [r.data.metrics.get(schema.SweepMetric.overhead(name), 0.0) for r in runs] for name in names}
    values["other"] = [total - sum(parts) for total, *parts in zip(orchestration, *values.values())]
    return values


def _sections(sections: dict[str, list[float]], fifth: int) -> dict[str, dict[str, float]]:
    """Per section (`_section_values`): the median of the first and the last fifth of trials by start, and
    their difference; what grew is where the difference is."""
    found = {}
    for name, values in sections.items():
        if not values:
            continue
        first, last = statistics.median(values[:fifth]), statistics.median(values[-fifth:])
        found[name] = {"first_fifth_median": first, "last_fifth_median": last, "change": last - first}
    return found


def _per_trial(runs: list[Any], orchestration: list[float], sections: dict[str, list[float]],
               first_start: float) -> dict[str, list[float]]:
    """Columns, one row per complete trial by start: its start (s after the first trial's), its orchestration
    seconds and each section's: kept so that a question about growth needs no second run."""
    columns = {"start_s": [round(r.info.start_time / 1000 - first_start, 3) for r in runs],
               "orchestration_s": [round(v, 4) for v in orchestration]}
    columns |= {f"{name}_s": [round(v, 4) for v in values] for name, values in sections.items()}
    return columns


def parent_end(client: MlflowClient, parent: Any) -> float | None:
    end = client.get_run(parent.info.run_id).info.end_time
    return end / 1000 if end else None


def _left_running(client: MlflowClient, runs: list[Any], parent: Any, sweep: str) -> dict[str, int]:
    """MLflow runs of the sweep still RUNNING: trial attempts, stage runs it created, its own run."""
    stages = client.get_experiment_by_name(STAGES_EXPERIMENT)
    running_stages = client.search_runs(
        [stages.experiment_id], f"tags.`{Tag.SWEEP}` = '{sweep}' and attributes.status = 'RUNNING'", max_results=5000,
    ) if stages is not None else []
    return {"trial_runs": sum(r.info.status == "RUNNING" for r in runs), "stage_runs": len(running_stages),
            "sweep_run": int(client.get_run(parent.info.run_id).info.status == "RUNNING")}


def _requests(requests: list[tuple[float, str, int]], trials: int, first_start: float, last_end: float) -> dict[str, Any]:
    by_endpoint = collections.Counter(endpoint for _, endpoint, _ in requests)
    phases = collections.Counter(
        "start" if stamp < int(first_start) else "end" if stamp > last_end + 1 else "trials" for stamp, _, _ in requests)
    return {
        "mlflow_requests": len(requests),
        "mlflow_requests_per_trial": len(requests) / trials,
        "mlflow_requests_by_phase": dict(phases),
        "mlflow_requests_per_trial_by_endpoint": {k: v / trials for k, v in by_endpoint.most_common()},
        # 4xx: look-ups of what does not exist yet (the new sweep's name, experiments), by endpoint; 5xx: failures
        "mlflow_not_found": dict(collections.Counter(e for _, e, status in requests if 400 <= status < 500)),
        "mlflow_server_errors": sum(status >= 500 for _, _, status in requests),
    }


def summary(result: dict[str, Any]) -> str:
    """The printed table of one run."""
    def show(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    keys = ["trials", "nodes", "concurrency", "trials_complete", "trials_completed_twice", "runs_left_running",
            "trials_per_min", "driver_cpu_s_per_trial", "driver_cores", "driver_rss_mb", "mlflow_requests_per_trial",
            "growth_ratio", "orchestration_slope_s_per_1000", "wall_over_ideal", "start_s", "end_of_sweep_s", "finish_s", "cluster_start_s"]
    lines = [f"{key:<28}{show(result.get(key))}" for key in keys]
    lines.append(f"{'orchestration_s':<28}{result['orchestration_s']}")
    for name, row in (result.get("orchestration_sections_s") or {}).items():
        lines.append(f"  section {name:<18} first → last fifth median {row['first_fifth_median']:.3f} → "
                     f"{row['last_fifth_median']:.3f} s ({row['change']:+.3f})")
    lines.append(f"{'left_running':<28}{result['left_running']}")
    lines.append(f"{'requests by phase':<28}{result['mlflow_requests_by_phase']}")
    lines.append("requests per trial by endpoint:")
    lines += [f"  {count:7.2f}  {name}" for name, count in result["mlflow_requests_per_trial_by_endpoint"].items()]
    if result.get("killed_node"):
        lines.append(f"{'killed node':<28}{result['killed_node']}")
    samplers = result.get("sampler_ms") or {}
    for name in ("tpe", "nsga2", "gp", "random"):
        if name in samplers:
            row = samplers[name]
            lines.append(f"sampler {name:<8} ask+tell ms " + "  ".join(
                f"{n}: {show(row[str(n)]) if row[str(n)] is not None else '-'}" for n in samplers["at"])
                + f"  (measured to {row['measured_to']} trials)")
    page = result.get("pareto_page")
    if page:
        lines.append(f"Pareto page: {page['points']} points, {page['bytes'] / 1e6:.2f} MB, interactive in "
                     f"{page['interactive_s']:.3f} s, hover {page['hover_ms']:.0f} ms")
    environment = result.get("environment", {})
    lines.append(f"{environment.get('date')} · {environment.get('machine')} · {environment.get('versions')}")
    lines.append(f"command: {environment.get('command')}")
    return "\n".join(lines)


TABLE_ROWS = [  # (label, key or function of a result)
    ("trials × worker nodes (concurrency)", lambda r: f"{r['trials']} × {r['nodes']} ({r['concurrency']})"),
    ("trials complete / left running", lambda r: f"{r['trials_complete']} / {r['runs_left_running']}"),
    ("trials per minute", "trials_per_min"),
    ("driver CPU s per trial (cores on average)", lambda r: f"{r['driver_cpu_s_per_trial']:.3f} ({r['driver_cores']:.3f})"),
    ("driver peak RSS MB", "driver_rss_mb"),
    ("MLflow requests per trial", "mlflow_requests_per_trial"),
    ("per-trial orchestration s, first → last fifth (median)",
     lambda r: f"{r['orchestration_s']['first_fifth_median']:.2f} → {r['orchestration_s']['last_fifth_median']:.2f}"),
    ("growth ratio", "growth_ratio"),
    ("orchestration trend, s per 1,000 trials (least squares)", "orchestration_slope_s_per_1000"),
    ("wall ÷ ideal", "wall_over_ideal"),
    ("start (Ray, parent run, teacher warm-up) s", "start_s"),
    ("end of sweep s (frontier and records s)", lambda r: f"{r['end_of_sweep_s']:.1f} ({r['finish_s']:.1f})"),
]


def table(results: list[dict[str, Any]]) -> str:
    """A markdown table of runs side by side (docs/benchmarks.md, Scale)."""
    def cell(result: dict[str, Any], how: Any) -> str:
        value = how(result) if callable(how) else result.get(how)
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| | " + " | ".join(f"{r['trials']} × {r['nodes']}" for r in results) + " |",
             "|---|" + "---|" * len(results)]
    lines += [f"| {label} | " + " | ".join(cell(r, how) for r in results) + " |" for label, how in TABLE_ROWS]
    return "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys

    print(table([json.loads(Path(path).read_text()) for path in sys.argv[1:]]))
