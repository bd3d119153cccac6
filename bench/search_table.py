"""The tabular benchmark behind bench/search_quality.py: every point of a small search space whose
parameters are all choices, trained once through pxd's real pipeline, with the student's per-epoch
`val_top1` and its final metrics. Samplers and early stopping are then replayed against the table
at no training cost, as NAS-Bench-101/201 do, so every sampler sees exactly the same trial outcomes.

The teacher and each architecture's assistant are shared through one in-memory stage cache
(bench/distillation.py's `MemoryStageCache`), as a sweep shares them through its stage store. Every
point is trained with the space's seed: the table is one realisation of the training noise.
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.space.distributions import is_active
from orchestrator.space.spec import SweepSpec, materialize
from pxd.errors import ConfigError

__all__ = ["TablePoint", "SearchTable", "grid_points", "point_key", "build_table", "load_or_build_table"]

# what a table records of each trained point (pxd's registered metric names)
RECORDED_METRICS = ("val_top1", "gmacs", "params_m", "pixels")


@dataclass
class TablePoint:
    """One grid point: its parameters, final metrics (`val_top1` of the best epoch, as pxd reports it)
    and the student's `val_top1` after each epoch (what a trial reports to the early-stopping scheduler)."""

    params: dict[str, Any]
    metrics: dict[str, float]
    student_val_top1: list[float]
    student_seconds: float = 0.0


@dataclass
class SearchTable:
    points: list[TablePoint]
    space: dict[str, Any]  # the space file without its search section: what determines training
    build_seconds: float = 0.0
    environment: dict[str, Any] = field(default_factory=dict)

    def lookup(self) -> dict[str, TablePoint]:
        return {point_key(point.params): point for point in self.points}

    @property
    def student_epochs(self) -> int:
        return len(self.points[0].student_val_top1)

    def to_json(self) -> dict[str, Any]:
        return {"space": self.space, "build_seconds": self.build_seconds, "environment": self.environment,
                "points": [vars(point) for point in self.points]}

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> SearchTable:
        return cls(points=[TablePoint(**point) for point in payload["points"]], space=payload["space"],
                   build_seconds=payload.get("build_seconds", 0.0), environment=payload.get("environment", {}))


def point_key(params: dict[str, Any]) -> str:
    """One string per grid point (sampled values, dotted names)."""
    return json.dumps(params, sort_keys=True)


def grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every distinct point of a space whose parameters are all choices (inactive conditional
    parameters dropped, as a sampler would not suggest them)."""
    for param in spec.params:
        if param.distribution.kind != "choice":
            raise ConfigError(param.name, f"a tabular benchmark needs every parameter to be a choice, this is "
                                          f"{param.distribution.kind}; make it {{choice: [...]}}")
    points, seen = [], set()
    for combo in itertools.product(*(param.distribution.values for param in spec.params)):
        values: dict[str, Any] = {}
        for param, value in zip(spec.params, combo):
            if is_active(param, values):
                values[param.name] = value
        if point_key(values) not in seen:
            seen.add(point_key(values))
            points.append(values)
    return points


def training_space(spec: SweepSpec) -> dict[str, Any]:
    """The part of a space file that determines what the table holds (everything but `search:`)."""
    raw = copy.deepcopy(spec.raw)
    raw.pop("search", None)
    return json.loads(json.dumps(raw, default=str))


def build_table(spec: SweepSpec, log: Callable[[str], None] = print, *, done: Sequence[TablePoint] = (),
                save: Callable[[SearchTable], None] | None = None) -> SearchTable:
    """Train every grid point through `pxd.pipeline.run_tas`, teacher and assistants shared. Points in
    `done` (a partial table) are kept; `save` gets the table after each new point, so a build that is
    interrupted resumes where it stopped (the shared stages are then trained again, with the same seed)."""
    from bench.distillation import MemoryStageCache
    from pxd.data import load_dataset
    from pxd.pipeline import run_tas

    started = time.perf_counter()
    cache = MemoryStageCache()
    grid = grid_points(spec)
    data = load_dataset(spec.base.dataset, spec.base.seed)
    points = list(done)
    table = SearchTable(points=points, space=training_space(spec))
    finished = table.lookup()
    for index, params in enumerate(grid, 1):
        if point_key(params) in finished:
            continue
        config = materialize(spec, params)
        per_epoch: list[float] = []

        def on_epoch(kind: str, epoch: int, record: dict[str, float], per_epoch: list[float] = per_epoch) -> None:
            if kind == "student":
                per_epoch.append(float(record["val_top1"]))
            else:  # shared stages train once, with the first point that needs them
                log(f"  [{time.perf_counter() - started:5.0f}s] {kind} epoch {epoch}  val_top1 {record['val_top1']:.3f}"
                    f"  ({record['epoch_seconds']:.1f}s)")

        result = run_tas(config, provider=cache, on_epoch=on_epoch, progress=False, data=data, measure_latency=False)
        student = result.stages["student"].result
        points.append(TablePoint(params=params, metrics={name: float(result.metrics[name]) for name in RECORDED_METRICS},
                                 student_val_top1=per_epoch, student_seconds=float(student.metrics["train_seconds"])))
        log(f"  [{time.perf_counter() - started:5.0f}s] {index:>3}/{len(grid)} {point_key(params)}  "
            f"val_top1 {result.metrics['val_top1']:.3f}  gmacs {result.metrics['gmacs']:.5f}  "
            f"student {student.metrics['train_seconds']:.1f}s")
        table.build_seconds = time.perf_counter() - started
        if save is not None:
            save(table)
    return table


def load_or_build_table(spec: SweepSpec, path: Path | None, environment: dict[str, Any],
                        log: Callable[[str], None] = print) -> SearchTable:
    """The table at `path` when it was built for this space, else a new one (saved to `path`)."""
    done: list[TablePoint] = []
    spent = 0.0
    if path is not None and path.exists():
        table = SearchTable.from_json(json.loads(path.read_text()))
        if table.space != training_space(spec):
            raise ConfigError("--table", f"{path} was built for a different space (its training settings differ); "
                                         "delete it or give another --table path to build a new one")
        if len(table.points) == len(grid_points(spec)):
            log(f"table: {len(table.points)} points from {path} (built in {table.build_seconds:.0f}s)")
            return table
        done, spent = table.points, table.build_seconds
        log(f"table: {len(done)} points from {path}, resuming the build")
    log(f"table: training {len(grid_points(spec)) - len(done)} grid points of {spec.source_path} ...")

    def save(partial: SearchTable) -> None:
        if path is not None:
            partial.environment = environment
            path.write_text(json.dumps({**partial.to_json(), "build_seconds": spent + partial.build_seconds}, indent=1))

    table = build_table(spec, log, done=done, save=save)
    table.environment, table.build_seconds = environment, spent + table.build_seconds
    log(f"table: {len(table.points)} points" + (f", saved to {path}" if path is not None else ""))
    return table


def check_complete(table: SearchTable, spec: SweepSpec) -> None:
    """Every grid point has a row and every row the same number of student epochs."""
    missing = [key for key in map(point_key, grid_points(spec)) if key not in table.lookup()]
    if missing:
        raise ConfigError("--table", f"{len(missing)} grid points have no row, e.g. {missing[0]}; rebuild the table")
    epochs = {len(point.student_val_top1) for point in table.points}
    if len(epochs) != 1:
        raise ConfigError("--table", f"rows have different student epoch counts {sorted(epochs)}; rebuild the table")


def objective_values(point: TablePoint, objectives: Sequence[tuple[str, str]]) -> list[float]:
    return [point.metrics[name] for name, _ in objectives]
