"""Search-space files → a typed, validated `SweepSpec`.

A search-space file is a `pxd train` config (`pxd.config.PipelineConfig`) in which values of the
student, assistant, distill and train sections may be distributions (`orchestrator.distributions`),
plus a `search:` section (trials, sampler, objectives, constraints, reference point, resources),
parsed by the same typed parser (`pxd.config.parse_dataclass`) into `SearchConfig`.
Everything is validated here, before any compute: every value a distribution can take is checked
with `PipelineConfig.from_dict`, so a bad choice fails at load time and not in trial 37.
Metric facts (modes, constraint keys, reference hints) come from the registry, `pxd.metrics`.
The format is documented for users in `search_spaces/README.md`.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import yaml

from orchestrator.distributions import (
    DefineByRun,
    Param,
    collect_params,
    finite_float,
    substitute,
    suggest_all,
    validate_every_value,
)
from pxd import metrics as registry
from pxd.config import PipelineConfig, parse_dataclass
from pxd.errors import ConfigError
from pxd.paths import set_path

__all__ = [
    "SAMPLERS",
    "Objective",
    "SamplerConfig",
    "ResourcesConfig",
    "LatencyConfig",
    "SearchConfig",
    "SweepSpec",
    "load_spec",
    "read_yaml",
    "apply_overrides",
    "parse_spec",
    "define_by_run",
    "sample_params",
    "materialize",
    "make_sampler",
    "optuna_directions",
    "constraint_names",
    "constraint_values",
    "is_feasible",
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
_PATH_FIELDS = ("dataset.path", "dataset.cache_dir", "teacher.checkpoint", "student.checkpoint")
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


@dataclass(frozen=True)
class SweepSpec:
    name: str
    raw: dict[str, Any]  # the file as loaded (relative paths made absolute), `search` included
    params: tuple[Param, ...]
    search: SearchConfig | None  # None only for a file without distributions and without `search:`
    base: PipelineConfig  # the config with every parameter at its first value (dataset, teacher: every trial's)
    source_path: str | None = None
    notes: tuple[str, ...] = ()  # choices pxd made for the user (printed at launch, e.g. assistant defaults)

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
        return self.require_search().objective_metrics

    @property
    def objective_modes(self) -> tuple[str, ...]:
        return self.require_search().objective_modes

    def fixed_config(self) -> PipelineConfig:
        """The single-point config of a file without distributions (what `pxd train` runs)."""
        if self.params:
            raise ConfigError(
                self.params[0].name,
                "is a distribution; run this search space with `pxd sweep`, or set a single value to use `pxd train`",
            )
        return self.base


def optuna_directions(modes: Sequence[str]) -> list[str]:
    """Optuna's words for modes: max → maximize, min → minimize."""
    return ["maximize" if mode == "max" else "minimize" for mode in modes]


# ---------------------------------------------------------------------------------------------
# loading: the one path from a file (and `--set` flags) to a SweepSpec


def load_spec(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> SweepSpec:
    """Read a search-space (or plain config) YAML file, apply `--set KEY=VALUE` overrides and
    validate it. Raises `ConfigError`. `pxd train` and `pxd sweep` both load files this way."""
    raw = read_yaml(path)
    if isinstance(raw, dict):
        raw = apply_overrides(raw, overrides)
    return parse_spec(raw, source_path=str(path))


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `--set a.b=value` flags (values read as YAML) onto a config mapping; list items are
    addressed by index (`student.depths.1=2`), as in parameter names."""
    for text in overrides:
        if "=" not in text:
            raise ConfigError("--set", f"expected KEY=VALUE (e.g. student.resolution=32), got {text!r}")
        key, value = (part.strip() for part in text.split("=", 1))
        try:
            set_path(raw, key, yaml.safe_load(value), create=True)
        except KeyError as exc:
            raise ConfigError(key, f"cannot be set: {exc.args[0]}") from None
    return raw


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """The file's YAML (safe loader); unreadable files and bad syntax are a `ConfigError` on the path."""
    where = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(where, f"cannot read the file ({exc.strerror or exc}); check the path") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise ConfigError(where, f"{exc.key!r} appears twice at line {exc.first} and line {exc.second}; "
                                 "YAML keeps only the last one, so remove or merge one of them") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(where, f"is not valid YAML ({problem}{at}); fix the syntax") from None
    return raw


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, second: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first, self.second = key, first, second


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key that appears twice in one mapping (plain YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(key, seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


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
    notes = _drop_unused_blockwise_lists(raw)
    params = collect_params(raw)
    notes += _fix_assistant_weights(raw, params)
    if "search" not in raw and params:
        raise ConfigError(
            "search",
            f"missing; {params[0].name} is a distribution, so add a search: section with trials and "
            "reference_point (see search_spaces/README.md)",
        )
    base = validate_every_value(raw, params)
    _check_one_teacher(raw, params, base)
    search = _parse_search(raw["search"], raw, params) if "search" in raw else None
    name = raw.get("name") or (Path(source_path).stem if source_path else PipelineConfig.name)
    return SweepSpec(name=str(name), raw=raw, params=params, search=search, base=base, source_path=source_path,
                     notes=notes)


def _drop_unused_blockwise_lists(raw: dict[str, Any]) -> tuple[str, ...]:
    """In a search space (a file with `search:`), block-wise `student.depths`/`widths` apply only to
    block-wise draws of `student.arch`; a trial of another architecture drops them. A fixed arch that is
    not block-wise (`pxd train SPACE --set student.arch=resnet10t ...`, reproducing such a trial) drops
    them the same way, so the run is the trial's run."""
    from pxd.models import BLOCKWISE_FAMILIES

    student = raw.get("student")
    if "search" not in raw or not isinstance(student, dict) or not isinstance(student.get("arch"), str):
        return ()
    if student["arch"] in BLOCKWISE_FAMILIES:
        return ()
    dropped = [key for key in ("depths", "widths") if student.pop(key, None) is not None]
    return tuple(f"student.{key} dropped: student.arch {student['arch']} is not block-wise (as in the sweep's trials)"
                 for key in dropped)


def _fix_assistant_weights(raw: dict[str, Any], params: tuple[Param, ...]) -> tuple[str, ...]:
    """The assistant has its own job (model compression at the teacher's resolution): a student setting
    that is searched does not reach it. Where the space searches `distill.X` (or an optimiser setting
    `train.X`) and leaves `assistant.distill.X` (`assistant.train.X`) unset, the assistant gets pxd's
    default for X, written into the space, and a note says so."""
    from pxd.config import DistillConfig, StageTrainConfig, TrainConfig

    defaults = {"distill": (DistillConfig(), DistillConfig.__dataclass_fields__),
                "train": (TrainConfig(), StageTrainConfig.__dataclass_fields__)}
    searched = [p.name.split(".", 1) for p in params if p.name.split(".", 1)[0] in defaults]
    # ISRD needs a lower resolution than the teacher's; the assistant works at the teacher's, so its
    # weight never reaches the assistant (pxd.train) and needs no default here
    searched = [(section, key) for section, key in searched if key in defaults[section][1] and key != "isrd"]
    assistant = raw.get("assistant", {})
    if not searched or not isinstance(assistant, dict) or assistant.get("enabled", True) is False:
        return ()  # a malformed assistant section is named by parse_dataclass
    raw["assistant"] = assistant
    notes = []
    for section, key in searched:
        own = assistant.setdefault(section, {})
        if isinstance(own, dict) and key not in own:
            own[key] = getattr(defaults[section][0], key)
            notes.append(f"assistant.{section}.{key} = {own[key]} (pxd's default): {section}.{key} is searched for "
                         f"the student only; set assistant.{section}.{key} to choose the assistant's")
    return tuple(notes)


def _check_one_teacher(raw: dict[str, Any], params: tuple[Param, ...], base: PipelineConfig) -> None:
    """A sweep trains one teacher: refuse a space in which a searched value would change it."""
    from pxd.config import StageTrainConfig
    from pxd.pipeline import stage_identities

    teacher = stage_identities(base)["teacher"]
    first = {p.name: p.distribution.first for p in params}
    for param in params:
        if param.condition is not None:
            continue  # block-wise student lists never reach the teacher
        for value, label in param.distribution.probe_values():
            if stage_identities(substitute(raw, params, {**first, param.name: value}))["teacher"] == teacher:
                continue
            section, _, key = param.name.partition(".")
            fix = (f"set teacher.train.{key} to a fixed value for the teacher"
                   if section == "train" and key in StageTrainConfig.__dataclass_fields__
                   else "make it a single value")
            raise ConfigError(
                param.name,
                f"is searched and {value!r} ({label}) would change the teacher, which a sweep trains once "
                f"and shares with every trial; {fix}",
            )


def _absolute_paths(raw: dict[str, Any]) -> dict[str, Any]:
    # Ray Tune runs each trial in its own working directory: a relative dataset path that is right
    # for the user's shell would be wrong there, so resolve it against the directory of the launch.
    for path in _PATH_FIELDS:
        section, key = path.split(".")
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


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    """The Optuna sampler named in `search.sampler`, seeded.

    Constraints reach the samplers the way Optuna 5 reads them: `trial.set_constraint(name, value)`
    before `study.tell` (`orchestrator.searcher`), which tpe, nsga2 and gp use while sampling; random
    and grid ignore them, and then they only decide feasibility on the frontier.
    """
    sampler = spec.require_search().sampler
    cls = _SAMPLER_CLASSES[sampler.name]
    kwargs: dict[str, Any] = {"multivariate": True} if sampler.name == "tpe" else {}
    kwargs.update(sampler.options)
    kwargs["seed"] = sampler.seed
    if sampler.name == "grid":
        kwargs["search_space"] = {p.name: list(p.distribution.values) for p in spec.params}
    with warnings.catch_warnings():
        # multivariate TPE is marked experimental; the user cannot act on it
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(**kwargs)


def constraint_names(spec: SweepSpec) -> tuple[str, ...]:
    """The set constraints (`max_gmacs`, ...), in the order of `constraint_values`."""
    return tuple(spec.require_search().constraints)


def constraint_values(spec: SweepSpec, metrics: dict[str, float]) -> list[float]:
    """One value per set constraint, in Optuna's convention: ≤ 0 means satisfied.

    A metric that is missing or NaN gives +inf: a trial cannot be shown to meet the limit.
    """
    values = []
    for key, limit in spec.require_search().constraints.items():
        metric = registry.constraint_metric(key)
        measured = metrics.get(metric.name)
        if measured is None or math.isnan(measured):
            values.append(math.inf)
        else:
            sign = -1.0 if metric.mode == "max" else 1.0  # min_val_top1: limit − value ≤ 0
            values.append(sign * (float(measured) - limit))
    return values


def is_feasible(spec: SweepSpec, metrics: dict[str, float]) -> bool:
    return all(value <= 0 for value in constraint_values(spec, metrics))


# ---------------------------------------------------------------------------------------------
# the search: section: typed by parse_dataclass, then the checks that span fields


def _parse_search(raw_search: Any, raw: dict[str, Any], params: tuple[Param, ...]) -> SearchConfig:
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
    return replace(
        search,
        sampler=sampler,
        objectives=objectives,
        constraints=_check_constraints(search.constraints),
        reference_point=(reference := _check_reference(search.reference_point, objectives, teacher_resolution,
                                                       _student_pixels(raw, params))),
        ideal_point=_check_ideal(search.ideal_point, objectives, reference),
    )


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
        _check_known(key, allowed, "search.sampler.options.", "key")
    checked = replace(sampler, seed=seed)
    probe = SearchConfig(trials=1, sampler=checked)
    try:  # constructing a sampler is cheap and checks option values with Optuna's own messages
        make_sampler(SweepSpec("probe", {}, params, probe, PipelineConfig()))
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


def _check_reference(raw: dict[str, float], objectives: tuple[Objective, ...], teacher_resolution: int,
                     student_pixels: list[float]) -> dict[str, float]:
    metrics = [o.metric for o in objectives]
    for key in raw:
        _check_known(key, metrics, "search.reference_point.", "key")
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
    metrics = [o.metric for o in objectives]
    for key in raw:
        _check_known(key, metrics, "search.ideal_point.", "key")
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
        _check_known(key, keys, "search.constraints.", "key")
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
