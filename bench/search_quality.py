"""Search quality and early stopping, replayed on a tabular benchmark.

Every point of a space whose parameters are all choices is trained with `--seeds` training seeds through
pxd's pipeline (bench/search_table.py; the table is written after each point and a build resumes). Then:

  samplers   each sampler (pxd's TPE as the space configures it, NSGA-II, GP, random, and grid as the
             reference; `tpe:n_startup_trials=4` names a variant) runs an Optuna study with pxd's
             objectives, directions, `sampler_for` and `suggest_all` whose trials look their values up in
             the table, `--replays` times (seeds 0 … n−1). After each trial: the normalised hypervolume of
             the trials so far as a fraction of the whole grid's, and the share of the grid's frontier
             points among them. Median and IQR at 1/8, 1/4, 1/3 and 1/2 of the grid; each sampler against
             random, paired by replay seed (Wilcoxon signed-rank, two-sided).
  early      every grid point, in a seeded order `--concurrency` at a time, replayed through pxd's `MOASHA`
             on the stored per-epoch curves, with both of its rules (keep_front and classic) against no
             early stopping: student epochs spent, hypervolume and frontier share kept, same seeds.

A point's value is the mean over its training seeds; with `--noise` each trial is told one training
seed's value instead (drawn per trial), while what a search found is always scored on the means. The
accuracy axis of the hypervolume starts at `--accuracy-reference`: `ce_floor` (the lowest mean val_top1 of
a CE control over the space's students; the default when the table has controls), `chance`
(1 / classes), `space` (the space's search.reference_point) or a number; the cost axes keep the space's.

    PYTHONPATH=. python bench/search_quality.py --space bench/search_quality_flowers128.yaml --seeds 0 1 2 \\
        --table search_quality_table_flowers128.json --plot curves.png --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from math import lgamma
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import optuna
import timm
import torch
import yaml

from bench.search_table import (
    SearchTable,
    TablePoint,
    check_complete,
    load_or_build_table,
    objective_values,
    point_key,
)
from orchestrator.driver.early_stopping import MOASHA
from orchestrator.results.frontier import IncrementalFrontier
from orchestrator.results.pareto import non_dominated_mask, normalise
from orchestrator.results.schema import epoch_metric
from orchestrator.space.distributions import suggest_all
from orchestrator.space.samplers import SamplerConfig, check_sampler, sampler_for
from orchestrator.space.search import optuna_directions
from orchestrator.space.spec import SweepSpec, load_spec
from pxd.errors import ConfigError

try:  # the paired test; without scipy an exact sign test is used, and the output names which
    from scipy import stats
except ImportError:  # pragma: no cover - scipy comes with optuna's GP sampler
    stats = None
PAIRED_TEST = "Wilcoxon signed-rank, two-sided" if stats is not None else "exact sign test, two-sided (no scipy)"

__all__ = ["BUDGET_FRACTIONS", "Scoring", "accuracy_reference", "early_stopping_runs", "main", "paired_test",
           "replay_early_stopping", "replay_sampler", "sampler_replays", "scoring_for", "spread", "summarise"]

DEFAULT_SPACE = Path(__file__).with_name("search_quality.yaml")
COMPARED_SAMPLERS = ("tpe", "nsga2", "gp", "random", "grid")
BASELINE = "random"
BUDGET_FRACTIONS = (1 / 8, 1 / 4, 1 / 3, 1 / 2)  # of the grid size
ACCURACY_REFERENCES = ("ce_floor", "chance", "space")
SIGNIFICANCE = 0.05  # a sampler "beats random" at a budget when its paired p is below this and its median difference > 0
TIE = 1e-12  # paired differences this small are ties (the same points found)


# ---------------------------------------------------------------------------------------------
# scoring: hypervolume as a fraction of the grid's, and the share of the grid's frontier recovered


@dataclass(frozen=True)
class Scoring:
    """How a set of trials is scored, always on the points' mean values."""

    objectives: tuple[tuple[str, str], ...]
    reference: dict[str, float]
    ideal: dict[str, float]
    frontier: frozenset[str]  # point keys of the grid's frontier (mean values)
    grid_hypervolume: float  # normalised
    accuracy: dict[str, Any]  # the accuracy reference: rule, value, what it means

    def _front(self) -> IncrementalFrontier:
        return IncrementalFrontier(self.objectives, self.reference, self.ideal)

    def hypervolume_curve(self, points: Sequence[TablePoint]) -> list[float]:
        """The fraction of the grid's normalised hypervolume after each point."""
        front, curve = self._front(), []
        for point in points:
            front.add(point.metrics())
            curve.append(float(front.normalised) / self.grid_hypervolume)
        return curve

    def recovered_curve(self, points: Sequence[TablePoint]) -> list[float]:
        """The share of the grid's frontier points among the points so far, after each point."""
        found, curve = set(), []
        for point in points:
            if point_key(point.params) in self.frontier:
                found.add(point_key(point.params))
            curve.append(len(found) / len(self.frontier))
        return curve


def accuracy_reference(table: SearchTable, spec: SweepSpec, rule: str) -> dict[str, Any]:
    """The accuracy axis' reference: `ce_floor`, `chance`, `space` or a number, with what it means."""
    if rule == "ce_floor":
        if not table.has_controls:
            raise ConfigError("--accuracy-reference", "ce_floor needs CE controls in the table; build it from a "
                                                      "space with search.ce_control: true, or use chance")
        value = min(float(np.mean(point.ce_val_top1)) for point in table.points)
        meaning = "the space's CE floor: the lowest mean val_top1 of a CE control (labels only) over its students"
    elif rule == "chance":
        value, meaning = 1.0 / table.num_classes, f"chance: 1 / {table.num_classes} classes"
    elif rule == "space":
        value, meaning = spec.require_search().reference_point["val_top1"], "the space's search.reference_point"
    else:
        try:
            value, meaning = float(rule), "set on the command line"
        except ValueError:
            raise ConfigError("--accuracy-reference", f"got {rule!r}; use {', '.join(ACCURACY_REFERENCES)} "
                                                      "or a val_top1 value such as 0.25") from None
    return {"rule": rule, "val_top1": float(value), "meaning": meaning}


def scoring_for(table: SearchTable, spec: SweepSpec, rule: str) -> Scoring:
    search = spec.require_search()
    objectives = tuple((name, str(mode)) for name, mode in search.objective_pairs)
    accuracy = accuracy_reference(table, spec, rule)
    reference = {**search.reference_point, "val_top1": accuracy["val_top1"]}
    values = normalise([objective_values(point, objectives) for point in table.points], [m for _, m in objectives])
    mask = non_dominated_mask(values)
    frontier = frozenset(point_key(point.params) for point, on in zip(table.points, mask) if on)
    front = IncrementalFrontier(objectives, reference, search.ideal_point)
    for point in table.points:
        front.add(point.metrics())
    if not front.hypervolume > 0:
        raise ConfigError("--accuracy-reference", f"no point of the table beats the reference {reference} on every "
                                                  "objective, so every hypervolume is 0; lower the accuracy reference")
    return Scoring(objectives, reference, dict(search.ideal_point), frontier, float(front.normalised), accuracy)


# ---------------------------------------------------------------------------------------------
# sampler replays


def parse_sampler(text: str, spec: SweepSpec) -> SamplerConfig:
    """`name` or `name:option=value,...`. The space's own sampler, named alone, keeps the space's options."""
    name, _, options_text = text.partition(":")
    search = spec.require_search()
    options: dict[str, Any] = dict(search.sampler.options) if name == search.sampler.name and not options_text else {}
    for item in filter(None, options_text.split(",")):
        key, equals, value = item.partition("=")
        if not equals:
            raise ConfigError("--samplers", f"{text!r}: write options as name:key=value,key=value")
        options[key.strip()] = yaml.safe_load(value)
    return check_sampler(SamplerConfig(name=name, seed=0, options=options), 0, spec.params)


def replay_sampler(table: SearchTable, spec: SweepSpec, sampler: SamplerConfig, seed: int, trials: int,
                   noise: bool = False) -> list[TablePoint]:
    """The table rows an Optuna study with pxd's sampler, objectives and directions asks for, in order. A
    repeated point counts as a trial (a sweep would run it again). Each trial is told the point's mean over
    training seeds, or with `noise` one seed's value, drawn per trial."""
    search = spec.require_search()
    study = optuna.create_study(directions=optuna_directions(search.objective_modes),
                                sampler=sampler_for(replace(sampler, seed=seed), spec.params))
    rows, draws = table.lookup(), np.random.default_rng([seed, 1])
    asked = []

    def objective(trial: optuna.Trial) -> list[float]:
        point = rows[point_key(suggest_all(spec.params, trial))]
        seed_index = int(draws.integers(len(point.seeds))) if noise else None
        asked.append(point)
        return objective_values(point, search.objective_pairs, seed_index)

    # optimize, not ask/tell: the grid sampler stops the study once its grid is done, which only works here
    study.optimize(objective, n_trials=trials)
    return asked


def sampler_replays(table: SearchTable, spec: SweepSpec, scoring: Scoring, sampler: SamplerConfig,
                    replays: Sequence[int], trials: int, noise: bool) -> list[dict[str, Any]]:
    """One record per replay seed: the points asked and, after each trial, the fraction of the grid's
    hypervolume and the share of its frontier recovered."""
    records = []
    for seed in replays:
        asked = replay_sampler(table, spec, sampler, seed, trials, noise)
        records.append({"seed": seed, "points": [point_key(point.params) for point in asked],
                        "hypervolume": scoring.hypervolume_curve(asked), "recovered": scoring.recovered_curve(asked),
                        "distinct": len({point_key(point.params) for point in asked})})
    return records


def budgets(grid_size: int) -> list[int]:
    return sorted({max(1, round(grid_size * fraction)) for fraction in BUDGET_FRACTIONS})


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median and interquartile range (25th, 75th percentile)."""
    low, median, high = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return {"median": float(median), "q25": float(low), "q75": float(high)}


def paired_test(values: Sequence[float], baseline: Sequence[float]) -> dict[str, Any]:
    """Two-sided paired test of `values` against `baseline` (same replay seeds): Wilcoxon signed-rank
    (zero differences dropped), or an exact sign test without scipy. All differences zero: p = 1."""
    differences = np.asarray(values, dtype=float) - np.asarray(baseline, dtype=float)
    differences[np.abs(differences) <= TIE] = 0.0
    wins, losses = int((differences > 0).sum()), int((differences < 0).sum())
    result = {"n": len(differences), "wins": wins, "losses": losses, "ties": len(differences) - wins - losses,
              "median_difference": float(np.median(differences)) if len(differences) else 0.0}
    if wins + losses == 0:
        return {**result, "test": "none: every difference is zero", "p_value": 1.0}
    if stats is not None:
        test = stats.wilcoxon(differences, zero_method="wilcox", alternative="two-sided")
        return {**result, "test": "wilcoxon signed-rank (scipy)", "p_value": float(test.pvalue)}
    return {**result, "test": "exact sign test", "p_value": sign_test(wins, losses)}


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value of `wins` out of `wins + losses` at 1/2."""
    n, extreme = wins + losses, min(wins, losses)
    tail = sum(np.exp(_log_choose(n, k) - n * np.log(2.0)) for k in range(extreme + 1))
    return float(min(1.0, 2.0 * tail))


def _log_choose(n: int, k: int) -> float:
    return lgamma(n + 1) - lgamma(k + 1) - lgamma(n - k + 1)


def summarise(runs: dict[str, list[dict[str, Any]]], at: Sequence[int], baseline: str = BASELINE) -> dict[str, Any]:
    """Per sampler and budget N: the spread of the hypervolume fraction, the frontier share and the distinct
    points, and each paired test against `baseline` (same replay seeds); per budget, the best median."""
    summary: dict[str, Any] = {"samplers": {}, "verdicts": {}}
    for name, records in runs.items():
        cells = {}
        for n in at:
            cell = {metric: spread([record[metric][n - 1] for record in records]) for metric in ("hypervolume", "recovered")}
            if baseline in runs and name != baseline:
                for metric in ("hypervolume", "recovered"):
                    cell[f"{metric}_vs_{baseline}"] = paired_test([r[metric][n - 1] for r in records],
                                                                  [r[metric][n - 1] for r in runs[baseline]])
            cells[n] = cell
        summary["samplers"][name] = cells
    for n in at:
        contenders = [name for name in runs if name not in (baseline, "grid")]
        if baseline not in runs or not contenders:
            continue
        best = max(contenders, key=lambda name: summary["samplers"][name][n]["hypervolume"]["median"])
        test = summary["samplers"][best][n][f"hypervolume_vs_{baseline}"]
        summary["verdicts"][n] = {"best": best, "median_difference": test["median_difference"],
                                  "p_value": test["p_value"],
                                  "beats_random": test["p_value"] < SIGNIFICANCE and test["median_difference"] > 0}
    return summary


# ---------------------------------------------------------------------------------------------
# early stopping replayed through pxd's scheduler


def replay_early_stopping(points: Sequence[TablePoint], spec: SweepSpec, scoring: Scoring, concurrency: int,
                          stopping: bool, keep_front: bool = True, seed_indices: Sequence[int | None] | None = None,
                          ) -> dict[str, Any]:
    """Run `points` as trials, `concurrency` at a time in the given order, every student epoch one time unit
    (ties: the trial started first reports first). Each epoch's `val_top1` (the mean curve, or seed
    `seed_indices[i]`'s) goes through `MOASHA.on_trial_result` as a trial reports it; a STOP ends the trial.
    The trials that complete are scored on their mean values."""
    early = replace(spec.require_search().early_stopping, keep_front=keep_front)
    curves = [point.curve(None if seed_indices is None else seed_indices[i]) for i, point in enumerate(points)]
    epochs = len(curves[0])
    with tempfile.TemporaryDirectory(prefix="pxd-bench-moasha-") as state_dir:
        scheduler = MOASHA.from_config(spec.require_search().objective_pairs, early, max_t=epochs,
                                       state_path=Path(state_dir) / "early_stopping.json")
        queue, running = list(range(len(points))), {}  # trial index → epochs trained
        trained, complete, stopped_at = 0, [], {}
        while queue or running:
            while queue and len(running) < concurrency:
                running[queue.pop(0)] = 0
            for index in sorted(running):  # one time unit: every running trial trains one epoch
                running[index] += 1
                trained += 1
                epoch = running[index]
                result = {"stage": "student", "epoch": epoch, epoch_metric("student"): curves[index][epoch - 1],
                          **points[index].costs}
                decision = scheduler.on_trial_result(None, SimpleNamespace(trial_id=str(index)), result) if stopping else "CONTINUE"
                if decision == "STOP":
                    stopped_at[index] = epoch
                    del running[index]
                elif epoch == epochs:
                    complete.append(index)
                    del running[index]
    kept = [points[i] for i in sorted(complete)]
    return {"complete": sorted(complete), "stopped_at": stopped_at, "student_epochs": trained,
            "hypervolume": scoring.hypervolume_curve(kept)[-1] if kept else 0.0,
            "recovered": scoring.recovered_curve(kept)[-1] if kept else 0.0}


EARLY_RULES = {"keep_front": True, "classic": False}  # MO-ASHA's two rules (orchestrator/driver/early_stopping.py)


def early_stopping_runs(table: SearchTable, spec: SweepSpec, scoring: Scoring, replays: Sequence[int],
                        concurrency: int, noise: bool) -> list[dict[str, Any]]:
    """Per replay seed: a seeded order of every grid point (with `noise`, a seeded draw of one training
    seed per point), replayed with no early stopping and with each MO-ASHA rule."""
    runs = []
    for seed in replays:
        order = np.random.default_rng(seed).permutation(len(table.points))
        points = [table.points[i] for i in order]
        draws = np.random.default_rng([seed, 2])
        seed_indices = [int(draws.integers(len(p.seeds))) for p in points] if noise else None
        none = replay_early_stopping(points, spec, scoring, concurrency, stopping=False, seed_indices=seed_indices)
        run = {"seed": seed, "order": [point_key(p.params) for p in points], "none": none}
        for rule, keep_front in EARLY_RULES.items():
            replayed = replay_early_stopping(points, spec, scoring, concurrency, True, keep_front, seed_indices)
            replayed["epoch_ratio"] = replayed["student_epochs"] / none["student_epochs"]
            replayed["hypervolume_kept"] = replayed["hypervolume"] / none["hypervolume"]
            run[rule] = replayed
        runs.append(run)
    return runs


def summarise_early(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    return {rule: {metric: spread([run[rule][metric] for run in runs])
                   for metric in ("epoch_ratio", "hypervolume_kept", "recovered")} for rule in EARLY_RULES}


# ---------------------------------------------------------------------------------------------
# report


def _cell(cell: dict[str, float]) -> str:
    return f"{cell['median']:.3f} [{cell['q25']:.3f}, {cell['q75']:.3f}]"


def _p(test: dict[str, Any] | None) -> str:
    return "" if test is None else f" p={test['p_value']:.2g}"


def format_report(result: dict[str, Any]) -> str:
    grid, at, summary = result["grid_size"], result["budgets"], result["summary"]
    accuracy = result["accuracy_reference"]
    lines = [(f"grid: {grid} points, {result['frontier_size']} on the frontier (mean over training seeds "
             f"{result['training_seeds']}); normalised hypervolume {result['grid_hypervolume']:.4f}"),
             (f"accuracy reference: val_top1 {accuracy['val_top1']:.4f} ({accuracy['meaning']}); "
             f"cost axes: the space's reference {result['reference_point']}"),
             f"values told to the samplers: {result['values']}; {len(result['replays'])} replays per sampler"]
    for metric, title in (("hypervolume", "fraction of the grid's hypervolume"), ("recovered", ("share of the grid's "
                                                                                  "frontier points recovered"))):
        lines += ["", (f"{title}, median [IQR] after N trials; p: paired test against {BASELINE} "
                      f"({result['test']})"), "",
                  "| sampler | " + " | ".join(f"N = {n} of {grid}" for n in at) + " |", "|---|" + "---|" * len(at)]
        for name, cells in summary["samplers"].items():
            lines.append(f"| {name} | " + " | ".join(_cell(cells[n][metric]) + _p(cells[n].get(f"{metric}_vs_{BASELINE}"))
                                                     for n in at) + " |")
    for n, verdict in summary["verdicts"].items():
        lines.append(f"N = {n}: highest median {verdict['best']}; its paired difference to {BASELINE}: median "
                     f"{verdict['median_difference']:+.3f}, p={verdict['p_value']:.2g}: "
                     + ("beats random" if verdict["beats_random"] else "not beyond random's spread"))
    early = result["early_summary"]
    lines += ["", (f"early stopping: every grid point once, {result['concurrency']} at a time, MO-ASHA "
                  f"{result['moasha']}; median [IQR] over the same {len(result['replays'])} seeds"), "",
              "| rule | student epochs / none | hypervolume kept | frontier share |", "|---|---|---|---|"]
    for rule, cells in early.items():
        lines.append(f"| {rule} | {_cell(cells['epoch_ratio'])} | {_cell(cells['hypervolume_kept'])} | "
                     f"{_cell(cells['recovered'])} |")
    return "\n".join(lines)


def plot_curves(runs: dict[str, list[dict[str, Any]]], result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, metric, label in zip(axes, ("hypervolume", "recovered"),
                                   ("fraction of the grid's hypervolume", "share of the grid's frontier recovered")):
        for name, records in runs.items():
            values = np.array([record[metric] for record in records])
            trials = np.arange(1, values.shape[1] + 1)
            low, median, high = np.percentile(values, [25, 50, 75], axis=0)
            line, = axis.plot(trials, median, label=name, linewidth=2.5 if name == result["default_sampler"] else 1.5)
            axis.fill_between(trials, low, high, color=line.get_color(), alpha=0.15)
        for n in result["budgets"]:
            axis.axvline(n, color="grey", linestyle=":", linewidth=1)
        axis.set(xlabel="trials", ylabel=label, ylim=(0, 1.02))
    axes[0].legend(loc="lower right")
    figure.suptitle(f"{result['space_name']}: {result['grid_size']}-point grid, median and IQR over "
                    f"{len(result['replays'])} replays; accuracy reference {result['accuracy_reference']['rule']} "
                    f"({result['accuracy_reference']['val_top1']:.3f})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------
# command line: progress on stderr, the report on stdout (what bench/suite.py collects)


def machine() -> dict[str, Any]:
    """Where the table was built."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform(), "load_average": list(os.getloadavg())}


def versions() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "optuna": optuna.__version__, "pxd_commit": commit}


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def replay_all(table: SearchTable, spec: SweepSpec, samplers: dict[str, SamplerConfig], args: argparse.Namespace,
               log: Callable[[str], None] = _progress) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Every replay the command line asks for; (the result, each sampler's per-seed records)."""
    scoring = scoring_for(table, spec, args.accuracy_reference)
    grid_size, replays = len(table.points), list(range(args.replays))
    trials = args.trials or max(budgets(grid_size))
    if not 1 <= trials <= grid_size:
        raise ConfigError("--trials", f"give 1 to {grid_size} (the grid's size), got {trials}")
    if not replays:
        raise ConfigError("--replays", f"give at least 1 (the issue asks for 20), got {args.replays}")
    runs = {}
    for label, sampler in samplers.items():
        started = time.perf_counter()
        runs[label] = sampler_replays(table, spec, scoring, sampler, replays, trials, args.noise)
        log(f"  {label}: {len(replays)} replays × {trials} trials in {time.perf_counter() - started:.1f}s")
    at = [n for n in budgets(grid_size) if n <= trials]
    concurrency = args.concurrency or spec.require_search().max_concurrent
    early = early_stopping_runs(table, spec, scoring, replays, concurrency, args.noise)
    settings = spec.require_search().early_stopping
    result = {"space_name": spec.name, "grid_size": grid_size, "budgets": at, "trials": trials, "replays": replays,
              "training_seeds": table.seeds, "frontier_size": len(scoring.frontier),
              "frontier": sorted(scoring.frontier), "grid_hypervolume": scoring.grid_hypervolume,
              "accuracy_reference": scoring.accuracy, "reference_point": scoring.reference,
              "ideal_point": scoring.ideal, "default_sampler": spec.require_search().sampler.name,
              "samplers": {label: vars(sampler) for label, sampler in samplers.items()},
              "values": ("one training seed's value, drawn per trial (scored on the means)" if args.noise
                         else "the mean over training seeds"),
              "test": PAIRED_TEST, "summary": summarise(runs, at), "concurrency": concurrency,
              "moasha": f"grace {settings.grace_period}, η {settings.reduction_factor}, {table.student_epochs} student "
                        "epochs; keep_front: a rung's Pareto front always goes on; classic: the best ⌈n/η⌉ only",
              "early_stopping": early, "early_summary": summarise_early(early), "runs": runs}
    return result, runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", type=Path, default=DEFAULT_SPACE, help="a space whose parameters are all choices")
    parser.add_argument("--dataset", default=None, help="an ImageFolder tree for the space's dataset.path, e.g. "
                                                        "../shared/datasets/flowers128")
    parser.add_argument("--teacher-checkpoint", type=Path, default=None,
                        help="a stored teacher (weights file) used as is instead of training one")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the space, as pxd sweep --set (e.g. train.epochs=4)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of every point")
    parser.add_argument("--table", type=Path, default=None, help="the table JSON: built, resumed or reused")
    parser.add_argument("--stage-dir", type=Path, default=Path("pxd-results/bench/search_quality_stages"),
                        help="where the teacher, assistants and CE controls are kept (by stage key) for a resume")
    parser.add_argument("--build-only", action="store_true", help="build (or resume) the table, no replays")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's; 1 is far faster on a machine other work loads)")
    parser.add_argument("--samplers", nargs="+", default=list(COMPARED_SAMPLERS),
                        help="names from pxd's SAMPLERS, or name:option=value,... (e.g. tpe:n_startup_trials=4)")
    parser.add_argument("--replays", type=int, default=20, help="replay seeds 0 … n−1 per sampler and for early stopping")
    parser.add_argument("--trials", type=int, default=None, help="trials per study (default: 1/2 of the grid)")
    parser.add_argument("--accuracy-reference", default=None,
                        help="ce_floor (default with CE controls in the table), chance (default otherwise), space, or a value")
    parser.add_argument("--noise", action="store_true", help="tell each trial one training seed's value, not the mean")
    parser.add_argument("--concurrency", type=int, default=None, help="early stopping (default: search.max_concurrent)")
    parser.add_argument("--reduction-factor", type=int, default=None, help="MO-ASHA's η (default: the space's)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the curves (median, IQR)")
    parser.add_argument("--out", type=Path, default=None, help="JSON of every number, raw replays and the table")
    return parser.parse_args(argv)


def load_space(args: argparse.Namespace) -> SweepSpec:
    overrides = list(args.overrides)
    if args.dataset is not None:
        overrides.append(f"dataset.path={args.dataset}")
    if args.teacher_checkpoint is not None:
        overrides += [f"teacher.checkpoint={args.teacher_checkpoint}", "teacher.epochs=0"]
    if args.reduction_factor is not None:
        overrides.append(f"search.early_stopping.reduction_factor={args.reduction_factor}")
    return load_spec(args.space, overrides)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    spec = load_space(args)
    samplers = {label: parse_sampler(label, spec) for label in dict.fromkeys([*args.samplers, BASELINE])}
    command = " ".join(["python", *sys.argv]) if argv is None else " ".join(["python bench/search_quality.py", *argv])
    where = machine()
    print(f"pxd search-quality benchmark · {spec.name} · {where['cpu']} · {where['torch_threads']} torch threads · "
          f"optuna {optuna.__version__}", flush=True)
    table = load_or_build_table(spec, args.table, args.seeds, command=command, machine=where, versions=versions(),
                                stage_dir=args.stage_dir, log=_progress)
    check_complete(table, spec)
    if args.build_only:
        return
    args.accuracy_reference = args.accuracy_reference or ("ce_floor" if table.has_controls else "chance")
    started = time.perf_counter()
    result, runs = replay_all(table, spec, samplers, args)
    report = format_report(result)
    print(f"\n{report}\n\nreplays {time.perf_counter() - started:.0f}s; table built in {table.wall_s:.0f}s", flush=True)
    if args.plot is not None:
        plot_curves(runs, result, args.plot)
        print(f"wrote {args.plot}")
    if args.out is not None:
        settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
        payload = {"command": command, "settings": settings, "machine": machine(), "table": table.to_json(),
                   "result": result, "report": report}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=1, default=str))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
