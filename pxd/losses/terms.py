"""The loss-term registry: every term pxd can train with, registered once, by its own file.

A row (`LossTerm`) says what a term is: its name, which is also its weight field in the `distill:`
section, that field's default, any setting the term reads besides its weight (KD's `temperature`), when
the term applies (with no upstream, as the teacher trains; only below the upstream's resolution), what
it checks before any compute, and `build`, the module that computes its unweighted value from a stage's
taps (holding any adapter it trains). Everything else is derived from this table: the fields of
`pxd.config.DistillConfig` (names, defaults, their checks), a stage's active terms and weights
(`stage_loss_weights`, hence its stage key), the modules the `Distiller` builds, and the order it sums
them in.

**Adding a loss term is one new file under `pxd/losses/`** holding its loss function, its module and one
`register(LossTerm(...))` call. Every module of the package is imported the first time the table is read
(`loss_terms`), so nothing else lists the terms.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from pxd.types import TapInfo

__all__ = ["TermContext", "Setting", "LossTerm", "LOSS_TERMS", "register", "loss_terms", "term", "stage_loss_weights"]


@dataclass(frozen=True)
class TermContext:
    """What a term's module may size itself from when a stage is built."""

    student: TapInfo
    teacher: TapInfo | None
    student_resolution: int
    teacher_resolution: int
    settings: Mapping[str, float] = field(default_factory=dict)  # the active terms' settings (`Setting`)


@dataclass(frozen=True)
class Setting:
    """A number a term reads from the `distill:` section besides its weight; it must be > 0."""

    name: str
    default: float
    doc: str = ""


@dataclass(frozen=True)
class LossTerm:
    name: str  # the weight field in `distill:` (and `assistant.distill:`), the key of the stage's loss
    default: float  # the weight field's default; 0 leaves the term off unless a user sets it
    # context → module; module(student_taps, teacher_taps, labels, teacher_image) → unweighted scalar
    build: Callable[[TermContext], nn.Module]
    # Where the term comes among the others: its field's place in `distill:`, its loss's place in a stage's
    # losses and in their sum (a float sum depends on its order).
    order: int
    doc: str = ""  # what the weight means, shown in `DistillConfig`'s documentation
    # The stage's weight from the section's values (by field name); None: the term's own field.
    weight: Callable[[Mapping[str, float]], float] | None = None
    # The weight in a stage that trains with no upstream (the teacher; whatever `distill:` says); None: the
    # term applies only to stages distilled from an upstream.
    without_upstream: float | None = None
    # Only a stage at a lower resolution than its upstream's can use the term (ISRD reconstructs pixels).
    needs_lower_resolution: bool = False
    settings: tuple[Setting, ...] = ()
    # Run on the stage's tap shapes (built on the meta device) before any compute; raises `ConfigError`
    # when the stage cannot use the term (e.g. every feature map is 1×1).
    check: Callable[[TermContext], object] | None = None
    paper: str = ""
    # The largest weight that means what `doc` says, and what to tell a user who sets more; None: no limit.
    maximum: float | None = None
    above_maximum: str = ""

    def stage_weight(self, values: Mapping[str, float]) -> float:
        return float(self.weight(values) if self.weight is not None else values[self.name])


class TermTable:
    """The registered terms by name; the package's modules are imported the first time it is read."""

    def __init__(self, package: str) -> None:
        self.package = package
        self.rows: dict[str, LossTerm] = {}  # by name, as registered
        self.imported = False

    def register(self, row: LossTerm) -> LossTerm:
        """Add a row; a name, and a place in the order, may be registered once."""
        taken = {other.order: other.name for other in self.rows.values()}
        if row.name in self.rows:
            raise ValueError(f"loss term {row.name!r} is already registered")
        if row.order in taken:
            raise ValueError(f"loss term {row.name!r}: order {row.order} is already {taken[row.order]!r}'s")
        self.rows[row.name] = row
        return row

    def _import_every_term(self) -> None:
        if self.imported:
            return
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self.package}.{module.name}")
        self.imported = True

    def __iter__(self) -> Iterator[LossTerm]:
        self._import_every_term()
        return iter(sorted(self.rows.values(), key=lambda row: row.order))

    def __getitem__(self, name: str) -> LossTerm:
        self._import_every_term()
        try:
            return self.rows[name]
        except KeyError:
            raise KeyError(f"no loss term {name!r}; the table has {[row.name for row in self]}") from None

    def __contains__(self, name: object) -> bool:
        self._import_every_term()
        return name in self.rows


LOSS_TERMS = TermTable(__name__.rpartition(".")[0])
register = LOSS_TERMS.register


def loss_terms() -> tuple[LossTerm, ...]:
    """Every registered term, in order."""
    return tuple(LOSS_TERMS)


def term(name: str) -> LossTerm:
    """The table's row for `name`."""
    return LOSS_TERMS[name]


def stage_loss_weights(
    distill: Any, *, distilling: bool, student_resolution: int, teacher_resolution: int
) -> dict[str, float]:
    """The weight of every term a stage trains with (only those > 0), plus the settings of those terms.

    `distill` is the stage's `DistillConfig`. Plain training (no upstream: the teacher stage, a
    cross-entropy baseline) takes each term's `without_upstream` weight (``{"ce": 1.0}``), whatever
    `distill` says, so the teacher never depends on a distillation setting.
    """
    rows = loss_terms()
    if not distilling or distill is None:
        return {row.name: row.without_upstream for row in rows if row.without_upstream is not None}
    values = {f.name: getattr(distill, f.name) for f in fields(distill)}
    weights: dict[str, float] = {}
    for row in rows:
        if row.needs_lower_resolution and student_resolution >= teacher_resolution:
            continue
        value = row.stage_weight(values)
        if value > 0:
            weights[row.name] = value
    for row in rows:
        if row.name in weights:
            weights.update({setting.name: float(values[setting.name]) for setting in row.settings})
    return weights
