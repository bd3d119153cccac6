"""The metric registry: every figure pxd reports about a trained student, defined once.

A row says what a metric is (name, mode, unit, description), where its value comes from (the
student's training, or a `pxd.cost.Cost` field, or a function of the `Cost`), whether a search may use
it as an objective or a hard limit, and how to suggest a hypervolume reference value. Everything else
is derived from this table: the search-space objectives and constraint keys (`max_gmacs`,
`min_val_top1`), the default modes, the final metrics a trial logs and reports, the terminal summary
columns. Adding a metric is one `Cost` field (if it is measured) plus one `register(...)` row.

`mode` is the one word for direction, as search spaces and Ray Tune say it: "max" or "min".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pxd.cost import Cost

__all__ = [
    "MODES",
    "Metric",
    "METRICS",
    "register",
    "unregister",
    "get_metric",
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

MODES = ("max", "min")
SOURCES = ("training", "cost", "remeasure")


@dataclass(frozen=True)
class Metric:
    name: str
    mode: str  # "max" (higher is better) or "min"
    unit: str
    description: str
    # "training": set from the student's stage result; "cost": read from the `Cost` (the field of the
    # same name unless `from_cost` computes it); "remeasure": logged later by `pxd remeasure`, never by a trial
    source: str = "cost"
    from_cost: Callable[[Cost], float] | None = None
    objective: bool = True  # may be a search objective
    constrainable: bool = True  # a `max_<name>` (mode min) / `min_<name>` (mode max) hard limit applies
    summary: bool = True  # a column of the terminal frontier table
    known_before_training: bool = False  # fixed by architecture and input size alone (gmacs, params, pixels)
    bounds: tuple[float, float] | None = None  # the values the metric can take, when bounded (val_top1: [0, 1])
    ideal: float = 0.0  # the best value it could have: the normalised hypervolume's ideal point
    # how to suggest a reference point value; `{teacher_pixels}` is filled in from the space
    reference_hint: str = "the teacher's {name} (students should cost less)"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"metric {self.name}: mode must be one of {MODES}, got {self.mode!r}")
        if self.source not in SOURCES:
            raise ValueError(f"metric {self.name}: source must be one of {SOURCES}, got {self.source!r}")

    @property
    def constraint_key(self) -> str:
        """`max_gmacs` for a cost, `min_val_top1` for an accuracy."""
        return f"{'min' if self.mode == 'max' else 'max'}_{self.name}"

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
    """Add a row; a name may be registered once."""
    if metric.name in METRICS:
        raise ValueError(f"metric {metric.name!r} is already registered")
    METRICS[metric.name] = metric
    return metric


def unregister(name: str) -> None:
    METRICS.pop(name, None)


def get_metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; registered: {', '.join(METRICS)}") from None


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


_builtin(name="val_top1", mode="max", unit="fraction", source="training", bounds=(0.0, 1.0), ideal=1.0,
         description="top-1 accuracy on the validation split at the selected epoch",
         reference_hint="0.0 (any trial is better)")
_builtin(name="test_top1", mode="max", unit="fraction", source="training", bounds=(0.0, 1.0), ideal=1.0,
         objective=False, constrainable=False,
         description="top-1 accuracy on the held-out test split, evaluated once at the selected epoch; never used to choose")
_builtin(name="gmacs", mode="min", unit="GMACs", known_before_training=True,
         description="multiply-accumulates per image, billions")
_builtin(name="params_m", mode="min", unit="M", known_before_training=True,
         description="parameters, millions")
_builtin(name="pixels", mode="min", unit="px", known_before_training=True, bounds=(1.0, float("inf")),
         description="H × W of the student's input per image",
         reference_hint="{teacher_pixels} (teacher.resolution²)")
_builtin(name="latency_ms", mode="min", unit="ms",
         description="median batch-1 latency on the trial's device")
_builtin(name="throughput_ips", mode="max", unit="images/s", objective=False, constrainable=False, summary=False,
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
        register(Metric(name=name, mode="min", unit="ms", source="remeasure", objective=False, constrainable=False,
                        summary=True,
                        description=f"median batch-1 latency on hardware label {label} (pxd remeasure)"))
    return METRICS[name]


def hardware_cv_metric(label: str) -> str:
    """The coefficient of variation of that latency's repeats (`latency_cv.<label>`)."""
    return f"latency_cv.{check_hardware_label(label)}"
