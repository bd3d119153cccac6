"""Early stopping in live sweeps: none, MO-ASHA keeping the rung's front (the default) and classic MO-ASHA.

    python bench/early_stopping.py [--space search_spaces/quickstart.yaml] [--trials N] [--set KEY=VALUE ...]
                                   [--grace 1] [--eta 3] [--out results.json]

Runs the same space three times on the local Ray, each with a fresh results root (its own embedded MLflow
server and stage store), the same sampler and seed: `none` (`search.early_stopping.kind: none`),
`keep_front` (MO-ASHA, `keep_front: true`, the default rule) and `classic` (MO-ASHA, `keep_front: false`).
For each it reads every trial back from MLflow and prints the trials completed and stopped, the student
epochs trained (the steps of each trial's `student.val_top1`: a stopped trial counts the epochs it ran),
the sweep's wall time and its normalised hypervolume, with the ratios to `none`.

Unlike the replays of `bench/search_quality.py` (same points, same order, only the stopping differs), the
sampler here follows what each sweep's trials report, so the three sweeps need not sample the same
students: read the ratios of one run as one draw. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from mlflow.tracking import MlflowClient

from orchestrator.driver.launch import SweepOptions, run_sweep
from orchestrator.results import schema
from orchestrator.space.spec import load_spec

STUDENT_EPOCHS = schema.epoch_metric("student", "val_top1")


def one_sweep(spec: Any, *, name: str) -> dict[str, Any]:
    from orchestrator.tracking.server import resolve_tracking

    with tempfile.TemporaryDirectory(prefix="pxd-bench-early-") as root:
        started = time.perf_counter()
        outcome = run_sweep(spec, SweepOptions(name=name, root=root, quiet=True))
        wall = time.perf_counter() - started
        target = resolve_tracking(None, Path(root), read_only=True)  # the sweep stopped its server
        try:
            client = MlflowClient(target.uri)
            states = {row.trial_id: row.state for row in outcome.rows}
            # the student epochs a trial trained: the steps of its per-epoch student.val_top1 (a stopped trial's too)
            epochs = {row.trial_id: max((int(m.step) for m in client.get_metric_history(row.run_id, STUDENT_EPOCHS)),
                                        default=0)
                      for row in outcome.rows if row.run_id}
        finally:
            target.close()
    return {
        "wall_s": wall,
        "hypervolume_normalised": float(outcome.table["hypervolume_normalised"]),
        "n_frontier": outcome.table.get("n_frontier"),
        "student_epochs": sum(epochs.values()),
        "complete": sum(state == "COMPLETE" for state in states.values()),
        "stopped": sum(state == "PRUNED" for state in states.values()),
        "failed": sum(state == "FAILED" for state in states.values()),
        "epochs_per_trial": epochs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="search_spaces/quickstart.yaml")
    parser.add_argument("--trials", type=int, default=None, help="override search.trials")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the space, as `pxd sweep --set`")
    parser.add_argument("--grace", type=int, default=1, help="search.early_stopping.grace_period")
    parser.add_argument("--eta", type=int, default=3, help="search.early_stopping.reduction_factor")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()
    overrides = list(args.overrides) + ([f"search.trials={args.trials}"] if args.trials else [])
    moasha = ["search.early_stopping.kind=moasha", f"search.early_stopping.grace_period={args.grace}",
              f"search.early_stopping.reduction_factor={args.eta}"]
    variants = {
        "none": [*overrides, "search.early_stopping.kind=none"],
        "keep_front": [*overrides, *moasha, "search.early_stopping.keep_front=true"],
        "classic": [*overrides, *moasha, "search.early_stopping.keep_front=false"],
    }
    specs = {label: load_spec(args.space, sets) for label, sets in variants.items()}  # all checked before any sweep
    load_before = os.getloadavg()
    results: dict[str, dict[str, Any]] = {}
    for label, spec in specs.items():
        print(f"[bench] {args.space} early stopping {label} ...", file=sys.stderr, flush=True)
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            results[label] = one_sweep(spec, name=f"bench-early-{label}")
        finally:
            ray.shutdown()
        print(f"[bench] {label}: {json.dumps(results[label])}", file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    print(f"space {args.space} {' '.join(overrides)}; MO-ASHA grace {args.grace}, η {args.eta}; load average before "
          f"{load_before[0]:.2f} after {load_after[0]:.2f}; {os.cpu_count()} CPUs; torch {torch.__version__}")
    columns = ("complete", "stopped", "failed", "student_epochs", "wall_s",
               "hypervolume_normalised", "n_frontier")
    print(f"{'':<26}" + "".join(f"{label:>14}" for label in results))
    for column in columns:
        print(f"{column:<26}" + "".join(f"{_fmt(results[label][column]):>14}" for label in results))
    none = results["none"]
    for label in ("keep_front", "classic"):
        row = results[label]
        print(f"{label} / none: student epochs {row['student_epochs'] / max(none['student_epochs'], 1):.3f}, "
              f"hypervolume {row['hypervolume_normalised'] / none['hypervolume_normalised']:.3f}, "
              f"wall {row['wall_s'] / none['wall_s']:.3f}")
    if args.out:
        args.out.write_text(json.dumps({"results": results, "space": args.space, "overrides": overrides,
                                        "grace": args.grace, "eta": args.eta, "load_before": load_before,
                                        "load_after": load_after, "python": platform.python_version(),
                                        "torch": torch.__version__}, indent=2))
    return 0


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) and value < 10 else (
        f"{value:.1f}" if isinstance(value, float) else str(value))


if __name__ == "__main__":
    sys.exit(main())
