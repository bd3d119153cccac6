"""Search-space files → a typed, validated `SweepSpec`.

A search-space file is a `pxd train` config (`pxd.config.PipelineConfig`) in which values of the
student, assistant, distill and train sections may be distributions (`orchestrator.space.distributions`),
plus a `search:` section (trials, sampler, objectives, constraints, reference point, resources),
parsed by the same typed parser (`pxd.config.parse_dataclass`) into `SearchConfig`.
Everything is validated here, before any compute: every value a distribution can take is checked
with `PipelineConfig.from_dict`, so a bad choice fails at load time and not in trial 37.
Metric facts (modes, constraint keys, reference hints) come from the registry, `pxd.metrics`.
The format is documented for users in `search_spaces/README.md`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

from orchestrator.space.constraints import (  # re-exported: a trial's feasibility is a question to its space
    broken_before_training,
    constraint_names,
    constraint_values,
    is_feasible,
)
from orchestrator.space.distributions import (
    DefineByRun,
    Param,
    collect_params,
    substitute,
    suggest_all,
    validate_every_value,
)
from orchestrator.space.fields import check_known
from orchestrator.space.samplers import SAMPLERS, SamplerConfig, sampler_for
from orchestrator.space.search import (  # re-exported: the search section's types belong to a SweepSpec
    LatencyConfig,
    Objective,
    ResourcesConfig,
    SearchConfig,
    optuna_directions,
    parse_search,
)
from pxd.config import DistillConfig, PipelineConfig, StageTrainConfig, TrainConfig
from pxd.errors import ConfigError
from pxd.metrics import Mode
from pxd.models import BLOCKWISE_FAMILIES
from pxd.paths import set_path
from pxd.pipeline import stage_identities

__all__ = [
    "SAMPLERS",
    "check_sweep_name",
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
    "broken_before_training",
]

_PATH_FIELDS = ("dataset.path", "dataset.cache_dir", "teacher.checkpoint", "student.checkpoint")


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
    def objective_modes(self) -> tuple[Mode, ...]:
        return self.require_search().objective_modes

    @property
    def constraints(self) -> Mapping[str, float]:
        """The hard limits, constraint key → limit (`orchestrator.space.constraints` judges them)."""
        return self.require_search().constraints

    def fixed_config(self) -> PipelineConfig:
        """The single-point config of a file without distributions (what `pxd train` runs)."""
        if self.params:
            raise ConfigError(
                self.params[0].name,
                "is a distribution; run this search space with `pxd sweep`, or set a single value to use `pxd train`",
            )
        return self.base


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
        raw = _safe_load_unique(text)
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


def _safe_load_unique(text: str) -> Any:
    """`yaml.safe_load`, refusing duplicate keys: the same steps as PyYAML's own `load`."""
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


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
        check_known(key, sections, "", "top-level key")
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
    search = parse_search(raw["search"], raw, params) if "search" in raw else None
    name = raw.get("name") or (Path(source_path).stem if source_path else PipelineConfig.name)
    check_sweep_name(str(name), "name")
    return SweepSpec(name=str(name), raw=raw, params=params, search=search, base=base, source_path=source_path,
                     notes=notes)


def check_sweep_name(name: Any, field: str) -> None:
    """A space's `name` (the MLflow experiment, and the prefix of its sweeps' folders) or a `--name` (the
    sweep's folder under `<root>/sweeps/`, its Optuna study and parent run): one path segment, printable."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(field, f"expected a non-empty name, got {name!r}")
    if "/" in name or "\\" in name or set(name) == {"."} or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ConfigError(field, f"{name!r} would not be one folder name: use letters, digits, spaces, '.', '_' "
                                 "and '-', without '/' or '\\' (e.g. quickstart-laptop)")


def _drop_unused_blockwise_lists(raw: dict[str, Any]) -> tuple[str, ...]:
    """In a search space (a file with `search:`), block-wise `student.depths`/`widths` apply only to
    block-wise draws of `student.arch`; a trial of another architecture drops them. A fixed arch that is
    not block-wise (`pxd train SPACE --set student.arch=resnet10t ...`, reproducing such a trial) drops
    them the same way, so the run is the trial's run."""
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
# the sampler (`orchestrator.space.samplers`); constraints are `orchestrator.space.constraints`'s


def make_sampler(spec: SweepSpec) -> optuna.samplers.BaseSampler:
    """The Optuna sampler of the space's `search.sampler`, seeded (`orchestrator.space.samplers.sampler_for`)."""
    return sampler_for(spec.require_search().sampler, spec.params)
