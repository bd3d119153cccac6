"""The `search.sampler` section: the Optuna sampler that draws a sweep's trials.

`SAMPLERS` has one row per sampler a space may name: its Optuna class, the constructor arguments pxd
sets unless the space's `options` set them, and whether it samples a grid of the parameters' choices.
Adding a sampler is one row; `check_sampler` then accepts its name and checks its options against the
class's own constructor, and `sampler_for` builds it, seeded.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import optuna

from orchestrator.space.distributions import Param
from orchestrator.space.fields import check_known, whole_number
from pxd.errors import ConfigError

__all__ = ["Sampler", "SAMPLERS", "SamplerConfig", "check_sampler", "sampler_for"]


@dataclass(frozen=True)
class Sampler:
    """A sampler a space may name in `search.sampler.name`."""

    cls: type[optuna.samplers.BaseSampler]
    defaults: Mapping[str, Any] = field(default_factory=dict)  # set unless the space's options set them
    grid: bool = False  # tries every combination of the parameters' choices: each must be a choice


SAMPLERS: dict[str, Sampler] = {
    "tpe": Sampler(optuna.samplers.TPESampler, {"multivariate": True}),
    "nsga2": Sampler(optuna.samplers.NSGAIISampler),
    "gp": Sampler(optuna.samplers.GPSampler),
    "random": Sampler(optuna.samplers.RandomSampler),
    "grid": Sampler(optuna.samplers.GridSampler, grid=True),
}
# Arguments sampler_for sets itself; everything else in a sampler's constructor may go in options.
_RESERVED = ("self", "seed", "constraints_func", "search_space")


@dataclass(frozen=True)
class SamplerConfig:
    name: str = "tpe"  # one of SAMPLERS
    seed: int | None = None  # None: the space's top-level seed
    options: dict[str, Any] = field(default_factory=dict)  # passed to the Optuna sampler


def sampler_for(sampler: SamplerConfig, params: Sequence[Param]) -> optuna.samplers.BaseSampler:
    """The Optuna sampler `sampler` names, seeded (a grid sampler: over every parameter's choices).

    Constraints reach the samplers the way Optuna 5 reads them: `trial.set_constraint(name, value)`
    before `study.tell` (`orchestrator.driver.searcher`), which tpe, nsga2 and gp use while sampling; random
    and grid ignore them, and then they only decide feasibility on the frontier.
    """
    row = SAMPLERS[sampler.name]
    kwargs: dict[str, Any] = {**row.defaults, **sampler.options, "seed": sampler.seed}
    if row.grid:
        kwargs["search_space"] = {p.name: list(p.distribution.values) for p in params}
    with warnings.catch_warnings():
        # multivariate TPE is marked experimental; the user cannot act on it
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return row.cls(**kwargs)


def check_sampler(sampler: SamplerConfig, default_seed: int, params: Sequence[Param]) -> SamplerConfig:
    """The section checked (name, seed, options by the sampler's own constructor), its seed filled in."""
    if sampler.name not in SAMPLERS:
        raise ConfigError("search.sampler.name", f"unknown sampler {sampler.name!r}; use one of {', '.join(SAMPLERS)}")
    seed = whole_number(default_seed if sampler.seed is None else sampler.seed, "search.sampler.seed", minimum=0)
    if SAMPLERS[sampler.name].grid:
        others = [name for name, row in SAMPLERS.items() if not row.grid]
        alternatives = f"{', '.join(others[:-1])} or {others[-1]}"
        for param in params:
            if param.distribution.kind != "choice":
                raise ConfigError(
                    param.name,
                    f"the {sampler.name} sampler needs every parameter to be a choice, this is "
                    f"{param.distribution.kind}; make it {{choice: [...]}} or use {alternatives}",
                )
    allowed = [p for p in inspect.signature(SAMPLERS[sampler.name].cls).parameters if p not in _RESERVED]
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

