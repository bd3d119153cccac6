"""Search quality and early stopping, on a tabular benchmark.

Every point of a small fixed space (bench/search_quality.yaml: 3 student architectures × 5 input
sizes × 2 KD temperatures) is trained once through pxd's pipeline (bench/search_table.py); then

  2a  each sampler (pxd's default TPE as the space configures it, NSGA-II, GP, random), over several
      seeds, runs an Optuna study with pxd's objectives and directions, built with pxd's own
      `sampler_for` and `suggest_all`, whose trials look their results up in the table. After each
      trial: the normalised hypervolume of the trials so far (`IncrementalFrontier`), as a fraction of
      the whole grid's (the true frontier's). Reported at N = 1/6, 1/3, 1/2 of the grid size.
  2b  every grid point, in a seeded order with a simulated concurrency, is replayed through pxd's
      `MOASHA` scheduler (its `on_trial_result` on the per-epoch results a trial reports) against no
      early stopping: the hypervolume of the trials that complete, and the student epochs trained.

    PYTHONPATH=. python bench/search_quality.py --table search_quality_table.json \\
        --plot search_quality.png --out results.json

The table (minutes of training) is saved to `--table` and reused when it exists.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import optuna

from bench.search_table import SearchTable, TablePoint, check_complete, load_or_build_table, objective_values, point_key
from orchestrator.driver.early_stopping import MOASHA
from orchestrator.results.frontier import IncrementalFrontier
from orchestrator.results.schema import epoch_metric
from orchestrator.space.distributions import suggest_all
from orchestrator.space.samplers import sampler_for
from orchestrator.space.search import optuna_directions
from orchestrator.space.spec import SweepSpec, load_spec

__all__ = ["BUDGET_FRACTIONS", "hypervolume_curve", "sampler_curve", "summarise_curves", "quality_targets",
           "replay_early_stopping", "main"]

DEFAULT_SPACE = Path(__file__).with_name("search_quality.yaml")
COMPARED_SAMPLERS = ("tpe", "nsga2", "gp", "random")
BUDGET_FRACTIONS = (1 / 6, 1 / 3, 1 / 2)  # of the grid size
TARGET_FRACTION_OF_GRID = 0.90  # target: default sampler, ≤ 1/3 of the grid's trials, median of seeds
TARGET_BUDGET_FRACTION = 1 / 3
TARGET_EARLY_HYPERVOLUME = 0.95  # target: early stopping keeps ≥ 95 % of the hypervolume ...
TARGET_EARLY_EPOCHS = 0.60  # ... at ≤ 60 % of the trained epochs


def hypervolume_curve(points: Sequence[TablePoint], spec: SweepSpec) -> list[float]:
    """The normalised hypervolume after each point, in order (pxd's live-frontier computation)."""
    search = spec.require_search()
    front = IncrementalFrontier(search.objective_pairs, search.reference_point, search.ideal_point)
    curve = []
    for point in points:
        front.add(point.metrics)
        curve.append(float(front.normalised))
    return curve


def grid_hypervolume(table: SearchTable, spec: SweepSpec) -> float:
    return hypervolume_curve(table.points, spec)[-1]


def sampler_trials(table: SearchTable, spec: SweepSpec, sampler_name: str, seed: int, trials: int) -> list[TablePoint]:
    """The table rows an Optuna study with pxd's sampler, objectives and directions asks for, in order.
    A repeated point counts as a trial (a sweep would run it again). The space's own sampler keeps
    the space's options (the quickstart's TPE: `n_startup_trials: 4`); the others use Optuna's defaults."""
    search = spec.require_search()
    options = search.sampler.options if sampler_name == search.sampler.name else {}
    sampler = sampler_for(replace(search.sampler, name=sampler_name, seed=seed, options=options), spec.params)
    study = optuna.create_study(directions=optuna_directions(search.objective_modes), sampler=sampler)
    rows = table.lookup()
    asked = []
    for _ in range(trials):
        trial = study.ask()
        point = rows[point_key(suggest_all(spec.params, trial))]
        study.tell(trial, objective_values(point, search.objective_pairs))
        asked.append(point)
    return asked


def sampler_curve(table: SearchTable, spec: SweepSpec, sampler_name: str, seed: int, trials: int) -> list[float]:
    """Fraction of the grid's normalised hypervolume reached after each trial."""
    grid = grid_hypervolume(table, spec)
    return [value / grid for value in hypervolume_curve(sampler_trials(table, spec, sampler_name, seed, trials), spec)]


def budgets(grid_size: int) -> list[int]:
    return [max(1, round(grid_size * fraction)) for fraction in BUDGET_FRACTIONS]


def summarise_curves(curves: dict[str, list[list[float]]], at: Sequence[int]) -> dict[str, dict[int, dict[str, float]]]:
    """Per sampler and budget N (trials): median, 25th and 75th percentile over seeds of the fraction."""
    summary: dict[str, dict[int, dict[str, float]]] = {}
    for name, per_seed in curves.items():
        summary[name] = {}
        for n in at:
            values = np.array([curve[n - 1] for curve in per_seed])
            low, median, high = np.percentile(values, [25, 50, 75])
            summary[name][n] = {"median": float(median), "q25": float(low), "q75": float(high)}
    return summary


def quality_targets(summary: dict[str, dict[int, dict[str, float]]], default: str, grid_size: int) -> dict[str, Any]:
    """The search-quality targets, with the margin (positive: met by that much; negative: missed by that much)."""
    budget = max(1, int(grid_size * TARGET_BUDGET_FRACTION))  # "≤ 1/3 of the grid's trials"
    reached = summary[default][budget]["median"]
    margins = {n: summary[default][n]["median"] - summary["random"][n]["median"] for n in summary[default]}
    return {"budget": budget, "default_median": reached,
            "reaches_90": reached >= TARGET_FRACTION_OF_GRID, "margin_90": reached - TARGET_FRACTION_OF_GRID,
            "beats_random": margins.get(budget, float("nan")) > 0, "margin_vs_random": margins}


# ---------------------------------------------------------------------------------------------
# 2b: early stopping replayed through pxd's scheduler


def replay_early_stopping(points: Sequence[TablePoint], spec: SweepSpec, concurrency: int,
                          stopping: bool, keep_front: bool | None = None) -> dict[str, Any]:
    """Run `points` as trials, `concurrency` at a time in the given order, every student epoch one
    time unit (ties: the trial started first reports first). Each epoch's result goes through
    `MOASHA.on_trial_result` as a trial reports it (`orchestrator.worker.trial`); a STOP ends the trial there.
    `keep_front`: the scheduler's (default: the space's `search.early_stopping.keep_front`).
    Returns which trials completed, the student epochs trained and the hypervolume of the complete ones."""
    search = spec.require_search()
    early = search.early_stopping
    epochs = len(points[0].student_val_top1)
    with tempfile.TemporaryDirectory(prefix="pxd-bench-moasha-") as state_dir:
        if keep_front is not None:
            early = replace(early, keep_front=keep_front)
        scheduler = MOASHA.from_config(search.objective_pairs, early, max_t=epochs,
                                       state_path=Path(state_dir) / "early_stopping.json")
        queue = list(range(len(points)))
        running: dict[int, int] = {}  # trial index → epochs trained
        trained, complete, stopped_at = 0, [], {}
        while queue or running:
            while queue and len(running) < concurrency:
                running[queue.pop(0)] = 0
            for index in sorted(running):  # one time unit: every running trial trains one epoch
                running[index] += 1
                trained += 1
                epoch, point = running[index], points[index]
                result = {"stage": "student", "epoch": epoch, epoch_metric("student"): point.student_val_top1[epoch - 1],
                          **{name: point.metrics[name] for name in ("gmacs", "params_m", "pixels")}}
                decision = scheduler.on_trial_result(None, SimpleNamespace(trial_id=str(index)), result) if stopping else "CONTINUE"
                if decision == "STOP":
                    stopped_at[index] = epoch
                    del running[index]
                elif epoch == epochs:
                    complete.append(index)
                    del running[index]
    curve = hypervolume_curve([points[i] for i in sorted(complete)], spec)
    return {"complete": sorted(complete), "stopped_at": stopped_at, "student_epochs": trained,
            "hypervolume": curve[-1] if curve else 0.0}


def early_stopping_runs(table: SearchTable, spec: SweepSpec, seeds: Sequence[int], concurrency: int) -> list[dict[str, Any]]:
    runs = []
    for seed in seeds:
        order = np.random.default_rng(seed).permutation(len(table.points))
        points = [table.points[i] for i in order]
        plain = replay_early_stopping(points, spec, concurrency, stopping=False)
        moasha = replay_early_stopping(points, spec, concurrency, stopping=True)
        # the other ranking rule, on the same orders: classic MO-ASHA when the space keeps the front
        other = replay_early_stopping(points, spec, concurrency, stopping=True,
                                      keep_front=not spec.require_search().early_stopping.keep_front)
        runs.append({"seed": seed, "order": [point_key(p.params) for p in points], "none": plain, "moasha": moasha,
                     "hypervolume_ratio": moasha["hypervolume"] / plain["hypervolume"],
                     "epoch_ratio": moasha["student_epochs"] / plain["student_epochs"],
                     "other_rule": other, "other_hypervolume_ratio": other["hypervolume"] / plain["hypervolume"],
                     "other_epoch_ratio": other["student_epochs"] / plain["student_epochs"]})
    return runs


def summarise_early(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    def spread(key: str) -> dict[str, float]:
        low, median, high = np.percentile([run[key] for run in runs], [25, 50, 75])
        return {"median": float(median), "q25": float(low), "q75": float(high)}

    hypervolume, epochs = spread("hypervolume_ratio"), spread("epoch_ratio")
    return {"hypervolume_ratio": hypervolume, "epoch_ratio": epochs,
            "other_hypervolume_ratio": spread("other_hypervolume_ratio"), "other_epoch_ratio": spread("other_epoch_ratio"),
            "keeps_95": hypervolume["median"] >= TARGET_EARLY_HYPERVOLUME,
            "margin_95": hypervolume["median"] - TARGET_EARLY_HYPERVOLUME,
            "at_most_60": epochs["median"] <= TARGET_EARLY_EPOCHS, "margin_60": TARGET_EARLY_EPOCHS - epochs["median"]}


# ---------------------------------------------------------------------------------------------
# report


def _rule(keep_front: bool) -> str:
    return ("keep_front: the rung's Pareto front always goes on" if keep_front
            else "keep_front: false, classic MO-ASHA: only the best ⌈n/η⌉ go on")


def _spread(cell: dict[str, float]) -> str:
    return f"{cell['median']:.3f} [{cell['q25']:.3f}, {cell['q75']:.3f}]"


def _verdict(met: bool, margin: float) -> str:
    return f"met (by {margin:+.3f})" if met else f"MISSED by {-margin:.3f}"


def format_report(result: dict[str, Any]) -> str:
    grid_size, default = result["grid_size"], result["default_sampler"]
    at = sorted(next(iter(result["quality"].values())))
    lines = [f"(2a) search quality: fraction of the grid's normalised hypervolume ({result['grid_hypervolume']:.4f}, "
             f"{grid_size} points, {result['grid_frontier']} on the frontier) after N trials; "
             f"median [25th, 75th percentile] over {len(result['seeds'])} seeds", "",
             "| sampler | " + " | ".join(f"N = {n} ({n / grid_size:.2g} of grid)" for n in at) + " | distinct points at N = "
             f"{at[-1]} |", "|---|" + "---|" * (len(at) + 1)]
    for name, cells in result["quality"].items():
        label = f"{name} (pxd default)" if name == default else name
        lines.append(f"| {label} | " + " | ".join(_spread(cells[n]) for n in at) +
                     f" | {result['distinct'][name]:.1f} |")
    targets = result["quality_targets"]
    lines += ["", f"target: {default} reaches ≥ {TARGET_FRACTION_OF_GRID:.0%} of the grid's hypervolume with ≤ 1/3 of its "
                  f"trials (N = {targets['budget']}): median {targets['default_median']:.3f}, "
                  f"{_verdict(targets['reaches_90'], targets['margin_90'])}",
              f"target: {default} beats random at equal budget (N = {targets['budget']}): "
              f"{_verdict(targets['beats_random'], targets['margin_vs_random'][targets['budget']])}; median difference "
              + ", ".join(f"N = {n}: {margin:+.3f}" for n, margin in targets["margin_vs_random"].items())]
    early, summary = result["early_stopping"], result["early_summary"]
    plain_epochs = early[0]["none"]["student_epochs"]
    lines += ["", f"(2b) early stopping: every grid point once, seeded order, {result['concurrency']} at a time, "
                  f"MO-ASHA {result['moasha']} vs none ({plain_epochs} student epochs, hypervolume "
                  f"{early[0]['none']['hypervolume']:.4f})", "",
              "| seed | complete trials | student epochs | epochs / none | hypervolume | hypervolume / none |",
              "|---|---|---|---|---|---|"]
    for run in early:
        moasha = run["moasha"]
        lines.append(f"| {run['seed']} | {len(moasha['complete'])} / {len(run['order'])} | {moasha['student_epochs']} | "
                     f"{run['epoch_ratio']:.3f} | {moasha['hypervolume']:.4f} | {run['hypervolume_ratio']:.3f} |")
    lines += [f"| median [IQR] | | | {_spread(summary['epoch_ratio'])} | | {_spread(summary['hypervolume_ratio'])} |", "",
              f"target: ≥ {TARGET_EARLY_HYPERVOLUME:.0%} of the hypervolume: "
              f"{_verdict(summary['keeps_95'], summary['margin_95'])}; at ≤ {TARGET_EARLY_EPOCHS:.0%} of the epochs: "
              f"{_verdict(summary['at_most_60'], summary['margin_60'])}",
              f"the other rule ({result['other_rule']}), same orders: {_spread(summary['other_epoch_ratio'])} of the "
              f"epochs, {_spread(summary['other_hypervolume_ratio'])} of the hypervolume (median [IQR])"]
    return "\n".join(lines)


def plot_curves(curves: dict[str, list[list[float]]], default: str, grid_size: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, per_seed in curves.items():
        values = np.array(per_seed)
        trials = np.arange(1, values.shape[1] + 1)
        low, median, high = np.percentile(values, [25, 50, 75], axis=0)
        line, = axis.plot(trials, median, label=f"{name} (pxd default)" if name == default else name,
                          linewidth=2.5 if name == default else 1.5)
        axis.fill_between(trials, low, high, color=line.get_color(), alpha=0.15)
    axis.axhline(TARGET_FRACTION_OF_GRID, color="grey", linestyle="--", linewidth=1)
    axis.axvline(grid_size * TARGET_BUDGET_FRACTION, color="grey", linestyle=":", linewidth=1)
    axis.set(xlabel="trials", ylabel="fraction of the grid's hypervolume",
             title=f"Search quality on a {grid_size}-point grid (median, IQR over {len(next(iter(curves.values())))} seeds)")
    axis.set_ylim(0, 1.02)
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------
# command line: progress on stderr, the report on stdout (what bench/suite.py collects)


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(table: SearchTable, spec: SweepSpec, samplers: Sequence[str], seeds: Sequence[int], trials: int,
        concurrency: int) -> tuple[dict[str, Any], dict[str, list[list[float]]]]:
    grid_size = len(table.points)
    curves, distinct = {}, {}
    for name in samplers:
        started = time.perf_counter()
        asked = [sampler_trials(table, spec, name, seed, trials) for seed in seeds]
        grid = grid_hypervolume(table, spec)
        curves[name] = [[value / grid for value in hypervolume_curve(points, spec)] for points in asked]
        distinct[name] = float(np.median([len({point_key(p.params) for p in points}) for points in asked]))
        _progress(f"  {name}: {len(seeds)} seeds × {trials} trials in {time.perf_counter() - started:.1f}s")
    at = [n for n in budgets(grid_size) if n <= trials]
    quality = summarise_curves(curves, at)
    default = spec.require_search().sampler.name
    early = early_stopping_runs(table, spec, seeds, concurrency)
    grid_front = IncrementalFrontier(spec.require_search().objective_pairs, spec.require_search().reference_point)
    for point in table.points:
        grid_front.add(point.metrics)
    settings = spec.require_search().early_stopping
    result = {"grid_size": grid_size, "grid_hypervolume": grid_hypervolume(table, spec), "grid_frontier": grid_front.size,
              "default_sampler": default, "seeds": list(seeds), "trials": trials, "concurrency": concurrency,
              "quality": quality, "distinct": distinct,
              "quality_targets": quality_targets(quality, default, grid_size),
              "moasha": f"grace {settings.grace_period}, η {settings.reduction_factor}, {table.student_epochs} student epochs, "
                        + _rule(settings.keep_front),
              "other_rule": _rule(not settings.keep_front),
              "early_stopping": early, "early_summary": summarise_early(early), "curves": curves}
    return result, curves


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", type=Path, default=DEFAULT_SPACE, help="a space whose parameters are all choices")
    parser.add_argument("--table", type=Path, default=None, help="JSON table: reused if present, else built and saved")
    parser.add_argument("--samplers", nargs="+", default=list(COMPARED_SAMPLERS), choices=COMPARED_SAMPLERS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--trials", type=int, default=None, help="trials per study (default: the largest budget, 1/2 of the grid)")
    parser.add_argument("--concurrency", type=int, default=None, help="2b (default: the space's search.max_concurrent)")
    parser.add_argument("--reduction-factor", type=int, default=None,
                        help="2b: MO-ASHA's η (default: the space's search.early_stopping.reduction_factor)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the hypervolume curves")
    parser.add_argument("--out", type=Path, default=None, help="write every number, settings and hardware as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from bench.distillation import _environment

    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    environment = _environment()
    spec = load_spec(args.space)
    if args.reduction_factor is not None:
        spec = load_spec(args.space, [f"search.early_stopping.reduction_factor={args.reduction_factor}"])
    for needed in (spec.require_search().sampler.name, "random"):  # the targets compare these two
        if needed not in args.samplers:
            args.samplers.append(needed)
    print(f"pxd search-quality benchmark · {environment['cpu']} · torch {environment['torch']} · "
          f"{environment['torch_threads']} threads · optuna {optuna.__version__}", flush=True)
    table = load_or_build_table(spec, args.table, environment, log=_progress)
    check_complete(table, spec)
    started = time.perf_counter()
    result, curves = run(table, spec, args.samplers, args.seeds, args.trials or max(budgets(len(table.points))),
                         args.concurrency or spec.require_search().max_concurrent)
    report = format_report(result)
    print(f"\n{report}\n\nreplays {time.perf_counter() - started:.0f}s; table built in {table.build_seconds:.0f}s")
    if args.plot is not None:
        plot_curves(curves, result["default_sampler"], len(table.points), args.plot)
        print(f"wrote {args.plot}")
    if args.out is not None:
        settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
        payload = {"environment": environment, "settings": settings, "space": table.space,
                   "search": {"sampler": vars(spec.require_search().sampler),
                              "objectives": spec.require_search().objective_pairs,
                              "reference_point": spec.require_search().reference_point,
                              "ideal_point": spec.require_search().ideal_point},
                   "table": table.to_json(), "result": result, "report": report}
        args.out.write_text(json.dumps(payload, indent=1, default=str))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
