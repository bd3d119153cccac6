"""Orchestration overhead benchmark: per-trial wall time not spent training stages, and sweep efficiency.

    python bench/overhead.py [--space search_spaces/quickstart.yaml] [--set KEY=VALUE ...] [--trials N [N ...]]
                             [--compare | --lending] [--repeats N] [--out results.json]

Runs the space on the local Ray with a fresh results root (its own embedded MLflow server and stage
store) and reads every trial back from MLflow:

- overhead of a trial = its run's wall time (end − start) − `stage_seconds_trained` (the training time of
  the stages it trained itself); median and p90 over the COMPLETE trials, and the median of each timed
  section (`overhead.<section>_s`: data, models, stages, latency, test, log_model; "other" is the rest:
  starting the run, logging params and the result);
- sweep efficiency = Σ stage training time (every stage run of the sweep, the teacher included)
  ÷ (sweep wall time × search.max_concurrent), the sweep's wall time measured around `run_sweep` (Ray and
  MLflow start-up included); "trial-phase efficiency" uses the span from the first trial's start to the
  last trial's end instead; "CPU-weighted sweep efficiency" counts each stage's training time once per
  CPU thread it trained with (`train_threads`) against wall × concurrency × search.resources.cpu, so a
  teacher warm-up that trains alone on every slot's CPUs counts as using them;
- phases of the sweep's wall time: start-up (validation, Ray, the MLflow server, the parent run) until
  the first stage begins training, the teacher warm-up until the first trial's run starts, the trial
  phase until the last trial's run ends, and the wind-down (Optuna, frontier, plots, stopping the
  server) until `run_sweep` returns.

"share of slot time" splits the sweep's wall time × concurrency into stage training (the efficiency)
and what the slots did instead: the start-up, the teacher warm-up's slot time not training, the trial
runs' stage look-ups and waits for a stage another trial trains, the rest of the runs' overhead, slots with
no run (the last trials running alone, new worker processes starting) and the wind-down. It says why the
efficiency is what it is. Several `--trials` counts (e.g. `--trials 8 24 48`) run one sweep each, side by
side: the start-up and warm-up are fixed, so the efficiency grows with the sweep's length.

"slot time not training" = (that span × concurrency − Σ the trials' own stage training) ÷ trials: the
run's overhead plus what happens between runs (a new worker process importing torch, timm and MLflow,
idle slots).

`--compare` runs four variants, alternating: `cuts_off` (`PXD_OVERHEAD_CUTS=0` and
`search.reuse_actors=false`: every trial in a fresh worker process, loading its dataset, timing its own
latency and logging its model cold), `fresh_processes` (the cuts on, `search.reuse_actors=false`:
Tune's own default), `kept_cuts_off` (worker processes kept, `PXD_OVERHEAD_CUTS=0`: what
a kept process keeps is off, i.e. its dataset, the stages it found, its teacher and assistant modules,
the static costs and latencies it measured, and the model-logging warm-up) and `default` (as shipped:
the cuts on, `search.reuse_actors=true`), and prints them side by side with the ratios. Without
`--compare` only `default` runs.

`--lending` runs `lending_off` (`search.lend_idle_cpus=false`: each trial keeps its own threads) and
`default` (idle trial slots lend their CPUs to the trials still running once the last trial has started,
`orchestrator.driver.lending`), alternating; lending shortens the wall time and the stages' training time
alike, so it shows in the sweep wall and the CPU-weighted efficiency, not in the issue's efficiency.

`--gpu-busy` (an NVIDIA GPU, `pip install nvidia-ml-py`) samples the GPU's utilisation with NVML every
0.1 s through each sweep (`bench/gpu_busy.py`) and prints the busy fraction over the whole sweep and over
its trial phase; for a sweep of small fractional-GPU trials, e.g.
`--gpu-busy --set search.resources.gpu=0.25 --set search.max_concurrent=4 --trials 16`. Without NVML it
stops before any sweep starts.
Each run starts its own Ray, since trial processes take the environment from it. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch

from bench.gpu_busy import GpuBusySampler, NvmlUnavailable
from orchestrator.driver.launch import SweepOptions, run_sweep
from orchestrator.results import schema
from orchestrator.space.spec import load_spec
from orchestrator.stages.listing import list_stages
from orchestrator.worker.trial import OVERHEAD_CUTS_ENV, TRIAL_SECTIONS
from pxd.pipeline import TIMED_SECTIONS

SECTIONS = [s for s in TIMED_SECTIONS if s != "training"] + list(TRIAL_SECTIONS)


def percentile(values: list[float], fraction: float) -> float:
    """Linear-interpolated percentile (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def one_sweep(spec: Any, *, cuts: bool, name: str, gpu_index: int | None = None) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.server import resolve_tracking

    os.environ[OVERHEAD_CUTS_ENV] = "1" if cuts else "0"
    with tempfile.TemporaryDirectory(prefix="pxd-bench-overhead-") as root:
        with contextlib.ExitStack() as stack:
            sampler = None if gpu_index is None else stack.enter_context(GpuBusySampler(gpu_index))
            started, started_clock = time.perf_counter(), time.time()
            outcome = run_sweep(spec, SweepOptions(name=name, root=root, quiet=True))
            wall = time.perf_counter() - started
        ended_clock = time.time()
        ray.shutdown()  # the next run starts its own Ray, whose workers take the environment set above
        target = resolve_tracking(None, Path(root), read_only=True)
        client = MlflowClient(target.uri)
        parent = client.get_run(outcome.parent_run_id)
        runs = schema.trial_runs(client, parent)
        trials = [run for run in runs if run.data.tags.get(schema.Tag.STATE) == "COMPLETE"]
        stages = [row for row in list_stages(target.uri) if row["train_seconds"] == row["train_seconds"]]  # NaN: no result
        stage_seconds = sum(row["train_seconds"] for row in stages)
        # CPU-seconds: a stage trained on k threads (the teacher warm-up holds every trial slot's CPUs) counts k times
        stage_cpu_seconds = sum(row["train_seconds"] * _threads(client, row["run_id"]) for row in stages)
        stage_starts = _stage_run_starts(client)
    rows = []
    for run in trials:
        metrics = run.data.metrics
        run_wall = (run.info.end_time - run.info.start_time) / 1000
        trained = metrics.get(schema.SweepMetric.STAGE_SECONDS_TRAINED, float("nan"))
        sections = {s: metrics.get(schema.SweepMetric.overhead(s), float("nan")) for s in SECTIONS}
        overhead = run_wall - trained
        rows.append({"wall_s": run_wall, "trained_s": trained, "overhead_s": overhead, **sections,
                     "other": overhead - sum(v for v in sections.values() if v == v),
                     "latency_reused": metrics.get(schema.SweepMetric.LATENCY_REUSED, 0.0),
                     "start": run.info.start_time / 1000, "end": run.info.end_time / 1000})
    concurrency = spec.require_search().max_concurrent or 1
    span = max(r["end"] for r in rows) - min(r["start"] for r in rows) if rows else float("nan")
    trial_trained = sum(r["trained_s"] for r in rows)
    overheads = [r["overhead_s"] for r in rows]
    phases = _phases(rows, stage_starts, started_clock, ended_clock)
    gpu = {} if sampler is None else {
        "sweep": sampler.summary(started_clock, ended_clock),
        "trial_phase": sampler.summary(min(r["start"] for r in rows), max(r["end"] for r in rows)) if rows else {}}
    return {
        "gpu_busy": gpu,
        "cuts": cuts, "sweep_wall_s": wall, "trials_complete": len(rows), "concurrency": concurrency,
        "stage_seconds_total": stage_seconds, "efficiency": stage_seconds / (wall * concurrency),
        "cpu_weighted_efficiency": stage_cpu_seconds / (wall * concurrency * spec.require_search().resources.cpu),
        "trial_phase_efficiency": trial_trained / (span * concurrency) if rows else float("nan"),
        # what a trial slot spends not training, between the first trial's start and the last one's end:
        # the run's own overhead plus starting a worker process (imports) and idle slots
        "slot_overhead_per_trial_s": (span * concurrency - trial_trained) / len(rows) if rows else float("nan"),
        "overhead_median_s": statistics.median(overheads) if rows else float("nan"),
        "overhead_p90_s": percentile(overheads, 0.9),
        "trial_wall_median_s": statistics.median(r["wall_s"] for r in rows) if rows else float("nan"),
        "trained_median_s": statistics.median(r["trained_s"] for r in rows) if rows else float("nan"),
        "section_median_s": {s: statistics.median(r[s] for r in rows) for s in [*SECTIONS, "other"]} if rows else {},
        "latency_reused": sum(r["latency_reused"] for r in rows),
        "phases_s": phases,
        "slot_seconds": _slot_seconds(rows, phases, stage_seconds, concurrency),
        "runs_not_complete": len(runs) - len(trials),
        "gap_between_runs_median_s": _gap_between_runs(rows, concurrency),
        "trials": rows,
    }


def _threads(client: Any, run_id: str) -> float:
    """The CPU threads a stage trained with (`train_threads`; stages stored before it was logged: 1)."""
    return client.get_run(run_id).data.metrics.get("train_threads", 1.0)


def _stage_run_starts(client: Any) -> list[float]:
    """When each stage of the sweep's stage store began training (s since the epoch), earliest first.

    A stage run is created at its first checkpoint or when the stage is saved, so its start time can
    be after training began: the estimate is the earlier of that and (run end − training time)."""
    from orchestrator.stages.store import STAGES_EXPERIMENT

    experiment = client.get_experiment_by_name(STAGES_EXPERIMENT)
    if experiment is None:
        return []
    starts = []
    for run in client.search_runs([experiment.experiment_id], max_results=5000):
        start = run.info.start_time / 1000
        trained = run.data.metrics.get("train_seconds")
        if run.info.end_time and trained is not None:
            start = min(start, run.info.end_time / 1000 - trained)
        starts.append(start)
    return sorted(starts)


def _phases(rows: list[dict[str, Any]], stage_starts: list[float], started: float, ended: float) -> dict[str, float]:
    """Where the sweep's wall time goes, in order: start-up (validation, Ray and the MLflow server,
    the parent run) until the first stage run starts; the teacher warm-up until the first trial's run
    starts; the trial phase until the last trial's run ends; the wind-down (closing Optuna, the
    frontier, plots, stopping the server) until `run_sweep` returns."""
    if not rows:
        return {}
    first_trial, last_trial = min(r["start"] for r in rows), max(r["end"] for r in rows)
    first_stage = min([s for s in stage_starts if s <= first_trial] or [first_trial])
    return {"start_up": first_stage - started, "teacher_warm_up": first_trial - first_stage,
            "trial_phase": last_trial - first_trial, "wind_down": ended - last_trial}


# where a sweep's slot time (wall × concurrency) goes, in the order of `_slot_seconds`
SLOT_USES = {
    "training": "stages training (the efficiency)",
    "start_up": "start-up: Ray, MLflow server, runs",
    "warm_up_idle": "teacher warm-up, not training",
    "stage_waits": "runs: stage look-ups and waits",
    "run_overhead": "runs: the rest of their overhead",
    "idle_slots": "idle slots: tail, process starts",
    "wind_down": "wind-down: frontier, server stop",
}


def _slot_seconds(rows: list[dict[str, Any]], phases: dict[str, float], stage_seconds: float,
                  concurrency: int) -> dict[str, float]:
    """The sweep's slot-seconds (wall × concurrency), split so that the parts add up to it: stage training
    (the efficiency's numerator) and every kind of slot time that is not. The teacher trained outside the
    trials (its warm-up) is the stage time the trial runs did not train themselves. A wait for a stage
    another trial trains is inside its run's `stages` section; a slot with no run (the last trials running
    alone, a new worker process starting) is idle. It reads the COMPLETE runs only: where some trial did not
    complete, the stages it trained count in the warm-up and its run as idle slots (the table says so)."""
    if not rows or not phases:
        return {}
    run_wall = sum(r["wall_s"] for r in rows)
    trial_trained = sum(r["trained_s"] for r in rows)
    stage_sections = sum(r["stages"] for r in rows if r["stages"] == r["stages"])
    return {
        "training": stage_seconds,
        "start_up": phases["start_up"] * concurrency,
        "warm_up_idle": phases["teacher_warm_up"] * concurrency - (stage_seconds - trial_trained),
        "stage_waits": stage_sections,
        "run_overhead": run_wall - trial_trained - stage_sections,
        "idle_slots": phases["trial_phase"] * concurrency - run_wall,
        "wind_down": phases["wind_down"] * concurrency,
    }


def _gap_between_runs(rows: list[dict[str, Any]], concurrency: int) -> float:
    """Median time a slot stands between one trial's run ending and the next run starting.

    Trials are assigned to slots greedily in start order (a run takes the slot that freed up
    earliest); the first `concurrency` runs have no predecessor."""
    slots: list[float] = []
    gaps = []
    for row in sorted(rows, key=lambda r: r["start"]):
        if len(slots) < concurrency:
            slots.append(row["end"])
            continue
        earliest = min(range(len(slots)), key=lambda i: slots[i])
        gaps.append(row["start"] - slots[earliest])
        slots[earliest] = row["end"]
    return statistics.median(gaps) if gaps else float("nan")


def print_table(results: dict[str, dict[str, Any]]) -> None:
    labels = list(results)
    print(f"{'':<34}" + "".join(f"{label:>16}" for label in labels))

    def line(title: str, values: list[float], fmt: str = "{:>16.2f}") -> None:
        print(f"{title:<34}" + "".join(fmt.format(v) for v in values))

    line("trials COMPLETE", [results[k]["trials_complete"] for k in labels], "{:>16.0f}")
    line("sweep wall s", [results[k]["sweep_wall_s"] for k in labels], "{:>16.1f}")
    line("Σ stage training s (all stages)", [results[k]["stage_seconds_total"] for k in labels], "{:>16.1f}")
    line("trial wall s, median", [results[k]["trial_wall_median_s"] for k in labels])
    line("trial stage training s, median", [results[k]["trained_median_s"] for k in labels])
    line("overhead s/trial, median", [results[k]["overhead_median_s"] for k in labels])
    line("overhead s/trial, p90", [results[k]["overhead_p90_s"] for k in labels])
    for section in [*SECTIONS, "other"]:
        line(f"  {section} s, median", [results[k]["section_median_s"].get(section, float("nan")) for k in labels])
    line("slot time not training s/trial", [results[k]["slot_overhead_per_trial_s"] for k in labels])
    line("  gap between runs s, median", [results[k]["gap_between_runs_median_s"] for k in labels])
    for phase in ("start_up", "teacher_warm_up", "trial_phase", "wind_down"):
        line(f"phase {phase} s", [results[k]["phases_s"].get(phase, float("nan")) for k in labels], "{:>16.1f}")
    print("share of slot time (wall × concurrency)")
    for use, title in SLOT_USES.items():
        line(f"  {title}", [_share(results[k], use) for k in labels], "{:>16.3f}")
    if any(results[k].get("runs_not_complete") for k in labels):
        # the split reads the COMPLETE runs: stages the others trained count as warm-up, their runs as idle slots
        line("  (trial runs not COMPLETE: split approximate)", [results[k].get("runs_not_complete", 0) for k in labels],
             "{:>16.0f}")
    line("trials reusing a latency", [results[k]["latency_reused"] for k in labels], "{:>16.0f}")
    line("sweep efficiency", [results[k]["efficiency"] for k in labels], "{:>16.3f}")
    line("trial-phase efficiency", [results[k]["trial_phase_efficiency"] for k in labels], "{:>16.3f}")
    line("CPU-weighted sweep efficiency", [results[k]["cpu_weighted_efficiency"] for k in labels], "{:>16.3f}")
    if any(results[k].get("gpu_busy") for k in labels):
        for window in ("sweep", "trial_phase"):
            line(f"GPU busy fraction, {window}",
                 [results[k]["gpu_busy"].get(window, {}).get("busy_fraction", float("nan")) for k in labels], "{:>16.3f}")
        line("GPU memory used MiB, max",
             [results[k]["gpu_busy"].get("sweep", {}).get("memory_used_max_mib", float("nan")) for k in labels], "{:>16.0f}")


def verdict(margin: float, fmt: str = "{:.3f}") -> str:
    """'met', or 'missed by' how much, from the margin by which the figure beats its target."""
    return "met" if margin >= 0 else f"missed by {fmt.format(-margin)}"


def _share(result: dict[str, Any], use: str) -> float:
    """One use's share of the sweep's slot time, from the phase clock (so the shares add up to 1)."""
    slots = result.get("slot_seconds", {})
    return slots.get(use, float("nan")) / sum(slots.values()) if slots else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="search_spaces/quickstart.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the space, as `pxd sweep --set`")
    parser.add_argument("--trials", type=int, nargs="+", default=None,
                        help="override search.trials; several counts run one sweep each, side by side (how "
                             "efficiency grows with the sweep's length)")
    parser.add_argument("--compare", action="store_true", help="run cuts_off, fresh_processes, kept_cuts_off and default, alternating")
    parser.add_argument("--lending", action="store_true",
                        help="run lending_off (search.lend_idle_cpus=false) and default, alternating")
    parser.add_argument("--repeats", type=int, default=1, help="sweeps per variant (alternating with --compare)")
    parser.add_argument("--out", type=Path, default=None, help="write every number as JSON")
    parser.add_argument("--gpu-busy", action="store_true", help="sample GPU utilisation with NVML through each sweep")
    parser.add_argument("--gpu-index", type=int, default=0, help="the GPU NVML samples (with --gpu-busy)")
    args = parser.parse_args()
    gpu_index = args.gpu_index if args.gpu_busy else None
    if gpu_index is not None:
        try:  # before any sweep: a missing NVML must not cost a sweep
            with GpuBusySampler(gpu_index) as probe:
                print(f"[bench] sampling {probe.name} (GPU {gpu_index}) with NVML", file=sys.stderr)
        except NvmlUnavailable as error:
            parser.error(f"--gpu-busy: {error}")
    counts = args.trials or [None]
    if sum([len(counts) > 1, args.compare, args.lending]) > 1:
        parser.error("choose one of --compare, --lending and several --trials counts")
    overrides = list(args.overrides) + ([f"search.trials={counts[0]}"] if len(counts) == 1 and counts[0] else [])
    # (label, overhead cuts, overrides of the variant): `default` is what ships
    variants = [("cuts_off", False, ["search.reuse_actors=false"]), ("fresh_processes", True, ["search.reuse_actors=false"]),
                ("kept_cuts_off", False, []), ("default", True, [])]
    if not args.compare:
        variants = variants[-1:]
    if args.lending:
        variants = [("lending_off", True, ["search.lend_idle_cpus=false"]), ("default", True, [])]
    if len(counts) > 1:
        variants = [(f"{count} trials", True, [f"search.trials={count}"]) for count in counts]
    specs = {label: load_spec(args.space, [*overrides, *extra]) for label, _, extra in variants}
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, *_ in variants}
    for repeat in range(args.repeats):
        for label, cuts, *_ in variants if repeat % 2 == 0 else variants[::-1]:
            print(f"[bench] {args.space} {label} (repeat {repeat + 1}) ...", file=sys.stderr, flush=True)
            runs[label].append(one_sweep(specs[label], cuts=cuts, name=f"bench-overhead-{label.replace(' ', '-')}-{repeat}",
                                         gpu_index=gpu_index))
    # per variant: the repeat with the median sweep wall time
    results = {label: sorted(rs, key=lambda r: r["sweep_wall_s"])[len(rs) // 2] for label, rs in runs.items()}
    load_after = os.getloadavg()
    print(f"space {args.space} {' '.join(overrides)}; load average before {load_before[0]:.2f} "
          f"after {load_after[0]:.2f}; {os.cpu_count()} CPUs; torch {torch.__version__}")
    print_table(results)
    pairs = (("cuts_off", "fresh_processes"), ("cuts_off", "default"), ("kept_cuts_off", "default"))
    if args.compare or args.lending:
        for baseline, label in pairs if args.compare else (("lending_off", "default"),):
            off, on = results[baseline], results[label]
            print(f"ratio {baseline}/{label}: median overhead {off['overhead_median_s'] / on['overhead_median_s']:.2f}x, "
                  f"p90 overhead {off['overhead_p90_s'] / on['overhead_p90_s']:.2f}x, "
                  f"sweep wall {off['sweep_wall_s'] / on['sweep_wall_s']:.2f}x")
    for label, result in results.items():
        overhead = result["overhead_median_s"]
        met = [f"median overhead {overhead:.2f} s vs target 1 s ({verdict(1.0 - overhead, '{:.2f} s')})",
               f"efficiency {result['efficiency']:.3f} vs target 0.85 ({verdict(result['efficiency'] - 0.85)})"]
        busy = result.get("gpu_busy", {}).get("trial_phase", {}).get("busy_fraction")
        if busy is not None:
            met.append(f"GPU busy {busy:.3f} over the trial phase vs target 0.85 ({verdict(busy - 0.85)})")
        print(f"{label}: " + "; ".join(met))
    if args.out:
        args.out.write_text(json.dumps({"runs": runs, "space": args.space, "overrides": overrides,
                                        "load_before": load_before, "load_after": load_after,
                                        "python": platform.python_version(), "torch": torch.__version__}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
