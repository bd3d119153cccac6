"""The `search:` section of a search space: typed by `pxd.config.parse_dataclass` into `SearchConfig`,
then the checks that span fields (objectives and modes against the metric registry, a reference point
trials can beat, the ideal point, constraint keys, sampler options), all before any compute.
"""

from __future__ import annotations

import difflib
import inspect
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import optuna

from orchestrator.space.distributions import Param, finite_float
from pxd import metrics as registry
from pxd.config import PipelineConfig, parse_dataclass
from pxd.errors import ConfigError

__all__ = [
    "SAMPLERS",
    "Objective",
    "SamplerConfig",
    "ResourcesConfig",
    "LatencyConfig",
    "EarlyStoppingConfig",
    "SearchConfig",
    "parse_search",
    "sampler_for",
    "optuna_directions",
    "check_known",
]

SAMPLERS = ("tpe", "nsga2", "gp", "random", "grid")
_SAMPLER_CLASSES = {
    "tpe": optuna.samplers.TPESampler,
    "nsga2": optuna.samplers.NSGAIISampler,
    "gp": optuna.samplers.GPSampler,
    "random": optuna.samplers.RandomSampler,
    "grid": optuna.samplers.GridSampler,
}
# Arguments make_sampler sets itself; everything else in a sampler's constructor may go in options.
_SAMPLER_RESERVED = ("self", "seed", "constraints_func", "search_space")
_DEFAULT_OBJECTIVES = ("val_top1", "gmacs", "pixels")
_LATENCY_DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Objective:
    metric: str  # a registered objective metric (`pxd.metrics`)
    mode: str | None = None  # "max" | "min"; None in a file means the metric's own mode


@dataclass(frozen=True)
class SamplerConfig:
    name: str = "tpe"  # one of SAMPLERS
    seed: int | None = None  # None: the space's top-level seed
    options: dict[str, Any] = field(default_factory=dict)  # passed to the Optuna sampler


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
    objectives: tuple[Objective, ...] = ()  # empty in a file: val_top1 max, gmacs min, pixels min
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

    @property
    def objective_metrics(self) -> tuple[str, ...]:
        return tuple(o.metric for o in self.objectives)

    @property
    def objective_modes(self) -> tuple[str, ...]:
        return tuple(str(o.mode) for o in self.objectives)

    @property
    def objective_pairs(self) -> list[tuple[str, str]]:
        """[(metric, mode), ...] in objective order: what the frontier functions take."""
        return list(zip(self.objective_metrics, self.objective_modes))


def optuna_directions(modes: Sequence[str]) -> list[str]:
    """Optuna's words for modes: max → maximize, min → minimize."""
    return ["maximize" if mode == "max" else "minimize" for mode in modes]


def check_known(key: Any, known: Iterable[str], prefix: str, what: str) -> None:
    known = tuple(known)
    if key in known:
        return
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"{prefix}{key}", f"unknown {what}; {hint}known: {', '.join(known)}")


def sampler_for(sampler: SamplerConfig, params: Sequence[Param]) -> optuna.samplers.BaseSampler:
    """The Optuna sampler `sampler` names, seeded (grid: over every parameter's choices).

    Constraints reach the samplers the way Optuna 5 reads them: `trial.set_constraint(name, value)`
    before `study.tell` (`orchestrator.driver.searcher`), which tpe, nsga2 and gp use while sampling; random
    and grid ignore them, and then they only decide feasibility on the frontier.
    """
    cls = _SAMPLER_CLASSES[sampler.name]
    kwargs: dict[str, Any] = {"multivariate": True} if sampler.name == "tpe" else {}
    kwargs.update(sampler.options)
    kwargs["seed"] = sampler.seed
    if sampler.name == "grid":
        kwargs["search_space"] = {p.name: list(p.distribution.values) for p in params}
    with warnings.catch_warnings():
        # multivariate TPE is marked experimental; the user cannot act on it
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# the search: section: typed by parse_dataclass, then the checks that span fields


def parse_search(raw_search: Any, raw: dict[str, Any], params: tuple[Param, ...]) -> SearchConfig:
    search = parse_dataclass(SearchConfig, raw_search, prefix="search")
    if search.trials is None:
        raise ConfigError("search.trials", "missing; set how many trials to run, e.g. trials: 20")
    _int(search.trials, "search.trials", minimum=1)
    _int(search.max_concurrent, "search.max_concurrent", minimum=1)
    top_seed = raw.get("seed", PipelineConfig.seed)
    sampler = _check_sampler(search.sampler, top_seed if isinstance(top_seed, int) else 0, params)
    objectives = _check_objectives(search.objectives, given=raw_search is not None and "objectives" in raw_search)
    teacher = raw.get("teacher") if isinstance(raw.get("teacher"), dict) else {}
    teacher_resolution = teacher.get("resolution")
    if not isinstance(teacher_resolution, int):
        teacher_resolution = PipelineConfig().teacher.resolution
    _number(search.resources.cpu, "search.resources.cpu")
    _check_gpu(search.resources.gpu)
    if search.latency.device is not None and search.latency.device not in _LATENCY_DEVICES:
        raise ConfigError(
            "search.latency.device",
            f"unknown {search.latency.device!r}; use auto, cpu or cuda (or omit it for the trial's device)",
        )
    _int(search.latency.repeats, "search.latency.repeats", minimum=1)
    _int(search.latency.warmup, "search.latency.warmup", minimum=0)
    if search.timeout_s is not None:
        _int(search.timeout_s, "search.timeout_s", minimum=1)
    _int(search.stage_wait_timeout_s, "search.stage_wait_timeout_s", minimum=1)
    _check_early_stopping(search.early_stopping, objectives)
    _int(search.max_retries, "search.max_retries", minimum=0)
    return replace(
        search,
        sampler=sampler,
        objectives=objectives,
        constraints=_check_constraints(search.constraints),
        reference_point=(reference := _check_reference(search.reference_point, objectives, teacher_resolution,
                                                       _student_pixels(raw, params))),
        ideal_point=_check_ideal(search.ideal_point, objectives, reference),
    )


def _check_early_stopping(early: EarlyStoppingConfig, objectives: Sequence[Objective]) -> None:
    if early.kind not in EARLY_STOPPING:
        raise ConfigError("search.early_stopping.kind", f"unknown {early.kind!r}; use one of {', '.join(EARLY_STOPPING)}")
    _int(early.grace_period, "search.early_stopping.grace_period", minimum=1)
    _int(early.reduction_factor, "search.early_stopping.reduction_factor", minimum=2)
    if early.kind == "moasha" and "val_top1" not in {o.metric for o in objectives}:
        raise ConfigError("search.early_stopping.kind", "moasha ranks trials on their current val_top1, which is not "
                                                        "an objective of this space; add it, or set kind: none")


def _int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(name, f"must be a whole number ≥ {minimum}, got {value!r}")
    return value


def _finite(value: Any, name: str, requirement: str = "") -> float:
    number = finite_float(value)
    if number is None:
        raise ConfigError(name, f"must be a finite number{requirement}, got {value!r}")
    return number


def _number(value: Any, name: str, *, low: float = 0.0, low_inclusive: bool = False) -> float:
    bound = f" ≥ {low:g}" if low_inclusive else f" > {low:g}"
    number = _finite(value, name, bound)
    if number < low or (number == low and not low_inclusive):
        raise ConfigError(name, f"must be a finite number{bound}, got {value!r}")
    return number


def _check_sampler(sampler: SamplerConfig, default_seed: int, params: tuple[Param, ...]) -> SamplerConfig:
    if sampler.name not in SAMPLERS:
        raise ConfigError("search.sampler.name", f"unknown sampler {sampler.name!r}; use one of {', '.join(SAMPLERS)}")
    seed = _int(default_seed if sampler.seed is None else sampler.seed, "search.sampler.seed", minimum=0)
    if sampler.name == "grid":
        for param in params:
            if param.distribution.kind != "choice":
                raise ConfigError(
                    param.name,
                    f"the grid sampler needs every parameter to be a choice, this is {param.distribution.kind}; "
                    "make it {choice: [...]} or use tpe, nsga2, gp or random",
                )
    allowed = [p for p in inspect.signature(_SAMPLER_CLASSES[sampler.name]).parameters if p not in _SAMPLER_RESERVED]
    if sampler.options and not allowed:
        raise ConfigError("search.sampler.options", f"the {sampler.name} sampler takes no options; remove them")
    for key in sampler.options:
        check_known(key, allowed, "search.sampler.options.", "key")
    checked = replace(sampler, seed=seed)
    try:  # constructing a sampler is cheap and checks option values with Optuna's own messages
        sampler_for(checked, params)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            "search.sampler.options",
            f"{sampler.name} rejects these options ({exc}); fix or remove them",
        ) from None
    return checked


def _check_objectives(objectives: tuple[Objective, ...], *, given: bool) -> tuple[Objective, ...]:
    if not given:
        return tuple(Objective(name, registry.get_metric(name).mode) for name in _DEFAULT_OBJECTIVES)
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
            better = "higher" if nature.mode == "max" else "lower"
            raise ConfigError(f"{name}.mode", f"{objective.metric} ({nature.description}) is better {better}: its mode is "
                                              f"{nature.mode}; remove mode or set mode: {nature.mode}")
        checked.append(Objective(objective.metric, mode))
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
        if objective.metric in raw:
            point[objective.metric] = _finite(raw[objective.metric], name)
        elif objective.metric == "val_top1" and objective.mode == "max":
            point["val_top1"] = 0.0
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
        best = high if objective.mode == "max" else low
        if objective.mode == "max" and value >= high or objective.mode == "min" and value <= low:
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
        value = _finite(raw[objective.metric], name) if objective.metric in raw else registry.get_metric(objective.metric).ideal
        better = value > reference[objective.metric] if objective.mode == "max" else value < reference[objective.metric]
        if not math.isfinite(value) or not better:
            raise ConfigError(name, f"{value:g} must be better than the reference {reference[objective.metric]:g} "
                                    f"({objective.metric} mode {objective.mode}); set search.ideal_point.{objective.metric}")
        ideal[objective.metric] = value
    return ideal


def _check_constraints(raw: dict[str, float]) -> dict[str, float]:
    keys = registry.constraint_keys()
    limits = {}
    for key, value in raw.items():
        check_known(key, keys, "search.constraints.", "key")
        limits[key] = _number(value, f"search.constraints.{key}")
        bounds = registry.get_metric(keys[key]).bounds
        if bounds is not None and not bounds[0] <= limits[key] <= bounds[1]:
            raise ConfigError(
                f"search.constraints.{key}",
                f"{keys[key]} takes values in [{bounds[0]:g}, {bounds[1]:g}], got {limits[key]:g}"
                + ("; e.g. 0.7 for 70%" if bounds == (0.0, 1.0) else ""),
            )
    return limits


def _check_gpu(value: Any) -> float:
    gpu = _number(value, "search.resources.gpu", low_inclusive=True)
    if gpu > 1 and not gpu.is_integer():
        raise ConfigError(
            "search.resources.gpu",
            f"above 1 it must be a whole number of GPUs, got {gpu:g}; use a fraction ≤ 1 to share one GPU",
        )
    return gpu
