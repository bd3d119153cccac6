"""The parts of bench/scale.py that need no cluster: the samplers' ask+tell time as a study grows, and the
Pareto page at 1,000 points in headless Chromium.

    PYTHONPATH=. python bench/scale_probes.py [--samplers tpe nsga2 gp random] [--at 100 500 1000]
                                              [--storage URL] [--page-points 1000]

`sampler_ms`: for each sampler, a study of the scale space (bench/scale.yaml) with pxd's own sampler
(`orchestrator.space.spec.make_sampler`, the space's seed) in `storage` (the sweep's Postgres in
bench/scale.py; in memory without one), asked and told trial after trial with the simulated score and
the students' pixel and compute proxies as the three objectives; the median ask+tell of the 10 trials
before each of `at` is reported. A sampler that goes over `budget_s` stops there: its row says at how
many trials (`measured_to`), and the sizes it did not reach are null.

`pareto_page`: `orchestrator.results.plots.plot_html` of a frontier table of `points` trials (the
sweep's own rows when given, else seeded synthetic ones), opened from a file in headless Chromium
(playwright, `chromium` on PATH); time to interactive = the navigation's load event end, when the page's
script has bound its handlers, and the time a hover takes to show its trial.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna

from orchestrator.results.frontier import TrialRow, frontier_table
from orchestrator.results.plots import plot_html
from orchestrator.space.search import optuna_directions
from orchestrator.space.spec import load_spec, make_sampler, sample_params
from pxd.simulated import simulated_score

SPACE = Path(__file__).resolve().parent / "scale.yaml"
SAMPLERS = ("tpe", "nsga2", "gp", "random")
WINDOW = 10  # trials whose ask+tell make the median at each size


def _objectives(params: dict[str, Any], seed: int) -> list[float]:
    """val_top1 (the simulated score), gmacs and pixels proxies of a sampled student: what the sweep's
    objectives are made of, without building the model."""
    resolution = int(params.get("student.resolution", 16))
    width = int(params.get("student.widths.1", 16))
    depth = int(params.get("student.depths.1", 1))
    parameters = 2000 * width * depth
    settings = {k: v for k, v in params.items() if not k.startswith("student.")}
    score = simulated_score("student", resolution=resolution, image_resolution=32, parameters=parameters,
                            settings=settings, seed=seed)
    return [score, parameters * resolution**2 * 1e-9, float(resolution**2)]


def sampler_ms(samplers: list[str], at: list[int], *, storage: str | None = None, budget_s: float = 600.0,
               space: Path = SPACE) -> dict[str, Any]:
    """Median ask+tell milliseconds at each study size in `at`, per sampler (see the module docstring)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    result: dict[str, Any] = {"at": list(at), "storage": "postgres" if storage else "in-memory",
                              "window": WINDOW, "budget_s": budget_s}
    for name in samplers:
        spec = load_spec(space, [f"search.sampler.name={name}"])
        study = optuna.create_study(directions=optuna_directions(spec.objective_modes), sampler=make_sampler(spec), storage=storage,
                                    study_name=f"bench-sampler-{name}-{time.time_ns()}")
        times: list[float] = []
        started = time.perf_counter()
        while len(times) < max(at) and time.perf_counter() - started < budget_s:
            began = time.perf_counter()
            trial = study.ask()
            values = _objectives(sample_params(spec, trial), seed=len(times))
            study.tell(trial, values)
            times.append(1000 * (time.perf_counter() - began))
        result[name] = {"measured_to": len(times),
                        **{str(n): (statistics.median(times[n - WINDOW:n]) if len(times) >= n else None) for n in at}}
        print(f"[scale] sampler {name}: " + ", ".join(
            f"{n}: {result[name][str(n)]:.1f} ms" if result[name][str(n)] is not None else f"{n}: not reached"
            for n in at), file=sys.stderr, flush=True)
    return result


def synthetic_rows(points: int, seed: int = 0) -> list[TrialRow]:
    """`points` COMPLETE trials with the scale space's objectives, seeded."""
    rng = random.Random(seed)
    rows = []
    for index in range(points):
        resolution = rng.choice([8, 12, 16, 24])
        params = {"student.resolution": resolution, "student.widths.1": rng.choice([16, 32]),
                  "student.depths.1": rng.choice([1, 2]), "distill.kd": rng.random()}
        top1, gmacs, pixels = _objectives(params, seed=index)
        rows.append(TrialRow(trial_id=f"trial_{index:05d}", run_id=f"{index:032x}",
                             metrics={"val_top1": top1, "gmacs": gmacs, "pixels": pixels, "params_m": 0.02},
                             params=params, state="COMPLETE", model_uri=f"models:/m-{index:032x}",
                             arch="blockwise_resnet"))
    return rows


def pareto_page(rows: list[TrialRow] | None = None, *, points: int = 1000, browser: str | None = None) -> dict[str, Any]:
    """The page's size and its time to interactive in headless Chromium (see the module docstring)."""
    from playwright.sync_api import sync_playwright  # optional: only this probe needs it

    spec = load_spec(SPACE)
    search = spec.require_search()
    rows = rows if rows is not None else synthetic_rows(points)
    table = frontier_table(rows, search.objective_pairs, search.reference_point, search.ideal_point)
    executable = browser or shutil.which("chromium") or shutil.which("chromium-browser")
    with tempfile.TemporaryDirectory(prefix="pxd-scale-page-") as folder:
        path = plot_html(table, Path(folder) / "frontier.html", x_metrics=("gmacs", "pixels"),
                         experiment_id="1", tracking_uri="http://127.0.0.1:5000")
        size = path.stat().st_size
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=executable, headless=True,
                                                  args=["--no-sandbox", "--disable-gpu"])
            try:
                loads = [_open_page(chromium, path) for _ in range(3)]
            finally:
                chromium.close()
    best = min(loads, key=lambda load: load["interactive_ms"])
    return {"points": len(table["rows"]), "frontier": table["n_frontier"], "bytes": size,
            "interactive_s": statistics.median(load["interactive_ms"] for load in loads) / 1000,
            "hover_ms": statistics.median(load["hover_ms"] for load in loads), "loads": loads, "best": best,
            "chromium": executable}


def _open_page(chromium: Any, path: Path) -> dict[str, float]:
    page = chromium.new_page()
    try:
        started = time.perf_counter()
        page.goto(path.as_uri(), wait_until="load")
        timing = page.evaluate("() => { const n = performance.getEntriesByType('navigation')[0];"
                               " return {dom_interactive: n.domInteractive, dom_content_loaded: n.domContentLoadedEventEnd,"
                               " load: n.loadEventEnd}; }")
        wall = 1000 * (time.perf_counter() - started)
        began = time.perf_counter()
        page.hover("[data-row]", force=True)  # points overlap: the one on top takes the hover
        page.wait_for_function("() => document.getElementById('pxd-selected').textContent.length > 0")
        hover = 1000 * (time.perf_counter() - began)
    finally:
        page.close()
    return {**timing, "interactive_ms": max(timing["load"], timing["dom_content_loaded"]), "goto_wall_ms": wall,
            "hover_ms": hover}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samplers", nargs="*", default=list(SAMPLERS))
    parser.add_argument("--at", nargs="+", type=int, default=[100, 500, 1000])
    parser.add_argument("--storage", default=None, help="an Optuna RDB URL (default: in memory)")
    parser.add_argument("--budget-s", type=float, default=600.0, help="per sampler")
    parser.add_argument("--page-points", type=int, default=1000, help="0: no page")
    args = parser.parse_args()
    out: dict[str, Any] = {}
    if args.samplers:
        out["sampler_ms"] = sampler_ms(args.samplers, args.at, storage=args.storage, budget_s=args.budget_s)
    if args.page_points:
        out["pareto_page"] = pareto_page(points=args.page_points)
    print(json.dumps(out, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
