"""Hard limits on metrics: a space's `search.constraints` (`max_gmacs: 0.4`, `min_val_top1: 0.7`), and
the one convention every limit is judged by, Optuna's: a constraint value ≤ 0 is met.

A limit's key comes from the metric registry (`pxd.metrics.Metric.constraint_key`): `max_` before a
metric to minimise, `min_` before one to maximise, so a limit always bounds the metric's worse side. A
metric that is missing or NaN cannot be shown to meet a limit: its constraint value is +inf. A trial that
breaks a limit is infeasible: never on the frontier. `pxd select`'s limit flags use `violation` too.

The functions take the space (a `SweepSpec`) or its `search:` section (`SearchConfig`): anything with
the parsed limits as `constraints`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

from orchestrator.space.fields import check_known, number_above
from pxd import metrics as registry
from pxd.errors import ConfigError
from pxd.metrics import Mode

__all__ = [
    "Constrained",
    "parse_constraints",
    "violation",
    "constraint_names",
    "constraint_values",
    "is_feasible",
    "broken_before_training",
]


class Constrained(Protocol):
    """A space with hard limits: `constraints` maps a constraint key (`max_gmacs`) to its limit."""

    @property
    def constraints(self) -> Mapping[str, float]: ...


def parse_constraints(raw: Mapping[str, Any]) -> dict[str, float]:
    """The `search.constraints` section checked: registered keys, finite limits above 0 and within the
    metric's bounds (`min_val_top1` in [0, 1])."""
    keys = registry.constraint_keys()
    limits = {}
    for key, value in raw.items():
        check_known(key, keys, "search.constraints.", "key")
        limits[key] = number_above(value, f"search.constraints.{key}")
        bounds = registry.get_metric(keys[key]).bounds
        if bounds is not None and not bounds[0] <= limits[key] <= bounds[1]:
            raise ConfigError(
                f"search.constraints.{key}",
                f"{keys[key]} takes values in [{bounds[0]:g}, {bounds[1]:g}], got {limits[key]:g}"
                + ("; e.g. 0.7 for 70%" if bounds == (0.0, 1.0) else ""),
            )
    return limits


def violation(mode: Mode, value: float | None, limit: float) -> float:
    """The constraint value of `value` against a limit on the worse side of a metric of `mode` (≤ 0: met;
    `min_val_top1` 0.7 at 0.8 gives -0.1); +inf when the value is missing or NaN."""
    if value is None or math.isnan(value):
        return math.inf
    return Mode(mode).sign * (float(value) - limit)


def constraint_names(space: Constrained) -> tuple[str, ...]:
    """The set constraints (`max_gmacs`, ...), in the order of `constraint_values`."""
    return tuple(space.constraints)


def constraint_values(space: Constrained, metrics: Mapping[str, float], *keys: str) -> list[float]:
    """One value per set constraint (or per one of `keys`), in Optuna's convention: ≤ 0 means satisfied."""
    limits = space.constraints
    values = []
    for key in keys or limits:
        metric = registry.constraint_metric(key)
        values.append(violation(metric.mode, metrics.get(metric.name), limits[key]))
    return values


def is_feasible(space: Constrained, metrics: Mapping[str, float]) -> bool:
    return all(value <= 0 for value in constraint_values(space, metrics))


def broken_before_training(space: Constrained, metrics: Mapping[str, float]) -> tuple[list[str], list[float]]:
    """The hard limits a trial breaks on metrics known before training (`gmacs`, `params_m`, `pixels`:
    fixed by architecture and input), readable (`gmacs 0.52 > max_gmacs 0.4`), and its constraint values
    for Optuna (those known; 0, i.e. not shown broken, for the rest)."""
    broken, values = [], []
    for key, limit in space.constraints.items():
        metric = registry.constraint_metric(key)
        if not metric.known_before_training or metric.name not in metrics:
            values.append(0.0)
            continue
        value = violation(metric.mode, metrics[metric.name], limit)
        values.append(value)
        if value > 0:
            relation = "<" if metric.mode is Mode.MAX else ">"
            broken.append(f"{metric.name} {metrics[metric.name]:.6g} {relation} {key} {limit:g}")
    return broken, values
