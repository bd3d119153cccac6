"""Distributions in a search-space file, and the parameters they define.

A search-space file is a `pxd.config.PipelineConfig` file in which a leaf value may be a
distribution: a mapping with exactly one of the keys below.

    {choice: [a, b, c]}            categorical (str / int / float / bool / null values)
    {uniform: [lo, hi]}            float in [lo, hi]
    {loguniform: [lo, hi]}         float in [lo, hi], sampled on a log scale (lo > 0)
    {int: [lo, hi], step: k}       whole numbers lo, lo + k, ..., hi (step optional, default 1)

List values (block-wise `student.depths` / `student.widths`) may hold distributions element-wise;
their parameters are named by index (`student.depths.0`). Such parameters are *conditional*: when
`student.arch` is itself searched they are sampled only for block-wise families.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import optuna

from orchestrator.space.fields import finite_float
from pxd.config import PipelineConfig
from pxd.errors import ConfigError
from pxd.models import BLOCKWISE_FAMILIES
from pxd.paths import join, set_path

__all__ = [
    "DISTRIBUTION_KINDS",
    "SEARCHABLE_SECTIONS",
    "BLOCKWISE_CONDITION",
    "Distribution",
    "Param",
    "parse_distribution",
    "collect_params",
    "is_active",
    "suggest_all",
    "DefineByRun",
    "substitute",
    "validate_every_value",
]

DISTRIBUTION_KINDS = ("choice", "uniform", "loguniform", "int")
# One teacher and one dataset per sweep, so the teacher stage is trained once and shared by every trial.
SEARCHABLE_SECTIONS = ("student", "assistant", "distill", "train")
BLOCKWISE_CONDITION = "student.arch in blockwise families"
_BLOCKWISE_LISTS = ("student.depths", "student.widths")
_HOW = "a distribution is a mapping with exactly one of choice, uniform, loguniform, int"


@dataclass(frozen=True)
class Distribution:
    """One searchable value. `values` for choice; `low`/`high` (and `step` for int) for ranges."""

    kind: str
    values: tuple[Any, ...] = ()
    low: float | int | None = None
    high: float | int | None = None
    step: int | None = None

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        # Only the public suggest_* methods: Ray Tune's OptunaSearch wraps the trial and records
        # exactly those calls as the trial's config.
        if self.kind == "choice":
            return trial.suggest_categorical(name, list(self.values))
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=self.step or 1)
        return trial.suggest_float(name, float(self.low), float(self.high), log=self.kind == "loguniform")

    @property
    def first(self) -> Any:
        """The value a probe config uses when another parameter is under test."""
        return self.values[0] if self.kind == "choice" else self.low

    def probe_values(self) -> Iterator[tuple[Any, str]]:
        """Every value worth validating before compute, with how to describe it in an error."""
        if self.kind == "choice":
            for value in self.values:
                yield value, "one of the choices"
            return
        bounds = f"{self.kind} [{self.low}, {self.high}]"
        yield self.low, f"the low end of {bounds}"
        yield self.high, f"the high end of {bounds}"


@dataclass(frozen=True)
class Param:
    """A searched value: its dotted name in the config, its distribution, and when it applies."""

    name: str
    distribution: Distribution
    condition: str | None = None  # BLOCKWISE_CONDITION or None (always sampled)


def is_active(param: Param, values: dict[str, Any]) -> bool:
    """Whether `param` is sampled, given the values chosen so far (`student.arch` first)."""
    if param.condition is None:
        return True
    return values.get("student.arch") in BLOCKWISE_FAMILIES


# ---------------------------------------------------------------------------------------------
# parsing one distribution


def parse_distribution(raw: Any, field: str) -> Distribution:
    """`raw` is a mapping found where a single value was expected; it must be a distribution."""
    kinds = [k for k in DISTRIBUTION_KINDS if k in raw]
    if not kinds:
        raise ConfigError(field, f"expected a single value or a distribution, got {raw!r}; {_HOW}")
    if len(kinds) > 1:
        raise ConfigError(field, f"has both {kinds[0]!r} and {kinds[1]!r}; {_HOW}")
    (kind,) = kinds
    extra = sorted(str(k) for k in raw if k not in (kind, "step"))
    if extra:
        raise ConfigError(field, f"unknown key {extra[0]!r} in a {kind} distribution; {_HOW} (plus step for int)")
    if "step" in raw and kind != "int":
        raise ConfigError(field, "step applies only to int distributions; remove it or use {int: [lo, hi], step: k}")
    if kind == "choice":
        return _parse_choice(raw[kind], field)
    if kind == "int":
        return _parse_int(raw[kind], raw.get("step", 1), field)
    return _parse_float_range(kind, raw[kind], field)


def _parse_choice(values: Any, field: str) -> Distribution:
    if not isinstance(values, list) or not values:
        raise ConfigError(field, f"choice needs a non-empty list of values, got {values!r}; write {{choice: [a, b]}}")
    for value in values:
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise ConfigError(
                field,
                f"choice values must be strings, numbers, booleans or null, got {value!r}; list the plain values",
            )
    seen = set()
    for value in values:
        key = (type(value), value)  # 1 and true are different choices
        if key in seen:
            raise ConfigError(field, f"choice lists {value!r} twice; remove the duplicate")
        seen.add(key)
    return Distribution("choice", values=tuple(values))


def _bounds(bounds: Any, kind: str, field: str) -> tuple[Any, Any]:
    if not isinstance(bounds, list) or len(bounds) != 2:
        raise ConfigError(field, f"{kind} needs two bounds [lo, hi], got {bounds!r}")
    return bounds[0], bounds[1]


def _parse_float_range(kind: str, bounds: Any, field: str) -> Distribution:
    low, high = (_as_float(b, kind, field) for b in _bounds(bounds, kind, field))
    if low >= high:
        raise ConfigError(field, f"{kind} needs lo < hi, got [{low}, {high}]; swap them or use a single value")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(field, f"loguniform needs lo > 0, got {low}; use uniform for ranges that include 0")
    return Distribution(kind, low=low, high=high)


def _as_float(value: Any, kind: str, field: str) -> float:
    number = finite_float(value)
    if number is None:
        raise ConfigError(field, f"{kind} bounds must be finite numbers, got {value!r}")
    return number


def _parse_int(bounds: Any, step: Any, field: str) -> Distribution:
    low, high = _bounds(bounds, "int", field)
    for value in (low, high, step):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(
                field,
                f"int bounds and step must be whole numbers, got {value!r}; use uniform for floats",
            )
    if low >= high:
        raise ConfigError(field, f"int needs lo < hi, got [{low}, {high}]; swap them or use a single value")
    if step < 1:
        raise ConfigError(field, f"step must be ≥ 1, got {step}")
    if (high - low) % step:
        top = low + (high - low) // step * step
        raise ConfigError(field, f"hi − lo = {high - low} is not a multiple of step {step}; use [{low}, {top}]")
    return Distribution("int", low=low, high=high, step=step)


# ---------------------------------------------------------------------------------------------
# finding every distribution in a config dict


def collect_params(raw: dict[str, Any]) -> tuple[Param, ...]:
    """Every distribution in the config part of `raw`, in file order, conditional ones last.

    Keys that are not config fields are left for `PipelineConfig.from_dict` to reject.
    """
    hints = typing.get_type_hints(PipelineConfig)
    found: list[Param] = []
    for section, value in raw.items():
        hint = hints.get(section)
        if hint is None:
            continue
        if not isinstance(value, dict) or not dataclasses.is_dataclass(hint):
            if isinstance(value, dict) and _looks_like_distribution(value):
                _reject_here(section, value)
            continue
        if _looks_like_distribution(value):
            raise ConfigError(
                section,
                "a whole section cannot be a distribution; put distributions on its fields, e.g. student.arch",
            )
        found.extend(_section_params(section, hint, value))
    searches_arch = any(p.name == "student.arch" for p in found)
    fixed_arch = (raw.get("student") or {}).get("arch") if isinstance(raw.get("student"), dict) else None
    # With a searched arch, block-wise list items apply only to block-wise draws; with a fixed arch that
    # is not block-wise (e.g. `pxd train SPACE --set student.arch=resnet10t` reproducing a trial) they
    # never apply: conditional and inactive, dropped from the config like in such a trial.
    conditional = searches_arch or (isinstance(fixed_arch, str) and fixed_arch not in BLOCKWISE_FAMILIES)
    found = [
        Param(p.name, p.distribution, BLOCKWISE_CONDITION)
        if conditional and p.name.rsplit(".", 1)[0] in _BLOCKWISE_LISTS
        else p
        for p in found
    ]
    # define-by-run: student.arch must be sampled before the parameters that depend on it
    return tuple(sorted(found, key=lambda p: p.condition is not None))


def _section_params(section: str, cls: type, values: dict[str, Any], searchable: bool | None = None) -> Iterator[Param]:
    """Distributions in one section; nested sections (`assistant.distill`) are walked too."""
    hints = typing.get_type_hints(cls)
    searchable = section in SEARCHABLE_SECTIONS if searchable is None else searchable
    for key, value in values.items():
        if key not in hints:
            continue
        name = join(section, key)
        nested = _dataclass_of(hints[key])
        if nested is not None and isinstance(value, dict) and not _looks_like_distribution(value):
            yield from _section_params(name, nested, value, searchable)
            continue
        whole = _expects_whole_number(hints[key])
        items = [(name, value)]
        if isinstance(value, list):
            items = [(join(name, index), item) for index, item in enumerate(value)]
        for item_name, item in items:
            if not isinstance(item, dict):
                continue
            if not searchable:
                if _looks_like_distribution(item):
                    _reject_here(item_name, item)
                continue  # a plain mapping where a value belongs: from_dict names it
            distribution = parse_distribution(item, item_name)
            if whole and distribution.kind in ("uniform", "loguniform"):
                raise ConfigError(
                    item_name,
                    f"takes whole numbers; use {{int: [lo, hi], step: k}} or a choice instead of {distribution.kind}",
                )
            yield Param(item_name, distribution)


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a field holds (`X` or `X | None`), else None."""
    candidates = [hint, *typing.get_args(hint)]
    return next((c for c in candidates if isinstance(c, type) and dataclasses.is_dataclass(c)), None)


def _expects_whole_number(hint: Any) -> bool:
    """int, int | None, tuple[int, ...] (and their optional forms)."""
    args = [a for a in typing.get_args(hint) if a is not type(None) and a is not Ellipsis]
    return hint is int or (bool(args) and all(_expects_whole_number(a) for a in args))


def _looks_like_distribution(value: dict[str, Any]) -> bool:
    return any(k in value for k in DISTRIBUTION_KINDS)


def _reject_here(name: str, value: dict[str, Any]) -> None:
    raise ConfigError(
        name,
        f"distributions are allowed only in {', '.join(SEARCHABLE_SECTIONS)} (one teacher and one "
        f"dataset per sweep, so their stages are shared); set a single value here, got {value!r}",
    )


# ---------------------------------------------------------------------------------------------
# sampling a point and turning it into a config


def suggest_all(params: tuple[Param, ...], trial: optuna.Trial) -> dict[str, Any]:
    """Suggest every parameter whose condition holds; returns {dotted name: value}."""
    values: dict[str, Any] = {}
    for param in params:  # conditional parameters come last, after student.arch
        if is_active(param, values):
            values[param.name] = param.distribution.suggest(trial, param.name)
    return values


class DefineByRun:
    """A define-by-run space for Ray Tune's `OptunaSearch(space=...)`. A class, not a closure:
    Tune pickles its searcher, this included, with every experiment checkpoint."""

    def __init__(self, params: tuple[Param, ...]) -> None:
        self.params = params

    def __call__(self, trial: optuna.Trial) -> None:
        suggest_all(self.params, trial)
        return None  # no constants to add: Tune records each suggest_* call as the trial's config


def substitute(raw: dict[str, Any], params: tuple[Param, ...], values: dict[str, Any]) -> PipelineConfig:
    """Put `values` (dotted names) into a copy of `raw` and parse it with `PipelineConfig.from_dict`."""
    config = copy.deepcopy(raw)
    config.pop("search", None)
    for param in params:
        if not is_active(param, values):
            continue
        if param.name not in values:
            raise ConfigError(param.name, "has no sampled value; pass every active parameter")
        set_path(config, param.name, values[param.name])
    searches_arch = any(p.name == "student.arch" for p in params)
    if (searches_arch or any(p.condition is not None for p in params)) and values.get("student.arch") not in BLOCKWISE_FAMILIES:
        config["student"].pop("depths", None)
        config["student"].pop("widths", None)
    return PipelineConfig.from_dict(config)


def validate_every_value(raw: dict[str, Any], params: tuple[Param, ...]) -> PipelineConfig:
    """Check, before any compute, that every value each parameter can take gives a valid config;
    returns the base config (every parameter at its first value).

    Probes change one parameter at a time (each choice; both ends of a range) on a base where every
    other parameter takes its first value; `PipelineConfig.from_dict` does the checking.
    """
    by_name = {p.name: p for p in params}
    base = {p.name: p.distribution.first for p in params}
    try:
        base_config = substitute(raw, params, base)
    except ConfigError as exc:
        param = by_name.get(exc.field)
        if param is None:
            raise
        label = next(param.distribution.probe_values())[1]
        raise ConfigError(param.name, f"{exc.message} ({label})") from None
    blockwise = _first_blockwise_arch(by_name.get("student.arch"), raw)
    for param in params:
        for value, label in param.distribution.probe_values():
            assignment = {**base, param.name: value}
            if param.condition is not None:
                assignment["student.arch"] = blockwise
            try:
                substitute(raw, params, assignment)
            except ConfigError as exc:
                if exc.field == param.name:
                    raise ConfigError(param.name, f"{exc.message} ({label})") from None
                raise ConfigError(param.name, f"{value!r} ({label}) fails {exc.field}: {exc.message}") from None
    return base_config


def _first_blockwise_arch(arch: Param | None, raw: dict[str, Any]) -> str | None:
    if arch is None:
        return None
    blockwise = [v for v in arch.distribution.values if v in BLOCKWISE_FAMILIES]
    student = raw.get("student") or {}
    if not blockwise and (student.get("depths") is not None or student.get("widths") is not None):
        # they would be dropped from every trial without a word
        raise ConfigError(
            "student.depths",
            f"student.arch has no block-wise choice ({', '.join(BLOCKWISE_FAMILIES)}); remove "
            "student.depths/widths or add a block-wise family to the student.arch choices",
        )
    return blockwise[0] if blockwise else None
