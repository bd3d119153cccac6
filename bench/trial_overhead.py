"""Per-trial orchestration overhead without Ray: trials run one after another in this process, as a kept
worker process runs them, against a real embedded `mlflow server`, with the overhead cuts on and off.

    python bench/trial_overhead.py [--space search_spaces/quickstart.yaml] [--trials 8] [--set KEY=VALUE ...]
                                   [--seed 0] [--out results.json]

Each variant gets its own stages (another `seed`, so neither reuses the other's), trains its teacher and
one assistant per student architecture first (not counted), then runs `--trials` trials drawn at random
from the space (the same draws for both variants) through `orchestrator.worker.trial.run_trial`:

- `cuts_on`: as a sweep's kept worker process runs them (`PXD_OVERHEAD_CUTS` unset): the dataset, the
  stages found, the teacher and assistant modules, static costs and latencies are kept between trials;
- `cuts_off`: `PXD_OVERHEAD_CUTS=0`: each trial loads, searches, builds and times again (what it downloaded
  is still kept, as in `bench/overhead.py`'s `kept_cuts_off`).

Per variant it prints the median overhead per trial (run wall time − the training of the stages it
trained), the median of each section the trial records (`overhead.<section>_s`), and the MLflow requests
per trial by endpoint with their time: every request goes to the server; a wrapper only counts it.
`cuts_off` runs second, in a process already warmed up by `cuts_on` (imports, MLflow's first model log),
so it understates what the cuts save in a fresh process. Ray's part (scheduling, reports, a new process per trial) is not here: `bench/overhead.py` measures a
whole sweep. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from orchestrator.worker.trial import TRIAL_SECTIONS
from pxd.pipeline import TIMED_SECTIONS

os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # as a sweep sets it for its trials

# the sections a trial records outside training, as bench/overhead.py reads them
SECTIONS = [s for s in TIMED_SECTIONS if s != "training"] + list(TRIAL_SECTIONS)
_ID = re.compile(r"m-[0-9a-f]{32}|[0-9a-f]{32}")


class RequestCounter:
    """Counts MLflow's HTTP requests (method, endpoint with ids masked) and their seconds; each still goes out."""

    def __init__(self) -> None:
        self.count: collections.Counter[tuple[str, str]] = collections.Counter()
        self.seconds: collections.Counter[tuple[str, str]] = collections.Counter()

    def install(self) -> None:
        from mlflow.store.artifact import http_artifact_repo as artifact_repo
        from mlflow.store.tracking import rest_store
        from mlflow.utils import rest_utils

        real = rest_utils.http_request

        def counted(host_creds: Any, endpoint: str, method: str, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return real(host_creds, endpoint, method, *args, **kwargs)
            finally:
                key = (method, _ID.sub("<id>", endpoint))
                self.count[key] += 1
                self.seconds[key] += time.perf_counter() - started

        for module in (rest_utils, rest_store, artifact_repo):
            if getattr(module, "http_request", None) is real:
                module.http_request = counted

    def take(self) -> dict[str, tuple[int, float]]:
        taken = {f"{m} {e}": (self.count[(m, e)], self.seconds[(m, e)]) for m, e in self.count}
        self.count.clear()
        self.seconds.clear()
        return taken


def draws(spec: Any, n: int, seed: int) -> list[dict[str, Any]]:
    """`n` parameter sets drawn at random from the space, as the sweep's searcher would suggest them."""
    import optuna

    from orchestrator.space.spec import sample_params

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    drawn = []
    for _ in range(n):
        trial = study.ask()
        drawn.append(sample_params(spec, trial))
        study.tell(trial, 0.0)
    return drawn


def run_variant(label: str, spec: Any, drawn: list[dict[str, Any]], warm: list[dict[str, Any]], uri: str,
                counter: RequestCounter) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from orchestrator.driver.parent_run import ensure_experiment, open_parent_run
    from orchestrator.results import schema
    from orchestrator.worker.context import TrialContext
    from orchestrator.worker.trial import OVERHEAD_CUTS_ENV, run_trial

    if label == "cuts_off":
        os.environ[OVERHEAD_CUTS_ENV] = "0"
    else:
        os.environ.pop(OVERHEAD_CUTS_ENV, None)
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, f"bench-trial-overhead-{label}")
    parent = open_parent_run(client, experiment_id, f"bench-{label}", spec, "sqlite:///unused.db", resume=False)
    context = TrialContext(spec=spec, sweep_name=f"bench-{label}", tracking_uri=uri, experiment_id=experiment_id,
                           parent_run_id=parent)
    # the shared stages first (a sweep's warm-up and its first trial per architecture), not counted: one
    # trial per student architecture of the draws, from other draws (its student is not one measured)
    for arch in dict.fromkeys(p.get("student.arch") for p in drawn):
        run_trial(next((p for p in warm if p.get("student.arch") == arch),
                       next(p for p in drawn if p.get("student.arch") == arch)), context)
    counter.take()
    rows = []
    for number, params in enumerate(drawn, 1):
        started = time.perf_counter()
        result = run_trial(params, context)
        wall = time.perf_counter() - started
        requests = counter.take()
        metrics = result.metrics
        trained = metrics[schema.SweepMetric.STAGE_SECONDS_TRAINED]
        sections = {s: metrics.get(schema.SweepMetric.overhead(s), float("nan")) for s in SECTIONS}
        rows.append({"wall_s": wall, "trained_s": trained, "overhead_s": wall - trained, **sections,
                     "requests": sum(c for c, _ in requests.values()),
                     "request_s": sum(s for _, s in requests.values()), "by_endpoint": requests})
        print(f"[bench] {label} trial {number}/{len(drawn)}: overhead {wall - trained:.2f} s, "
              f"{rows[-1]['requests']} requests", file=sys.stderr, flush=True)
    return {"rows": rows, **summary(rows)}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    endpoints: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for row in rows:
        for name, (count, seconds) in row["by_endpoint"].items():
            endpoints[name][0] += count / len(rows)
            endpoints[name][1] += seconds / len(rows)
    return {
        "overhead_median_s": statistics.median(r["overhead_s"] for r in rows),
        "overhead_p90_s": sorted(r["overhead_s"] for r in rows)[int(0.9 * (len(rows) - 1))],
        "sections_median_s": {s: statistics.median(r[s] for r in rows) for s in SECTIONS},
        "other_median_s": statistics.median(r["overhead_s"] - sum(r[s] for s in SECTIONS) for r in rows),
        "requests_per_trial": statistics.mean(r["requests"] for r in rows),
        "request_s_per_trial": statistics.mean(r["request_s"] for r in rows),
        "endpoints_per_trial": dict(sorted(endpoints.items(), key=lambda kv: -kv[1][1])),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="search_spaces/quickstart.yaml")
    parser.add_argument("--trials", type=int, default=8, help="trials per variant (after the shared stages)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value of the space, as `pxd sweep --set`")
    parser.add_argument("--seed", type=int, default=0, help="the draws' seed")
    parser.add_argument("--out", type=Path, default=None, help="write every number as JSON")
    args = parser.parse_args()

    from orchestrator.space.spec import load_spec
    from orchestrator.tracking.server import EmbeddedServer

    torch.set_num_threads(1)  # a trial's (search.resources.cpu: 1)
    counter = RequestCounter()
    counter.install()
    results: dict[str, dict[str, Any]] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="pxd-bench-trial-overhead-") as root:
        os.environ["PXD_CACHE_DIR"] = str(Path(root) / "cache")
        server = EmbeddedServer(Path(root))
        uri = server.start()
        try:
            for offset, label in enumerate(("cuts_on", "cuts_off")):
                # its own stages: another seed (neither variant reuses the other's)
                spec = load_spec(args.space, [*args.overrides, f"seed={1000 + offset}"])
                drawn, warm = draws(spec, args.trials, args.seed), draws(spec, 50, args.seed + 1)
                print(f"[bench] {args.space} {label}: {args.trials} trials ...", file=sys.stderr, flush=True)
                results[label] = run_variant(label, spec, drawn, warm, uri, counter)
        finally:
            server.stop()
            os.environ.pop("PXD_OVERHEAD_CUTS", None)
    load_after = os.getloadavg()
    print(f"space {args.space} {' '.join(args.overrides)}; {args.trials} trials per variant, run in one process; "
          f"load average before {load_before[0]:.2f} after {load_after[0]:.2f}; {os.cpu_count()} CPUs; "
          f"torch {torch.__version__}")
    labels = list(results)
    print(f"{'':<34}" + "".join(f"{label:>12}" for label in labels))
    lines = [("overhead s/trial, median", "overhead_median_s"), ("overhead s/trial, p90", "overhead_p90_s")]
    for title, key in lines:
        print(f"{title:<34}" + "".join(f"{results[label][key]:>12.3f}" for label in labels))
    for section in SECTIONS:
        print(f"{'  ' + section + ' s, median':<34}" + "".join(
            f"{results[label]['sections_median_s'][section]:>12.3f}" for label in labels))
    print(f"{'  other s, median':<34}" + "".join(f"{results[label]['other_median_s']:>12.3f}" for label in labels))
    print(f"{'MLflow requests/trial':<34}" + "".join(f"{results[label]['requests_per_trial']:>12.1f}" for label in labels))
    print(f"{'  their ms/trial':<34}" + "".join(
        f"{1000 * results[label]['request_s_per_trial']:>12.1f}" for label in labels))
    on, off = results["cuts_on"], results["cuts_off"]
    print(f"ratio cuts_off/cuts_on: median overhead {off['overhead_median_s'] / on['overhead_median_s']:.2f}x, "
          f"requests {off['requests_per_trial'] / on['requests_per_trial']:.2f}x")
    print("cuts_on, MLflow requests per trial by endpoint (count, ms):")
    for name, (count, seconds) in on["endpoints_per_trial"].items():
        print(f"  {count:5.1f} {1000 * seconds:7.1f}  {name}")
    if args.out:
        args.out.write_text(json.dumps({"results": results, "space": args.space, "overrides": args.overrides,
                                        "trials": args.trials, "load_before": load_before, "load_after": load_after,
                                        "python": platform.python_version(), "torch": torch.__version__}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
