"""The tabular benchmark behind bench/search_quality.py: every point of a search space whose parameters
are all choices, trained through pxd's real pipeline (`run_tas`) with several training seeds. Samplers
and early stopping are then replayed against the table at no training cost, as NAS-Bench-101/201 do, so
every sampler sees exactly the same trial outcomes.

A point holds, per training seed, the student's `val_top1` (its best epoch's, as pxd reports it), its
`val_top1` after each epoch (what a trial reports to MO-ASHA) and, when the space sets
`search.ce_control`, its cross-entropy control's `val_top1`; and once its cost (`gmacs`, `params_m`,
`pixels`). The teacher and the assistants are trained once, with the first of the training seeds, and
shared by every point and seed (`StageCache`), as a sweep shares them: the seeds vary the student's
initial weights and batch order only. The data is loaded once, with the space's seed.

The table is written after each point; a build that stops resumes at the next point, its shared stages
read back from the stage folder (content-addressed by pxd's stage keys).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from orchestrator.space.distributions import is_active
from orchestrator.space.spec import SweepSpec, materialize
from pxd.config import PipelineConfig
from pxd.control import train_ce_control
from pxd.data import load_dataset
from pxd.errors import ConfigError
from pxd.memo import ProcessMemory
from pxd.pipeline import run_tas, stage_keys
from pxd.stages import StageOutcome
from pxd.train import StageResult

__all__ = ["COST_METRICS", "SearchTable", "StageCache", "TablePoint", "build_table", "check_complete", "grid_points",
           "load_or_build_table", "objective_values", "point_key", "read_table", "training_space"]

TABLE_FORMAT = 2  # 1: one seed per point (issue 12's table); 2: per-seed values, curves and controls
COST_METRICS = ("gmacs", "params_m", "pixels")  # pxd's metric names, known before training
SHARED_KINDS = ("teacher", "assistant")  # trained once, with the first seed, for every point and seed
STORED_KINDS = (*SHARED_KINDS, "control")  # kept in the stage folder, so that a resumed build reuses them
# what may differ between the build that started a table and the one that resumes it (speed, not values)
PLACEMENT_FIELDS = (("dataset", "path"), ("dataset", "cache_dir"), ("train", "device"))


@dataclass
class TablePoint:
    """One grid point: per training seed (`seeds[i]`) its `val_top1`, its per-epoch `val_top1` curve and its
    CE control's `val_top1`; its cost metrics once (they depend on the architecture and input only)."""

    params: dict[str, Any]
    seeds: list[int]
    val_top1: list[float]
    val_top1_curves: list[list[float]]
    costs: dict[str, float]
    ce_val_top1: list[float] = field(default_factory=list)  # empty without search.ce_control
    train_seconds: list[float] = field(default_factory=list)  # the student's, per seed

    @property
    def val_top1_mean(self) -> float:
        return statistics.fmean(self.val_top1)

    @property
    def val_top1_std(self) -> float:
        """Sample standard deviation over the training seeds (n − 1), 0 with one seed."""
        return statistics.stdev(self.val_top1) if len(self.val_top1) > 1 else 0.0

    def metrics(self, seed_index: int | None = None) -> dict[str, float]:
        """`val_top1` (the mean over seeds, or seed `seed_index`'s) and the cost metrics."""
        top1 = self.val_top1_mean if seed_index is None else self.val_top1[seed_index]
        return {"val_top1": top1, **self.costs}

    def curve(self, seed_index: int | None = None) -> list[float]:
        """`val_top1` after each student epoch: the mean over seeds, or seed `seed_index`'s."""
        if seed_index is not None:
            return list(self.val_top1_curves[seed_index])
        return [statistics.fmean(values) for values in zip(*self.val_top1_curves)]

    def to_json(self) -> dict[str, Any]:
        payload = {"params": self.params, "seeds": self.seeds, "val_top1_mean": self.val_top1_mean,
                   "val_top1_std": self.val_top1_std, "val_top1": self.val_top1, **self.costs,
                   "val_top1_curves": self.val_top1_curves, "train_seconds": self.train_seconds}
        if self.ce_val_top1:
            ce_mean = statistics.fmean(self.ce_val_top1)
            payload.update(ce_val_top1=self.ce_val_top1, ce_val_top1_mean=ce_mean,
                           gain_vs_ce_mean=self.val_top1_mean - ce_mean)
        return payload

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> TablePoint:
        return cls(params=payload["params"], seeds=payload["seeds"], val_top1=payload["val_top1"],
                   val_top1_curves=payload["val_top1_curves"], costs={name: payload[name] for name in COST_METRICS},
                   ce_val_top1=payload.get("ce_val_top1", []), train_seconds=payload.get("train_seconds", []))


@dataclass
class SearchTable:
    points: list[TablePoint]
    space: dict[str, Any]  # the space file without its search section: what determines training
    seeds: list[int] = field(default_factory=list)
    dataset: dict[str, Any] = field(default_factory=dict)  # path, classes, images per split, fingerprint
    shared: dict[str, Any] = field(default_factory=dict)  # the shared stages: seed, val_top1 of each
    command: str = ""
    machine: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0  # every build session's wall time, summed over resumes
    warnings: list[str] = field(default_factory=list)  # what the pipeline warned about (each message once)

    def lookup(self) -> dict[str, TablePoint]:
        return {point_key(point.params): point for point in self.points}

    @property
    def student_epochs(self) -> int:
        return len(self.points[0].val_top1_curves[0])

    @property
    def num_classes(self) -> int:
        return int(self.dataset["classes"])

    @property
    def has_controls(self) -> bool:
        return all(point.ce_val_top1 for point in self.points)

    def to_json(self) -> dict[str, Any]:
        return {"format": TABLE_FORMAT, "command": self.command, "dataset": self.dataset, "machine": self.machine,
                "versions": self.versions, "wall_s": self.wall_s, "seeds": self.seeds, "shared_stages": self.shared,
                "space": self.space, "warnings": self.warnings, "points": [point.to_json() for point in self.points]}

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> SearchTable:
        return cls(points=[TablePoint.from_json(point) for point in payload["points"]], space=payload["space"],
                   seeds=payload["seeds"], dataset=payload["dataset"], shared=payload.get("shared_stages", {}),
                   command=payload["command"], machine=payload["machine"], versions=payload["versions"],
                   wall_s=payload["wall_s"], warnings=payload.get("warnings", []))


def read_table(path: Path) -> SearchTable:
    """A table file; an issue-12 table (one seed, no curves per seed) is refused with what to do."""
    payload = json.loads(path.read_text())
    if payload.get("format") != TABLE_FORMAT:
        raise ConfigError("--table", f"{path} is not a format-{TABLE_FORMAT} table (per-seed values and curves); "
                                     "give a new --table path to build one")
    return SearchTable.from_json(payload)


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


def _without_placement(space: dict[str, Any]) -> dict[str, Any]:
    space = copy.deepcopy(space)
    for section, key in PLACEMENT_FIELDS:
        space.get(section, {}).pop(key, None)
    return space


class StageCache:
    """A `StageProvider` keeping the teacher, assistants and controls by stage key, as files in `root` (None:
    in memory only) so that a resumed build does not train them again; students are trained, never kept.

    `share(cfg, first)` makes `cfg`'s teacher and assistant the ones of `first` (the same point at the first
    seed): their keys differ only by the seed, and the table wants one teacher and one assistant per
    architecture for every seed. A shared stage is trained only under its own key (the first seed's run)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root
        self.results: dict[str, StageResult] = {}
        self.aliases: dict[str, str] = {}  # a later seed's shared stage key → the first seed's
        self.described: dict[str, dict[str, Any]] = {}  # stage key → what it is (kind, arch, resolution, seed)
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)

    def share(self, cfg: PipelineConfig, first: PipelineConfig, fingerprint: str) -> None:
        if cfg.seed == first.seed:
            return
        keys, first_keys = stage_keys(cfg, fingerprint), stage_keys(first, fingerprint)
        for kind in SHARED_KINDS:
            if kind in keys:
                self.aliases[keys[kind]] = first_keys[kind]

    def _file(self, kind: str, key: str) -> Path | None:
        return None if self.root is None or kind not in STORED_KINDS else self.root / f"{kind}-{key}.pt"

    def _read(self, kind: str, key: str) -> StageResult | None:
        path = self._file(kind, key)
        if path is None or not path.exists():
            return None
        saved = torch.load(path, map_location="cpu", weights_only=True)  # tensors, numbers and strings only
        return StageResult(kind=saved["kind"], state_dict=saved["state_dict"], metrics=saved["metrics"],
                           history=saved["history"], warnings=saved["warnings"])

    def _write(self, kind: str, key: str, result: StageResult) -> None:
        path = self._file(kind, key)
        if path is None:
            return
        partial = path.with_suffix(".partial")
        torch.save({"kind": result.kind, "state_dict": result.state_dict, "metrics": dict(result.metrics),
                    "history": [dict(record) for record in result.history], "warnings": list(result.warnings)}, partial)
        os.replace(partial, path)

    def _kept_in_memory(self, kind: str) -> bool:
        """The shared stages, and controls when there is no folder to read them back from; never students
        (48 points × 3 seeds of weights that no later run needs)."""
        return kind in SHARED_KINDS or (kind in STORED_KINDS and self.root is None)

    def get_or_train(self, kind: str, key: str, describe: dict[str, Any], train: Callable[[], StageResult]) -> StageOutcome:
        target = self.aliases.get(key, key)
        self.described.setdefault(target, describe)
        found = self.results.get(target) or self._read(kind, target)
        reused = found is not None
        if not reused:
            if target != key:
                raise RuntimeError(f"the shared {kind} stage {target[:12]} was not trained by the first seed's run; "
                                   "train each point's seeds in order, the first seed first")
            found = train()
            self._write(kind, target, found)
        if self._kept_in_memory(kind):
            self.results[target] = found
        return StageOutcome(result=found, key=key, reused=reused)


def _seed_config(spec: SweepSpec, params: dict[str, Any], seed: int) -> PipelineConfig:
    return dataclasses.replace(materialize(spec, params), seed=seed)


def _train_point(spec: SweepSpec, params: dict[str, Any], seeds: Sequence[int], data: Any, cache: StageCache,
                 memory: ProcessMemory, log: Callable[[str], None], started: float) -> TablePoint:
    """Every seed of one point, the first first (it trains the stages the others share)."""
    first = _seed_config(spec, params, seeds[0])
    top1, curves, controls, seconds, costs = [], [], [], [], {}
    for seed in seeds:
        cfg = _seed_config(spec, params, seed)
        cache.share(cfg, first, data.fingerprint)
        curve: list[float] = []

        def on_epoch(kind: str, epoch: int, record: dict[str, float], curve: list[float] = curve) -> None:
            if kind == "student":
                curve.append(float(record["val_top1"]))
            elif kind in SHARED_KINDS:  # trained once, with the first point that needs them: say how it goes
                log(f"  [{time.perf_counter() - started:6.0f}s] {kind} epoch {epoch}  val_top1 {record['val_top1']:.3f}"
                    f"  ({record['epoch_seconds']:.1f}s)")

        result = run_tas(cfg, provider=cache, on_epoch=on_epoch, progress=False, data=data, measure_latency=False,
                         memory=memory)
        top1.append(float(result.metrics["val_top1"]))
        curves.append(curve)
        seconds.append(float(result.stages["student"].result.metrics["train_seconds"]))
        costs = {name: float(result.metrics[name]) for name in COST_METRICS}
        if spec.require_search().ce_control:
            control = train_ce_control(cfg, provider=cache, data=data, memory=memory)
            controls.append(float(control.result.metrics["val_top1"]))
    return TablePoint(params=params, seeds=list(seeds), val_top1=top1, val_top1_curves=curves, costs=costs,
                      ce_val_top1=controls, train_seconds=seconds)


def _shared_stages(cache: StageCache) -> dict[str, dict[str, Any]]:
    """Every shared stage this build used (the teacher, an assistant per architecture): what it is, its val_top1."""
    return {key: {**cache.described.get(key, {}), "val_top1": float(result.metrics["val_top1"]),
                  "epochs": result.metrics.get("epochs")}
            for key, result in cache.results.items() if result.kind in SHARED_KINDS}


class _Once(logging.Filter):
    """Lets each distinct message through once: a shared stage's warning comes back with every run using it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self.seen:
            return False
        self.seen.append(message)
        return True


def build_table(spec: SweepSpec, seeds: Sequence[int], table: SearchTable, *, stage_dir: Path | None = None,
                log: Callable[[str], None] = print, save: Callable[[SearchTable], None] | None = None) -> SearchTable:
    """Train every grid point missing from `table` with every seed; `save` gets the table after each point.
    The pipeline's warnings are shown once each and kept in the table."""
    once, pipeline_log = _Once(), logging.getLogger("pxd.pipeline")
    pipeline_log.addFilter(once)
    try:
        return _build(spec, seeds, table, stage_dir, log, save, once)
    finally:
        pipeline_log.removeFilter(once)


def _build(spec: SweepSpec, seeds: Sequence[int], table: SearchTable, stage_dir: Path | None,
           log: Callable[[str], None], save: Callable[[SearchTable], None] | None, once: _Once) -> SearchTable:
    started = time.perf_counter()
    wall_before = table.wall_s
    data = load_dataset(spec.base.dataset, spec.base.seed)
    if table.dataset and table.dataset["fingerprint"] != data.fingerprint:
        raise ConfigError("--table", "the table was built on other data (its dataset fingerprint differs); "
                                     "give another --table path")
    table.dataset = {"kind": spec.base.dataset.kind, "path": spec.base.dataset.path, "image_size": spec.base.dataset.image_size,
                     "classes": data.num_classes, "train_images": len(data.train.labels),
                     "val_images": len(data.val.labels), "fingerprint": data.fingerprint}
    cache, memory = StageCache(stage_dir), ProcessMemory(upstream_limit=2 * len(SHARED_KINDS) * len(seeds))
    grid, finished = grid_points(spec), table.lookup()
    todo = [params for params in grid if point_key(params) not in finished]
    log(f"table: {len(grid) - len(todo)} of {len(grid)} points done; training {len(todo)} × {len(seeds)} seeds "
        f"({data.num_classes} classes, {len(data.train.labels)} train / {len(data.val.labels)} val images)")
    for number, params in enumerate(todo, 1):
        point_started = time.perf_counter()
        point = _train_point(spec, params, seeds, data, cache, memory, log, started)
        table.points.append(point)
        table.shared = {"seed": seeds[0], "stages": {**table.shared.get("stages", {}), **_shared_stages(cache)}}
        table.wall_s = wall_before + time.perf_counter() - started
        table.warnings += [message for message in once.seen if message not in table.warnings]
        control = f"  ce {statistics.fmean(point.ce_val_top1):.3f}" if point.ce_val_top1 else ""
        left = (time.perf_counter() - started) / number * (len(todo) - number)
        log(f"  [{time.perf_counter() - started:6.0f}s] {len(table.points):>3}/{len(grid)} {point_key(params)}  "
            f"val_top1 {point.val_top1_mean:.3f} ± {point.val_top1_std:.3f}{control}  gmacs {point.costs['gmacs']:.5f}  "
            f"{time.perf_counter() - point_started:.0f}s  (~{left / 60:.0f} min left)")
        if save is not None:
            save(table)
    return table


def load_or_build_table(spec: SweepSpec, path: Path | None, seeds: Sequence[int], *, command: str,
                        machine: dict[str, Any], versions: dict[str, Any], stage_dir: Path | None = None,
                        log: Callable[[str], None] = print) -> SearchTable:
    """The table at `path`, its missing points trained first (written to `path` after each point)."""
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ConfigError("--seeds", f"give distinct training seeds, e.g. 0 1 2; got {list(seeds)}")
    space = training_space(spec)
    if path is not None and path.exists():
        table = read_table(path)
        if _without_placement(table.space) != _without_placement(space):
            raise ConfigError("--table", f"{path} was built for a different space (its training settings differ); "
                                         "give another --table path to build a new one")
        if table.seeds != list(seeds):
            raise ConfigError("--seeds", f"{path} was built with training seeds {table.seeds}; pass --seeds "
                                         f"{' '.join(map(str, table.seeds))} or give another --table path")
        if len(table.points) == len(grid_points(spec)):
            log(f"table: {len(table.points)} points × {len(seeds)} seeds from {path} (built in {table.wall_s:.0f}s)")
            return table
    else:
        table = SearchTable(points=[], space=space, seeds=list(seeds))
    table.command, table.machine, table.versions = command, machine, versions

    def save(partial: SearchTable) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            written = path.with_suffix(".partial")
            written.write_text(json.dumps(partial.to_json(), indent=1))
            os.replace(written, path)

    table = build_table(spec, seeds, table, stage_dir=stage_dir, log=log, save=save)
    log(f"table: {len(table.points)} points" + (f", saved to {path}" if path is not None else ""))
    return table


def check_complete(table: SearchTable, spec: SweepSpec) -> None:
    """Every grid point has a row and every row the same seeds and student epochs."""
    missing = [key for key in map(point_key, grid_points(spec)) if key not in table.lookup()]
    if missing:
        raise ConfigError("--table", f"{len(missing)} grid points have no row, e.g. {missing[0]}; rebuild the table")
    epochs = {len(curve) for point in table.points for curve in point.val_top1_curves}
    if len(epochs) != 1 or any(point.seeds != table.points[0].seeds for point in table.points):
        raise ConfigError("--table", f"rows differ in seeds or student epochs ({sorted(epochs)}); rebuild the table")


def objective_values(point: TablePoint, objectives: Sequence[tuple[str, str]], seed_index: int | None = None) -> list[float]:
    metrics = point.metrics(seed_index)
    return [metrics[name] for name, _ in objectives]
