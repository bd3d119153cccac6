"""The metric registry: every figure pxd reports about a trained student, defined once.

A row says what a metric is (name, mode, unit, description), where its value comes from (the
student's training, or a `pxd.cost.Cost` field, or a function of the `Cost`), whether a search may use
it as an objective or a hard limit, and how to suggest a hypervolume reference value. Everything else
is derived from this table: the search-space objectives and constraint keys (`max_gmacs`,
`min_val_top1`), the default modes, the final metrics a trial logs and reports, the terminal summary
columns, and the one **primary** metric (`primary_metric()`: `val_top1`), which selects a stage's best
epoch, ranks trials for early stopping and is the accuracy axis of every frontier picture. Adding a
metric is one `Cost` field (if it is measured) plus one `register(...)` row.

`Mode` is the one word for direction, as search spaces and Ray Tune say it: "max" or "min". It is a
`str` enum, so a mode written to YAML, JSON, MLflow or Tune is the same plain word.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pxd.cost import Cost

__all__ = [
    "Mode",
    "MODES",
    "Metric",
    "METRICS",
    "register",
    "unregister",
    "get_metric",
    "primary_metric",
    "objective_metrics",
    "final_metrics",
    "summary_metrics",
    "constraint_keys",
    "constraint_metric",
    "metrics_from_cost",
    "metrics_before_training",
    "hardware_metric",
    "hardware_cv_metric",
    "check_hardware_label",
]



class Mode(str, enum.Enum):
    """Which way a metric is better: "max" (higher) or "min" (lower)."""

    MAX = "max"
    MIN = "min"

    def __str__(self) -> str:  # the plain word in f-strings and str(), as before the enum (Python ≥ 3.11 differs)
        return self.value

    @property
    def sign(self) -> float:
        """The factor that turns a value into one to minimise (Optuna's normalisation): -1 for max, 1 for min."""
        return -1.0 if self is Mode.MAX else 1.0

    @property
    def opposite(self) -> Mode:
        return Mode.MIN if self is Mode.MAX else Mode.MAX

    def better(self, value: float, than: float) -> bool:
        """Whether `value` is strictly better than `than` in this mode."""
        return value > than if self is Mode.MAX else value < than

    def best(self, values: Iterable[float]) -> float:
        return max(values) if self is Mode.MAX else min(values)


MODES = tuple(Mode)
SOURCES = ("training", "cost", "remeasure", "control")


@dataclass(frozen=True)
class Metric:
    name: str
    mode: Mode  # Mode.MAX (higher is better) or Mode.MIN; "max" / "min" are accepted and converted
    unit: str
    description: str
    # "training": set from the student's stage result; "cost": read from the `Cost` (the field of the
    # same name unless `from_cost` computes it); "remeasure": logged later by `pxd remeasure`, never by a trial;
    # "control": from the student's cross-entropy control (`pxd.control`), when a sweep trains one
    source: str = "cost"
    from_cost: Callable[[Cost], float] | None = None
    objective: bool = True  # may be a search objective
    constrainable: bool = True  # a `max_<name>` (mode min) / `min_<name>` (mode max) hard limit applies
    summary: bool = True  # a column of the terminal frontier table
    known_before_training: bool = False  # fixed by architecture and input size alone (gmacs, params, pixels)
    bounds: tuple[float, float] | None = None  # the values the metric can take, when bounded (val_top1: [0, 1])
    ideal: float = 0.0  # the best value it could have: the normalised hypervolume's ideal point
    # the hypervolume reference a space may leave out, when one value is worse than any trial (val_top1: 0.0)
    default_reference: float | None = None
    # how to suggest a reference point value; `{teacher_pixels}` is filled in from the space
    reference_hint: str = "the teacher's {name} (students should cost less)"
    # the metric that selects a stage's best epoch, ranks trials for early stopping and is every frontier
    # picture's accuracy axis; exactly one registered metric is primary (val_top1)
    primary: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"metric {self.name}: mode must be one of {[m.value for m in Mode]}, got {self.mode!r}")
        object.__setattr__(self, "mode", Mode(self.mode))
        if self.source not in SOURCES:
            raise ValueError(f"metric {self.name}: source must be one of {SOURCES}, got {self.source!r}")

    @property
    def constraint_key(self) -> str:
        """`max_gmacs` for a cost, `min_val_top1` for an accuracy: the limit bounds the metric's worse side."""
        return f"{self.mode.opposite.value}_{self.name}"

    def hint(self, teacher_resolution: int) -> str:
        return f"{self.name}: " + self.reference_hint.format(
            name=self.name, teacher_pixels=teacher_resolution * teacher_resolution
        )

    def value(self, cost: Cost) -> float:
        if self.from_cost is not None:
            return float(self.from_cost(cost))
        return float(getattr(cost, self.name))


METRICS: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    """Add a row; a name may be registered once, and one metric only may be primary."""
    if metric.name in METRICS:
        raise ValueError(f"metric {metric.name!r} is already registered")
    if metric.primary and any(m.primary for m in METRICS.values()):
        raise ValueError(f"metric {metric.name!r}: {primary_metric()} is already the primary metric")
    METRICS[metric.name] = metric
    return metric


def unregister(name: str) -> None:
    METRICS.pop(name, None)


def get_metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; registered: {', '.join(METRICS)}") from None


def primary_metric() -> str:
    """The name of the primary metric (`val_top1`): what selects epochs, ranks trials at early-stopping rungs,
    and is the accuracy axis of frontier pictures."""
    primary = [m.name for m in METRICS.values() if m.primary]
    if len(primary) != 1:
        raise LookupError(f"the metric registry needs exactly one primary metric, has {primary or 'none'}")
    return primary[0]


def objective_metrics() -> tuple[str, ...]:
    return tuple(m.name for m in METRICS.values() if m.objective)


def final_metrics() -> tuple[str, ...]:
    """What a trial logs and reports at the end, in registry order."""
    return tuple(METRICS)


def summary_metrics() -> tuple[str, ...]:
    return tuple(m.name for m in METRICS.values() if m.summary)


def constraint_keys() -> dict[str, str]:
    """Constraint key (`max_gmacs`) → metric name (`gmacs`)."""
    return {m.constraint_key: m.name for m in METRICS.values() if m.constrainable}


def constraint_metric(key: str) -> Metric:
    return METRICS[constraint_keys()[key]]


def metrics_from_cost(cost: Cost, training: Mapping[str, float]) -> dict[str, float]:
    """Every metric a trial produces: cost metrics from `cost`, training ones from `training` (one absent
    there, such as `test_top1` without a test split, is left out); `remeasure` ones come later."""
    values: dict[str, float] = {}
    for metric in METRICS.values():
        if metric.source == "cost":
            values[metric.name] = metric.value(cost)
        elif metric.source == "training" and metric.name in training:
            values[metric.name] = float(training[metric.name])
    return values


def metrics_before_training(cost: Cost) -> dict[str, float]:
    """The metrics fixed by architecture and input size alone (`known_before_training`), from a
    `pxd.cost.static_cost`: what a budget can be checked on before anything trains."""
    return {m.name: m.value(cost) for m in METRICS.values() if m.known_before_training and m.source == "cost"}


def _builtin(**fields: Any) -> None:
    register(Metric(**fields))


_builtin(name="val_top1", mode=Mode.MAX, unit="fraction", source="training", bounds=(0.0, 1.0), ideal=1.0,
         primary=True, default_reference=0.0,
         description="top-1 accuracy on the validation split at the selected epoch",
         reference_hint="0.0 (any trial is better)")
_builtin(name="test_top1", mode=Mode.MAX, unit="fraction", source="training", bounds=(0.0, 1.0), ideal=1.0,
         objective=False, constrainable=False,
         description="top-1 accuracy on the held-out test split, evaluated once at the selected epoch; never used to choose")
_builtin(name="gain_vs_ce", mode=Mode.MAX, unit="fraction", source="control", objective=False, constrainable=False,
         bounds=(-1.0, 1.0), ideal=1.0,
         description="val_top1 minus that of the student's cross-entropy control (search.ce_control; pxd.control)")
_builtin(name="control_val_top1", mode=Mode.MAX, unit="fraction", source="control", objective=False,
         constrainable=False, summary=False, bounds=(0.0, 1.0), ideal=1.0,
         description="val_top1 of the student's cross-entropy control: same student, labels only, no teacher")
_builtin(name="gmacs", mode=Mode.MIN, unit="GMACs", known_before_training=True,
         description="multiply-accumulates per image, billions")
_builtin(name="params_m", mode=Mode.MIN, unit="M", known_before_training=True,
         description="parameters, millions")
_builtin(name="pixels", mode=Mode.MIN, unit="px", known_before_training=True, bounds=(1.0, float("inf")),
         description="H × W of the student's input per image",
         reference_hint="{teacher_pixels} (teacher.resolution²)")
_builtin(name="latency_ms", mode=Mode.MIN, unit="ms",
         description="median batch-1 latency on the trial's device")
_builtin(name="throughput_ips", mode=Mode.MAX, unit="images/s", objective=False, constrainable=False, summary=False,
         ideal=float("inf"), description="images per second at the throughput batch size")


# ---------------------------------------------------------------------------------------------------
# Per-hardware latency: one metric per hardware label (`pxd remeasure SWEEP --hardware LABEL`)

_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def check_hardware_label(label: str) -> str:
    """Labels become part of MLflow metric names: letters, digits, `_` and `-` only."""
    if not label or not set(label) <= _LABEL_CHARS or len(label) > 64:
        raise ValueError(f"hardware label {label!r}: use 1-64 letters, digits, '_' or '-', e.g. jetson-orin_trt")
    return label


def hardware_metric(label: str) -> Metric:
    """The registry row of the latency measured on hardware `label` (`latency_ms.<label>`), registered
    the first time it is asked for; a frontier's compute axis for that hardware."""
    name = f"latency_ms.{check_hardware_label(label)}"
    if name not in METRICS:
        register(Metric(name=name, mode=Mode.MIN, unit="ms", source="remeasure", objective=False, constrainable=False,
                        summary=True,
                        description=f"median batch-1 latency on hardware label {label} (pxd remeasure)"))
    return METRICS[name]


def hardware_cv_metric(label: str) -> str:
    """The coefficient of variation of that latency's repeats (`latency_cv.<label>`)."""
    return f"latency_cv.{check_hardware_label(label)}"
