"""Search-space files → a typed, validated `SweepSpec`.

A search-space file is a `pxd train` config (`pxd.config.PipelineConfig`) in which values of the
student, assistant, distill and train sections may be distributions (`orchestrator.distributions`),
plus a `search:` section (trials, sampler, objectives, constraints, reference point, resources).
Everything is validated here, before any compute: every value a distribution can take is checked
with `PipelineConfig.from_dict`, so a bad choice fails at load time and not in trial 37.
The format is documented for users in `search_spaces/README.md`.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

from orchestrator.distributions import (
    DefineByRun,
    Distribution,
    Param,
    collect_params,
    finite_float,
    substitute,
    suggest_all,
    validate_every_value,
)
from pxd.config import PipelineConfig
from pxd.errors import ConfigError

__all__ = [
    "OBJECTIVE_METRICS",
    "SAMPLERS",
    "Distribution",
    "Param",
    "Objective",
    "Constraints",
    "SearchConfig",
    "SweepSpec",
    "load_spec",
    "read_yaml",
    "parse_spec",
    "define_by_run",
    "sample_params",
    "materialize",
    "make_sampler",
    "samplers_honouring_constraints",
    "constraint_names",
    "constraint_values",
    "is_feasible",
]

logger = logging.getLogger(__name__)

OBJECTIVE_METRICS = ("val_top1", "gmacs", "params_m", "pixels", "latency_ms")
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
# constraint key → (metric, sign): value = sign · (metric − limit) ≤ 0 when satisfied (Optuna's convention)
_CONSTRAINTS = {
    "max_gmacs": ("gmacs", 1.0),
    "max_params_m": ("params_m", 1.0),
    "max_latency_ms": ("latency_ms", 1.0),
    "min_val_top1": ("val_top1", -1.0),
}
_DEFAULT_OBJECTIVES = (("val_top1", "max"), ("gmacs", "min"), ("pixels", "min"))
_SEARCH_KEYS = (
    "trials", "max_concurrent", "sampler", "objectives", "constraints", "reference_point",
    "resources", "latency", "timeout_s", "stage_wait_timeout_s",
)  # fmt: skip
_PATH_FIELDS = (("dataset", "path"), ("teacher", "checkpoint"), ("student", "checkpoint"))


@dataclass(frozen=True)
class Objective:
    metric: str  # one of OBJECTIVE_METRICS
    mode: str  # "max" | "min"


@dataclass(frozen=True)
class Constraints:
    """Hard limits. A trial that breaks one is infeasible: never on the frontier."""

    max_gmacs: float | None = None
    max_params_m: float | None = None
    max_latency_ms: float | None = None
    min_val_top1: float | None = None


@dataclass(frozen=True)
class SearchConfig:
    trials: int
    objectives: tuple[Objective, ...]
    reference_point: dict[str, float]  # metric → value for every objective (fixed hypervolume reference)
    max_concurrent: int = 1
    sampler: str = "tpe"  # one of SAMPLERS
    sampler_seed: int = 0
    sampler_options: dict[str, Any] = field(default_factory=dict)  # passed to the Optuna sampler
    constraints: Constraints = field(default_factory=Constraints)
    resources_cpu: float = 1.0  # per trial
    resources_gpu: float = 0.0  # per trial; a fraction ≤ 1 shares one GPU between trials
    latency_device: str | None = None  # auto | cpu | cuda; None: the trial's train.device
    latency_repeats: int = 20
    latency_warmup: int = 5
    timeout_s: int | None = None
    stage_wait_timeout_s: int = 3600


@dataclass(frozen=True)
class SweepSpec:
    name: str
    raw: dict[str, Any]  # the file as loaded (relative paths made absolute), `search` included
    params: tuple[Param, ...]
    search: SearchConfig | None  # None only for a file without distributions and without `search:`
    source_path: str | None = None

    def require_search(self) -> SearchConfig:
        """The search section, or a ConfigError saying how to add one (for `pxd sweep`)."""
        if self.search is None:
            raise ConfigError(
                "search",
                "missing; a sweep needs a search: section with trials and reference_point, see search_spaces/README.md",
            )
        return self.search

    @property
    def objective_metrics(self) -> tuple[str, ...]:
        return tuple(o.metric for o in self.require_search().objectives)

    @property
    def objective_modes(self) -> tuple[str, ...]:
        return tuple(o.mode for o in self.require_search().objectives)

    @property
    def directions(self) -> tuple[str, ...]:
        """Optuna study directions, in objective order."""
        return tuple("maximize" if mode == "max" else "minimize" for mode in self.objective_modes)

    def fixed_config(self) -> PipelineConfig:
        """The single-point config of a file without distributions (what `pxd train` runs)."""
        if self.params:
            raise ConfigError(
                self.params[0].name,
                "is a distribution; run this search space with `pxd sweep`, or set a single value to use `pxd train`",
            )
        return PipelineConfig.from_dict(self.raw)


# ---------------------------------------------------------------------------------------------
# loading


def load_spec(path: str | os.PathLike[str]) -> SweepSpec:
    """Read a search-space (or plain config) YAML file and validate it. Raises `ConfigError`."""
    return parse_spec(read_yaml(path), source_path=str(path))


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """The file's YAML (safe loader); unreadable files and bad syntax are a `ConfigError` on the path."""
    where = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(where, f"cannot read the file ({exc.strerror or exc}); check the path") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(where, f"is not valid YAML ({problem}{at}); fix the syntax") from None
    return raw


def parse_spec(raw: Any, source_path: str | None = None) -> SweepSpec:
    """Validate a loaded search-space mapping; raises `ConfigError` naming the dotted field."""
    where = source_path or "config"
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else f"a {type(raw).__name__}"
        raise ConfigError(
            where,
            "must be a YAML mapping with sections name, seed, dataset, teacher, assistant, student, distill, "
            f"train, search; got {got}",
        )
    raw = _absolute_paths(copy.deepcopy(raw))
    sections = tuple(PipelineConfig.__dataclass_fields__) + ("search",)
    for key in raw:
        _check_known(key, sections, "", "top-level key")
    params = collect_params(raw)
    if "search" in raw:
        search = _parse_search(raw["search"], raw, params)
    elif params:
        raise ConfigError(
            "search",
            f"missing; {params[0].name} is a distribution, so add a search: section with trials and "
            "reference_point (see search_spaces/README.md)",
        )
    else:
        search = None
    validate_every_value(raw, params)
    name = raw.get("name") or (Path(source_path).stem if source_path else PipelineConfig.name)
    return SweepSpec(name=str(name), raw=raw, params=params, search=search, source_path=source_path)


def _absolute_paths(raw: dict[str, Any]) -> dict[str, Any]:
    # Ray Tune runs each trial in its own working directory: a relative dataset path that is right
    # for the user's shell would be wrong there, so resolve it against the directory of the launch.
    for section, key in _PATH_FIELDS:
        node = raw.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str):
            node[key] = os.path.abspath(os.path.expanduser(node[key]))
    return raw


def _check_known(key: Any, known: Iterable[str], prefix: str, what: str) -> None:
    known = tuple(known)
    if key in known:
        return
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"{prefix}{key}", f"unknown {what}; {hint}known: {', '.join(known)}")


# ---------------------------------------------------------------------------------------------
# sampling and materialising trials


def define_by_run(spec: SweepSpec) -> Callable[[optuna.Trial], None]:
    """The `space=` callable for Ray Tune's `OptunaSearch`: suggests every active parameter and
    returns None (every value is recorded by its suggest_* call). Picklable, as Tune requires."""
    return DefineByRun(spec.params)


def sample_params(spec: SweepSpec, trial: optuna.Trial) -> dict[str, Any]:
    """Suggest every parameter whose condition holds; returns {dotted name: value}."""
    return suggest_all(spec.params, trial)


def materialize(spec: SweepSpec, params: dict[str, Any]) -> PipelineConfig:
    """The trial's config: sampled values (dotted names) substituted into the file, then validated.

    `params` must hold every active parameter and nothing else. Block-wise depths/widths are
    dropped when a searched `student.arch` is not a block-wise family.
    """
    known = {p.name for p in spec.params}
    for name in params:
        if name not in known:
            raise ConfigError(
                name,
                f"is not a parameter of this search space; parameters: {', '.join(sorted(known)) or 'none'}",
            )
    return substitute(spec.raw, spec.params, params)


# ---------------------------------------------------------------------------------------------
# samplers and constraints


def _accepts_constraints(sampler_class: type) -> bool:
    return "constraints_func" in inspect.signature(sampler_class).parameters


def samplers_honouring_constraints() -> tuple[str, ...]:
    """Sampler names whose installed Optuna constructor takes `constraints_func`."""
    return tuple(name for name, cls in _SAMPLER_CLASSES.items() if _accepts_constraints(cls))


def make_sampler(
    spec: SweepSpec, constraints_func: Callable[[optuna.trial.FrozenTrial], list[float]] | None = None
) -> optuna.samplers.BaseSampler:
    """The Optuna sampler named in `search.sampler`, seeded.

    `constraints_func` reaches only the samplers whose constructor takes it (tpe, nsga2, gp; see
    `samplers_honouring_constraints`); random and grid ignore constraints, which then only decide
    feasibility on the frontier. Optuna 5 deprecates `constraints_func` (FutureWarning) in favour of
    `trial.set_constraint(name, value)` before `study.tell`, which tpe, nsga2 and gp read without
    any constructor argument: `zip(constraint_names(spec), constraint_values(spec, metrics))`.
    """
    search = spec.require_search()
    cls = _SAMPLER_CLASSES[search.sampler]
    kwargs: dict[str, Any] = {"multivariate": True} if search.sampler == "tpe" else {}
    kwargs.update(search.sampler_options)
    kwargs["seed"] = search.sampler_seed
    if search.sampler == "grid":
        kwargs["search_space"] = {p.name: list(p.distribution.values) for p in spec.params}
    if constraints_func is not None:
        if _accepts_constraints(cls):
            kwargs["constraints_func"] = constraints_func
        else:
            logger.warning(
                "sampler %r ignores constraints while sampling; they still decide the frontier", search.sampler
            )
    with warnings.catch_warnings():
        # multivariate TPE and constraints_func are marked experimental; the user cannot act on it
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(**kwargs)


def constraint_names(spec: SweepSpec) -> tuple[str, ...]:
    """The set constraints (`max_gmacs`, ...), in the order of `constraint_values`."""
    constraints = spec.require_search().constraints
    return tuple(key for key in _CONSTRAINTS if getattr(constraints, key) is not None)


def constraint_values(spec: SweepSpec, metrics: dict[str, float]) -> list[float]:
    """One value per set constraint, in Optuna's convention: ≤ 0 means satisfied.

    A metric that is missing or NaN gives +inf: a trial cannot be shown to meet the limit.
    """
    constraints = spec.require_search().constraints
    values = []
    for key in constraint_names(spec):
        metric, sign = _CONSTRAINTS[key]
        limit = getattr(constraints, key)
        measured = metrics.get(metric)
        if measured is None or math.isnan(measured):
            values.append(math.inf)
        else:
            values.append(sign * (float(measured) - limit))
    return values


def is_feasible(spec: SweepSpec, metrics: dict[str, float]) -> bool:
    return all(value <= 0 for value in constraint_values(spec, metrics))


# ---------------------------------------------------------------------------------------------
# the search: section


def _parse_search(search: Any, raw: dict[str, Any], params: tuple[Param, ...]) -> SearchConfig:
    search = _mapping(search, "search", _SEARCH_KEYS)
    if "trials" not in search:
        raise ConfigError("search.trials", "missing; set how many trials to run, e.g. trials: 20")
    top_seed = raw.get("seed", PipelineConfig.seed)
    name, seed, options = _parse_sampler(search.get("sampler"), top_seed if isinstance(top_seed, int) else 0, params)
    objectives = _parse_objectives(search.get("objectives"))
    teacher = raw.get("teacher") if isinstance(raw.get("teacher"), dict) else {}
    resources = _mapping(search.get("resources"), "search.resources", ("cpu", "gpu"))
    latency = _mapping(search.get("latency"), "search.latency", ("device", "repeats", "warmup"))
    timeout = search.get("timeout_s")
    return SearchConfig(
        trials=_int(search["trials"], "search.trials", minimum=1),
        max_concurrent=_int(search.get("max_concurrent", 1), "search.max_concurrent", minimum=1),
        sampler=name,
        sampler_seed=seed,
        sampler_options=options,
        objectives=objectives,
        constraints=_parse_constraints(search.get("constraints")),
        reference_point=_parse_reference(search.get("reference_point"), objectives, teacher.get("resolution")),
        resources_cpu=_number(resources.get("cpu", 1.0), "search.resources.cpu"),
        resources_gpu=_parse_gpu(resources.get("gpu", 0.0)),
        latency_device=_parse_latency_device(latency.get("device")),
        latency_repeats=_int(latency.get("repeats", 20), "search.latency.repeats", minimum=1),
        latency_warmup=_int(latency.get("warmup", 5), "search.latency.warmup", minimum=0),
        timeout_s=None if timeout is None else _int(timeout, "search.timeout_s", minimum=1),
        stage_wait_timeout_s=_int(search.get("stage_wait_timeout_s", 3600), "search.stage_wait_timeout_s", minimum=1),
    )


def _mapping(value: Any, name: str, known: Iterable[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(name, f"expected a mapping with keys {', '.join(known)}; got {value!r}")
    for key in value:
        _check_known(key, known, f"{name}.", "key")
    return value


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


def _parse_sampler(raw: Any, default_seed: int, params: tuple[Param, ...]) -> tuple[str, int, dict[str, Any]]:
    raw = _mapping(raw, "search.sampler", ("name", "seed", "options"))
    name = raw.get("name", "tpe")
    if name not in SAMPLERS:
        raise ConfigError("search.sampler.name", f"unknown sampler {name!r}; use one of {', '.join(SAMPLERS)}")
    seed = _int(raw.get("seed", default_seed), "search.sampler.seed", minimum=0)
    if name == "grid":
        for param in params:
            if param.distribution.kind != "choice":
                raise ConfigError(
                    param.name,
                    f"the grid sampler needs every parameter to be a choice, this is {param.distribution.kind}; "
                    "make it {choice: [...]} or use tpe, nsga2, gp or random",
                )
    allowed = [p for p in inspect.signature(_SAMPLER_CLASSES[name]).parameters if p not in _SAMPLER_RESERVED]
    if raw.get("options") and not allowed:
        raise ConfigError("search.sampler.options", f"the {name} sampler takes no options; remove them")
    options = dict(_mapping(raw.get("options"), "search.sampler.options", allowed))
    probe = SearchConfig(1, (), {}, sampler=name, sampler_seed=seed, sampler_options=options)
    try:  # constructing a sampler is cheap and checks option values with Optuna's own messages
        make_sampler(SweepSpec("probe", {}, params, probe))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            "search.sampler.options",
            f"{name} rejects these options ({exc}); fix or remove them",
        ) from None
    return name, seed, options


def _parse_objectives(raw: Any) -> tuple[Objective, ...]:
    if raw is None:
        return tuple(Objective(metric, mode) for metric, mode in _DEFAULT_OBJECTIVES)
    if not isinstance(raw, list) or len(raw) < 2:
        raise ConfigError(
            "search.objectives",
            f"needs a list of at least two objectives (a frontier trades accuracy against cost), got {raw!r}; "
            "e.g. [{metric: val_top1}, {metric: gmacs}]",
        )
    objectives = []
    for index, item in enumerate(raw):
        name = f"search.objectives.{index}"
        item = _mapping(item, name, ("metric", "mode"))
        metric = item.get("metric")
        if metric not in OBJECTIVE_METRICS:
            raise ConfigError(f"{name}.metric", f"unknown metric {metric!r}; use one of {', '.join(OBJECTIVE_METRICS)}")
        if metric in (o.metric for o in objectives):
            raise ConfigError(f"{name}.metric", f"{metric} is listed twice; remove the duplicate")
        mode = item.get("mode", "max" if metric == "val_top1" else "min")
        if mode not in ("max", "min"):
            raise ConfigError(f"{name}.mode", f"must be max or min, got {mode!r}")
        objectives.append(Objective(metric, mode))
    return tuple(objectives)


def _parse_reference(raw: Any, objectives: tuple[Objective, ...], teacher_resolution: Any) -> dict[str, float]:
    metrics = [o.metric for o in objectives]
    raw = _mapping(raw, "search.reference_point", metrics)
    point = {}
    for objective in objectives:
        name = f"search.reference_point.{objective.metric}"
        if objective.metric in raw:
            point[objective.metric] = _finite(raw[objective.metric], name)
        elif objective.metric == "val_top1" and objective.mode == "max":
            point["val_top1"] = 0.0
        else:
            raise ConfigError(
                name,
                "missing; add a fixed hypervolume reference worse than any trial, e.g. "
                + _reference_hint(objective.metric, teacher_resolution),
            )
    return point


def _reference_hint(metric: str, teacher_resolution: Any) -> str:
    if metric == "pixels":
        side = teacher_resolution if isinstance(teacher_resolution, int) else PipelineConfig().teacher.resolution
        return f"pixels: {side * side} (teacher.resolution²)"
    if metric == "val_top1":
        return "val_top1: 1.0"
    return f"{metric}: the teacher's {metric} (students should cost less)"


def _parse_constraints(raw: Any) -> Constraints:
    raw = _mapping(raw, "search.constraints", _CONSTRAINTS)
    limits = {key: _number(value, f"search.constraints.{key}") for key, value in raw.items()}
    if limits.get("min_val_top1", 0.0) > 1:
        raise ConfigError(
            "search.constraints.min_val_top1",
            f"val_top1 is a fraction in [0, 1], got {limits['min_val_top1']}; e.g. 0.7 for 70%",
        )
    return Constraints(**limits)


def _parse_gpu(value: Any) -> float:
    gpu = _number(value, "search.resources.gpu", low_inclusive=True)
    if gpu > 1 and not gpu.is_integer():
        raise ConfigError(
            "search.resources.gpu",
            f"above 1 it must be a whole number of GPUs, got {gpu:g}; use a fraction ≤ 1 to share one GPU",
        )
    return gpu


def _parse_latency_device(device: Any) -> str | None:
    if device is not None and device not in ("auto", "cpu", "cuda"):
        raise ConfigError(
            "search.latency.device",
            f"unknown {device!r}; use auto, cpu or cuda (or omit it for the trial's device)",
        )
    return device
