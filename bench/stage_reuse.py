"""Stage reuse benchmark: the same sweep with and without stage reuse, side by side in one run.

    python bench/stage_reuse.py [--space search_spaces/quickstart.yaml] [--trials N] [--out results.json]

Runs the space twice on the local Ray, each with a fresh results root (its own embedded MLflow server
and stage store): (1) with reuse, the default; (2) with `--force-retrain`, every trial training its own
teacher, assistant and student, as a pipeline without a store would. Prints the stage trainings, wall
time and frontier of each run, and the ratios. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from orchestrator.driver.launch import SweepOptions, run_sweep
from orchestrator.space.spec import load_spec


def one_sweep(spec, *, force_retrain: bool, name: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="pxd-bench-") as root:
        started = time.perf_counter()
        outcome = run_sweep(spec, SweepOptions(name=name, root=root, force_retrain=force_retrain, quiet=True))
        wall = time.perf_counter() - started
        totals = {k: outcome.table.get(k) for k in ("hypervolume", "n_eligible", "n_frontier")}
        stage_counts = _stage_counts(outcome)
    return {"wall_s": wall, **totals, **stage_counts}


def _stage_counts(outcome) -> dict:
    reused = sum(row.metrics.get("stages_reused", 0.0) for row in outcome.rows)
    trained = sum(row.metrics.get("stages_trained", 0.0) for row in outcome.rows)
    return {"stages_trained_in_trials": trained, "stages_reused": reused}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="search_spaces/quickstart.yaml")
    parser.add_argument("--trials", type=int, default=None, help="override search.trials")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    overrides = [f"search.trials={args.trials}"] if args.trials else []
    spec = load_spec(args.space, overrides)
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    results = {}
    for label, force in (("reuse", False), ("no_reuse", True)):
        print(f"[bench] running {args.space} with {label} ...", file=sys.stderr, flush=True)
        results[label] = one_sweep(spec, force_retrain=force, name=f"bench-{label}")
        print(f"[bench] {label}: {json.dumps(results[label])}", file=sys.stderr, flush=True)
    reuse, plain = results["reuse"], results["no_reuse"]
    # with reuse the teacher is trained once before the trials (not counted in trial totals)
    reuse_trainings = reuse["stages_trained_in_trials"] + 1
    print(f"{'run':<10} {'stage trainings':>16} {'stages reused':>14} {'wall s':>8} {'hypervolume':>12}")
    for label, row, trainings in (("reuse", reuse, reuse_trainings), ("no_reuse", plain, plain["stages_trained_in_trials"])):
        print(f"{label:<10} {trainings:>16.0f} {row['stages_reused']:>14.0f} {row['wall_s']:>8.1f} {row['hypervolume']:>12.4g}")
    print(f"ratio no_reuse/reuse: stage trainings {plain['stages_trained_in_trials'] / reuse_trainings:.2f}x, "
          f"wall time {plain['wall_s'] / reuse['wall_s']:.2f}x")
    info = {"results": results, "python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "space": args.space}
    if args.out:
        args.out.write_text(json.dumps(info, indent=2))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
