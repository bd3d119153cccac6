"""The `search:` section of a search space: typed by `pxd.config.parse_dataclass` into `SearchConfig`,
then the checks that span fields (objectives and modes against the metric registry, a reference point
trials can beat, the ideal point, constraint keys, sampler options), all before any compute. The
sampler section is `orchestrator.space.samplers`'s, the constraints `orchestrator.space.constraints`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from orchestrator.space.constraints import parse_constraints
from orchestrator.space.distributions import Param
from orchestrator.space.fields import check_known, finite_number, number_above, whole_number
from orchestrator.space.samplers import SamplerConfig, check_sampler
from pxd import metrics as registry
from pxd.config import PipelineConfig, parse_dataclass
from pxd.errors import ConfigError
from pxd.metrics import Mode

__all__ = [
    "Objective",
    "ResourcesConfig",
    "LatencyConfig",
    "EarlyStoppingConfig",
    "SearchConfig",
    "parse_search",
    "optuna_directions",
]

_COST_OBJECTIVES = ("gmacs", "pixels")  # a space without objectives: the primary metric against these
_LATENCY_DEVICES = ("auto", "cpu", "cuda")
_OPTUNA_DIRECTIONS = {Mode.MAX: "maximize", Mode.MIN: "minimize"}


@dataclass(frozen=True)
class Objective:
    metric: str  # a registered objective metric (`pxd.metrics`)
    mode: Mode | None = None  # "max" | "min" in a file; None there means the metric's own mode


@dataclass(frozen=True)
class ResourcesConfig:
    cpu: float = 1.0  # per trial
    gpu: float = 0.0  # per trial; a fraction ≤ 1 shares one GPU between trials


@dataclass(frozen=True)
class LatencyConfig:
    device: str | None = None  # auto | cpu | cuda; None: the trial's train.device
    repeats: int = 20
    warmup: int = 5


@dataclass(frozen=True)
class EarlyStoppingConfig:
    kind: str = "none"  # none | moasha (multi-objective ASHA over student epochs)
    grace_period: int = 1  # student epochs before the first rung
    reduction_factor: int = 3  # η: at each rung the best 1/η of the trials there go on
    # true: a trial no other trial at its rung dominates (on the rung's first Pareto front) always goes
    # on, only dominated trials outside the best 1/η are stopped; false: classic MO-ASHA, the best 1/η only
    keep_front: bool = True


EARLY_STOPPING = ("none", "moasha")


@dataclass(frozen=True)
class SearchConfig:
    """The `search:` section. After `parse_spec` every objective has its mode, the reference point
    has a value for every objective, and the sampler has its seed."""

    trials: int | None = None  # required
    max_concurrent: int = 1
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    objectives: tuple[Objective, ...] = ()  # empty in a file: the primary metric (val_top1) max, gmacs min, pixels min
    # constraint key (`max_gmacs`, `min_val_top1`, one per constrainable metric) → limit; a trial that
    # breaks one is infeasible: never on the frontier
    constraints: dict[str, float] = field(default_factory=dict)
    reference_point: dict[str, float] = field(default_factory=dict)  # metric → fixed hypervolume reference
    # metric → the best value it could take (default: the registry's: val_top1 1, costs 0); the normalised
    # hypervolume is the fraction of the box between reference and ideal, comparable across sweeps of a space
    ideal_point: dict[str, float] = field(default_factory=dict)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    timeout_s: int | None = None
    stage_wait_timeout_s: int = 3600
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    # times a trial whose process or node was lost (killed, out of memory, node preempted) is run again;
    # errors that would repeat (a bad config, a diverged loss: `pxd.errors.PxdError`) are never retried
    max_retries: int = 2
    # Ray Tune's `reuse_actors`: true keeps a trial's worker process (its imported libraries, the dataset
    # it loaded, MLflow's package scan) for the next trial on the same resources, saving ~10 s of process
    # start per trial (docs/benchmarks.md); false (Tune's own default) gives every trial a fresh process,
    # worth it when a trial leaks memory (e.g. a user's model). pxd's default: true (docs/sweeps.md)
    reuse_actors: bool = True
    # once the last trial has started, the CPUs of idle trial slots go to the trials still running (more
    # torch threads, on pxd's own local Ray only: `orchestrator.driver.lending`); false: each trial keeps
    # search.resources.cpu threads throughout
    lend_idle_cpus: bool = True
    # true: every trial also gets its student's cross-entropy control (same architecture, side, data, epochs
    # and seed, labels only: `pxd.control`), a shared stage trained once per arch × side × schedule × seed,
    # and logs `gain_vs_ce` (its val_top1 minus the control's); controls never enter the frontier
    ce_control: bool = False

    @property
    def objective_metrics(self) -> tuple[str, ...]:
        return tuple(o.metric for o in self.objectives)

    @property
    def objective_modes(self) -> tuple[Mode, ...]:
        return tuple(Mode(o.mode) for o in self.objectives)

    @property
    def objective_pairs(self) -> list[tuple[str, Mode]]:
        """[(metric, mode), ...] in objective order: what the frontier functions take."""
        return list(zip(self.objective_metrics, self.objective_modes))


def optuna_directions(modes: Sequence[str]) -> list[str]:
    """Optuna's words for modes: max → maximize, min → minimize."""
    return [_OPTUNA_DIRECTIONS[Mode(mode)] for mode in modes]


# ---------------------------------------------------------------------------------------------
# the search: section: typed by parse_dataclass, then the checks that span fields


def parse_search(raw_search: Any, raw: dict[str, Any], params: tuple[Param, ...]) -> SearchConfig:
    search = parse_dataclass(SearchConfig, raw_search, prefix="search")
    if search.trials is None:
        raise ConfigError("search.trials", "missing; set how many trials to run, e.g. trials: 20")
    whole_number(search.trials, "search.trials", minimum=1)
    whole_number(search.max_concurrent, "search.max_concurrent", minimum=1)
    top_seed = raw.get("seed", PipelineConfig.seed)
    sampler = check_sampler(search.sampler, top_seed if isinstance(top_seed, int) else 0, params)
    objectives = _check_objectives(search.objectives, given=raw_search is not None and "objectives" in raw_search)
    teacher = raw.get("teacher") if isinstance(raw.get("teacher"), dict) else {}
    teacher_resolution = teacher.get("resolution")
    if not isinstance(teacher_resolution, int):
        teacher_resolution = PipelineConfig().teacher.resolution
    number_above(search.resources.cpu, "search.resources.cpu")
    _check_gpu(search.resources.gpu)
    if search.latency.device is not None and search.latency.device not in _LATENCY_DEVICES:
        raise ConfigError(
            "search.latency.device",
            f"unknown {search.latency.device!r}; use auto, cpu or cuda (or omit it for the trial's device)",
        )
    whole_number(search.latency.repeats, "search.latency.repeats", minimum=1)
    whole_number(search.latency.warmup, "search.latency.warmup", minimum=0)
    if search.timeout_s is not None:
        whole_number(search.timeout_s, "search.timeout_s", minimum=1)
    whole_number(search.stage_wait_timeout_s, "search.stage_wait_timeout_s", minimum=1)
    _check_early_stopping(search.early_stopping, objectives)
    whole_number(search.max_retries, "search.max_retries", minimum=0)
    return replace(
        search,
        sampler=sampler,
        objectives=objectives,
        constraints=parse_constraints(search.constraints),
        reference_point=(reference := _check_reference(search.reference_point, objectives, teacher_resolution,
                                                       _student_pixels(raw, params))),
        ideal_point=_check_ideal(search.ideal_point, objectives, reference),
    )


def _check_early_stopping(early: EarlyStoppingConfig, objectives: Sequence[Objective]) -> None:
    if early.kind not in EARLY_STOPPING:
        raise ConfigError("search.early_stopping.kind", f"unknown {early.kind!r}; use one of {', '.join(EARLY_STOPPING)}")
    whole_number(early.grace_period, "search.early_stopping.grace_period", minimum=1)
    whole_number(early.reduction_factor, "search.early_stopping.reduction_factor", minimum=2)
    primary = registry.primary_metric()
    if early.kind == "moasha" and primary not in {o.metric for o in objectives}:
        raise ConfigError("search.early_stopping.kind", f"moasha ranks trials on their current {primary}, which is "
                                                        "not an objective of this space; add it, or set kind: none")


def _check_objectives(objectives: tuple[Objective, ...], *, given: bool) -> tuple[Objective, ...]:
    if not given:
        names = (registry.primary_metric(), *_COST_OBJECTIVES)
        return tuple(Objective(name, registry.get_metric(name).mode) for name in names)
    if len(objectives) < 2:
        raise ConfigError(
            "search.objectives",
            f"needs a list of at least two objectives (a frontier trades accuracy against cost), got {len(objectives)}; "
            "e.g. [{metric: val_top1}, {metric: gmacs}]",
        )
    allowed = registry.objective_metrics()
    checked: list[Objective] = []
    for index, objective in enumerate(objectives):
        name = f"search.objectives.{index}"
        if objective.metric not in allowed:
            raise ConfigError(f"{name}.metric", f"unknown metric {objective.metric!r}; use one of {', '.join(allowed)}")
        if objective.metric in (o.metric for o in checked):
            raise ConfigError(f"{name}.metric", f"{objective.metric} is listed twice; remove the duplicate")
        nature = registry.get_metric(objective.metric)
        mode = objective.mode or nature.mode
        if mode not in registry.MODES:
            raise ConfigError(f"{name}.mode", f"must be max or min, got {mode!r}")
        if mode != nature.mode:
            better = "higher" if nature.mode is Mode.MAX else "lower"
            raise ConfigError(f"{name}.mode", f"{objective.metric} ({nature.description}) is better {better}: its mode is "
                                              f"{nature.mode}; remove mode or set mode: {nature.mode}")
        checked.append(Objective(objective.metric, Mode(mode)))
    return tuple(checked)


def _student_pixels(raw: dict[str, Any], params: tuple[Param, ...]) -> list[float]:
    """Every `pixels` value a trial of the space can have (known before any training)."""
    resolution = next((p.distribution for p in params if p.name == "student.resolution"), None)
    if resolution is None:
        fixed = (raw.get("student") or {}).get("resolution", PipelineConfig().student.resolution)
        sides = [fixed] if isinstance(fixed, int) else []
    elif resolution.kind == "choice":
        sides = [v for v in resolution.values if isinstance(v, int)]
    else:
        sides = [int(resolution.low), int(resolution.high)]
    return [float(side * side) for side in sides]


def _check_point_keys(raw: dict[str, float], objectives: tuple[Objective, ...], section: str) -> None:
    """A point (reference, ideal) names objectives only."""
    metrics = [o.metric for o in objectives]
    for key in raw:
        check_known(key, metrics, f"search.{section}.", "key")


def _check_reference(raw: dict[str, float], objectives: tuple[Objective, ...], teacher_resolution: int,
                     student_pixels: list[float]) -> dict[str, float]:
    _check_point_keys(raw, objectives, "reference_point")
    point = {}
    for objective in objectives:
        name = f"search.reference_point.{objective.metric}"
        default = registry.get_metric(objective.metric).default_reference
        if objective.metric in raw:
            point[objective.metric] = finite_number(raw[objective.metric], name)
        elif default is not None:
            point[objective.metric] = default
        else:
            hint = (f"pixels: {_pixels_reference(teacher_resolution, student_pixels):g}" if objective.metric == "pixels"
                    else registry.get_metric(objective.metric).hint(teacher_resolution))
            raise ConfigError(name, f"missing; add a fixed hypervolume reference worse than any trial, e.g. {hint}")
        _check_reference_reachable(objective, point[objective.metric], teacher_resolution, student_pixels)
    return point


def _pixels_reference(teacher_resolution: int, student_pixels: list[float]) -> float:
    """A pixels reference every student beats: the teacher's pixels, or twice the largest student's."""
    largest = max(student_pixels, default=0.0)
    return float(teacher_resolution**2) if teacher_resolution**2 > largest else 2 * largest


def _check_reference_reachable(objective: Objective, value: float, teacher_resolution: int,
                               student_pixels: list[float]) -> None:
    """A trial contributes to the hypervolume only if it beats the reference on every axis: a reference
    that valid trials can never beat would silently zero their contribution. Checked where the values
    are known before training: a bounded metric's range (val_top1 in [0, 1]) and the students' pixels."""
    metric = registry.get_metric(objective.metric)
    name = f"search.reference_point.{objective.metric}"
    if metric.bounds is not None:
        hint = metric.hint(teacher_resolution)
        low, high = metric.bounds
        best = objective.mode.best((low, high))
        if not objective.mode.better(best, value):
            raise ConfigError(name, f"{value:g} is at or beyond the best {objective.metric} can be ({best:g}), so no trial "
                                    f"could count in the hypervolume; use a worse value, e.g. {hint}")
    if objective.metric == "pixels" and student_pixels and value <= max(student_pixels):
        side = int(max(student_pixels) ** 0.5)
        suggestion = _pixels_reference(teacher_resolution, student_pixels)
        raise ConfigError(name, f"{value:g} is not worse than students at {side} px ({max(student_pixels):g} pixels), "
                                f"which would add nothing to the hypervolume; use more than every student's pixels, "
                                f"e.g. pixels: {suggestion:g}")


def _check_ideal(raw: dict[str, float], objectives: tuple[Objective, ...], reference: dict[str, float]) -> dict[str, float]:
    _check_point_keys(raw, objectives, "ideal_point")
    ideal = {}
    for objective in objectives:
        name = f"search.ideal_point.{objective.metric}"
        value = (finite_number(raw[objective.metric], name) if objective.metric in raw
                 else registry.get_metric(objective.metric).ideal)
        if not math.isfinite(value) or not objective.mode.better(value, reference[objective.metric]):
            raise ConfigError(name, f"{value:g} must be better than the reference {reference[objective.metric]:g} "
                                    f"({objective.metric} mode {objective.mode}); set search.ideal_point.{objective.metric}")
        ideal[objective.metric] = value
    return ideal


def _check_gpu(value: Any) -> float:
    gpu = number_above(value, "search.resources.gpu", low_inclusive=True)
    if gpu > 1 and not gpu.is_integer():
        raise ConfigError(
            "search.resources.gpu",
            f"above 1 it must be a whole number of GPUs, got {gpu:g}; use a fraction ≤ 1 to share one GPU",
        )
    return gpu
