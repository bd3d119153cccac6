"""`pxd select SWEEP`: choose a model from the frontier under constraints and register it.

Among the frontier's points (the sweep's own, or a hardware label's after `pxd remeasure`) that meet
every given limit (judged as constraints are, `orchestrator.space.constraints.violation`), the rule
picks the best on the primary metric (the most accurate: `val_top1`); ties go to the lower latency on
the chosen hardware (else `latency_ms`), then fewer `gmacs`, then fewer `pixels`, then the run id, so
the choice is deterministic. The model is registered in the MLflow Model Registry under a name and an alias
(registry stages are deprecated), with tags saying where it came from; `models:/NAME@ALIAS` loads it.

Before a version is registered, the chosen student is checked as it would load
(`orchestrator.results.students.check_student`: pxd's tensor format, its weights against the sha256 on its
trial run); a student that fails is refused naming its run, and one an earlier pxd logged as a pickle is
registered only with `trust_pickles` (`--trust-pickles`).

Every input is checked before anything is read or written (`check_limits`, `check_registry_names`, with
MLflow's own rules for model and alias names), and the choice is made (`choose_for_sweep`) before the
registry is touched (`register`): an error registers nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.results import schema
from orchestrator.results.frontier import frontier_table
from orchestrator.results.hardware import hardware_table
from orchestrator.results.students import PICKLE, check_student
from orchestrator.space.constraints import violation
from pxd.errors import ConfigError
from pxd.metrics import get_metric, hardware_metric, primary_metric

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = ["Limits", "Choice", "check_limits", "check_registry_names", "choose", "choose_for_sweep", "register",
           "select_and_register"]

LATENCY_FLAG = "--max-latency-ms"  # the one limit new hardware (pxd remeasure) can change
_TIES = ("gmacs", "pixels")  # after the primary metric and the latency, in this order


@dataclass(frozen=True)
class Limits:
    max_latency_ms: float | None = None  # on --hardware's label, else the sweep's latency_ms
    max_gmacs: float | None = None
    max_pixels: float | None = None
    min_top1: float | None = None

    def checks(self, latency_metric: str) -> list[tuple[str, str, float]]:
        """(flag, metric, limit) for every limit given; a limit bounds its metric's worse side (the
        registry's mode), as a constraint does."""
        given = [(LATENCY_FLAG, latency_metric, self.max_latency_ms),
                 ("--max-gmacs", "gmacs", self.max_gmacs),
                 ("--max-pixels", "pixels", self.max_pixels),
                 ("--min-top1", primary_metric(), self.min_top1)]
        return [(flag, metric, float(limit)) for flag, metric, limit in given if limit is not None]


def check_limits(limits: Limits) -> None:
    """Each limit given is a finite number in its metric's range; `ConfigError` naming the flag otherwise."""
    for flag, value in (("--max-latency-ms", limits.max_latency_ms), ("--max-gmacs", limits.max_gmacs),
                        ("--max-pixels", limits.max_pixels)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(flag, f"must be a finite number above 0, got {value:g}")
    top1 = limits.min_top1
    if top1 is not None and not (math.isfinite(top1) and 0.0 <= top1 <= 1.0):
        percent = f" (for {top1:g} %, pass {top1 / 100:g})" if 1.0 < top1 <= 100.0 else ""
        raise ConfigError("--min-top1", f"{primary_metric()} is a fraction in [0, 1], got {top1:g}{percent}")


def check_registry_names(name: str | None, alias: str) -> None:
    """The registered model name (None: the default) and the alias, by MLflow's own rules, so that an
    invalid one is refused before a version is registered (MLflow checks the alias only when it is set)."""
    from mlflow.exceptions import MlflowException  # mlflow: imported on first use (start-up cost), as below
    from mlflow.utils import validation

    # MLflow's own (private) validators, where this MLflow has them; an older one checks reserved alias
    # names inside _validate_model_alias_name
    def unchecked(_: str) -> None:
        return None

    _validate_model_name = getattr(validation, "_validate_model_name", unchecked)
    _validate_model_alias_name = getattr(validation, "_validate_model_alias_name", unchecked)
    _validate_model_alias_name_reserved = getattr(validation, "_validate_model_alias_name_reserved", unchecked)

    if name is not None:
        if not name.strip():
            raise ConfigError("--name", "is empty; give a registered model name, or omit --name for "
                                        "<experiment>-student")
        try:
            _validate_model_name(name)
        except MlflowException as exc:
            raise ConfigError("--name", f"{exc.message} Choose another registered model name") from None
    try:
        _validate_model_alias_name(alias)
        _validate_model_alias_name_reserved(alias)
    except MlflowException as exc:
        raise ConfigError("--alias", f"{exc.message} Choose another alias, e.g. champion or edge") from None


@dataclass
class Choice:
    row: dict[str, Any]  # the frontier table row
    why: str
    candidates: int  # feasible frontier points
    frontier: int
    extra: dict[str, Any] = field(default_factory=dict)


def _meets(row: dict[str, Any], metric: str, limit: float) -> bool:
    return violation(get_metric(metric).mode, row["metrics"].get(metric, math.nan), limit) <= 0


def _rank(row: dict[str, Any], metrics: tuple[str, ...]) -> tuple[Any, ...]:
    """Best first on each metric in turn (its registry mode; a missing value last), then the run id."""
    values = row["metrics"]
    return (*(get_metric(m).mode.sign * values[m] if m in values else math.inf for m in metrics), str(row["run_id"]))


def choose(table: dict[str, Any], limits: Limits, latency_metric: str) -> Choice:
    """The frontier point best on the primary metric meeting every limit; ConfigError naming the tightest
    limit if none."""
    front = [r for r in table["rows"] if r["on_frontier"]]
    checks = limits.checks(latency_metric)
    feasible = [r for r in front if all(_meets(r, m, lim) for _, m, lim in checks)]
    if not feasible:
        if not front:
            raise ConfigError("sweep", "its frontier is empty (no complete, feasible trial); nothing to select")
        # the tightest limit: the one that alone rules out the most frontier points
        flag, metric, limit = max(checks, key=lambda c: sum(not _meets(r, c[1], c[2]) for r in front))
        best = get_metric(metric).mode.best(r["metrics"].get(metric, math.nan) for r in front)
        remedy = "relax it (or re-time with pxd remeasure)" if flag == LATENCY_FLAG else "relax it"
        raise ConfigError(flag, f"no frontier point meets every limit; the tightest is {flag} {limit:g}: the best "
                                f"{metric} on the frontier is {best:.4g}; {remedy}")
    chosen = min(feasible, key=lambda r: _rank(r, (primary_metric(), latency_metric, *_TIES)))
    limits_text = ", ".join(f"{flag} {limit:g}" for flag, _, limit in checks) or "no limits"
    why = (f"the most accurate of {len(feasible)} frontier point(s) meeting {limits_text} "
           f"(of {len(front)} on the frontier; ties: lower {latency_metric}, gmacs, pixels)")
    return Choice(row=chosen, why=why, candidates=len(feasible), frontier=len(front))


@dataclass
class SweepChoice:
    """What `choose_for_sweep` decided, all `register` needs."""

    sweep: str  # the sweep's name
    model_name: str  # the registered model to add a version to
    choice: Choice
    objectives: list[str]
    hardware: str | None


def choose_for_sweep(client: MlflowClient, sweep: str, limits: Limits, *, hardware: str | None,
                     name: str | None) -> SweepChoice:
    """The choice on `sweep`'s frontier (on `hardware`'s, if given); only reads from MLflow."""
    check_limits(limits)
    parent = schema.require_sweep_run(client, sweep)
    sweep_name = parent.data.tags.get(schema.Tag.SWEEP, sweep)
    if hardware:
        table = hardware_table(client, parent.info.run_id, hardware)
        latency_metric = hardware_metric(hardware).name
    else:
        objectives, reference, ideal = schema.sweep_objectives(parent)
        table = frontier_table(schema.collect_rows(client, parent), objectives, reference, ideal)
        latency_metric = "latency_ms"
    choice = choose(table, limits, latency_metric)
    model_name = name or f"{client.get_experiment(parent.info.experiment_id).name}-student"
    return SweepChoice(sweep=sweep_name, model_name=model_name, choice=choice,
                       objectives=[o["name"] for o in table["objectives"]], hardware=hardware)


def register(client: MlflowClient, chosen: SweepChoice, alias: str, *, trust_pickles: bool = False) -> dict[str, Any]:
    """Register the chosen student as a new version of `chosen.model_name`, tag it, point `alias` at it; first
    check that it loads safely (`check_student`; `pxd.errors.StudentRefused` naming its run, nothing registered)."""
    check_registry_names(chosen.model_name, alias)
    row, model_name, hardware = chosen.choice.row, chosen.model_name, chosen.hardware
    stored = check_student(row["model_uri"], client.tracking_uri, trust_pickles=trust_pickles)
    if not _registered(client, model_name):
        client.create_registered_model(model_name, description="pxd students selected from a sweep's frontier (pxd select)")
    # MLflow 3: a logged model (models:/m-...) is registered by its model id
    model_id = row["model_uri"].split("/")[-1] if str(row["model_uri"]).startswith("models:/m-") else None
    version = client.create_model_version(model_name, row["model_uri"], run_id=row["run_id"], model_id=model_id)
    resolution = int(round(math.sqrt(row["metrics"]["pixels"])))
    tags = schema.model_version_tags(sweep=chosen.sweep, trial_run=row["run_id"], resolution=resolution,
                                     objectives={name: row["metrics"].get(name) for name in chosen.objectives},
                                     hardware=hardware, why=chosen.choice.why)
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version.version, key, str(value))
    client.set_registered_model_alias(model_name, alias, version.version)
    return {"model_name": model_name, "version": str(version.version), "alias": alias,
            "uri": f"models:/{model_name}@{alias}", "run_id": row["run_id"], "model_uri": row["model_uri"],
            "input_size": resolution, "metrics": row["metrics"], "params": row["params"], "why": chosen.choice.why,
            "hardware": hardware, "pickled": stored == PICKLE}


def select_and_register(client: MlflowClient, sweep: str, limits: Limits, *, hardware: str | None, name: str | None,
                        alias: str, trust_pickles: bool = False) -> dict[str, Any]:
    """Choose, register under `name` with `alias`, tag the version; returns what was done."""
    check_registry_names(name, alias)
    return register(client, choose_for_sweep(client, sweep, limits, hardware=hardware, name=name), alias,
                    trust_pickles=trust_pickles)


def _registered(client: MlflowClient, name: str) -> bool:
    from mlflow.exceptions import MlflowException  # start-up cost

    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False
