"""Pareto frontier and hypervolume of a sweep's trials.

A trial is **on the frontier** when no other completed, full-budget, feasible trial of the sweep
is at least as good on every objective and better on one (a trial stopped early is PRUNED, not
COMPLETE, so COMPLETE means full budget). As in Optuna (``optuna/study/_multi_objective.py``)
ineligible trials are dropped, every mode is normalised to minimisation and only then is dominance
computed: the dominance and hypervolume routines are `orchestrator.results.pareto`'s.

This module takes plain rows (no Ray, no MLflow) so it can be used and tested alone.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.results.pareto import (
    as_modes,
    dominates,
    hypervolume,
    hypervolume_min,
    non_dominated_mask,
    normalise,
)
from pxd.metrics import Mode, summary_metrics

__all__ = [
    "TrialRow",
    "trial_outcomes",
    "eligible",
    "hypervolume_of_rows",
    "hypervolume_box",
    "IncrementalFrontier",
    "frontier_table",
    "table_to_json",
    "write_table",
    "format_table",
]

Objectives = Sequence[tuple[str, str]]  # [(metric, mode), ...]; a mode is a `Mode` or its word


@dataclass
class TrialRow:
    """One trial of a sweep as the frontier sees it."""

    trial_id: str
    run_id: str | None
    metrics: dict[str, float]
    params: dict[str, Any]
    state: str  # "COMPLETE", "FAILED", "PRUNED" (stopped early or infeasible before training) or "RUNNING"
    feasible: bool = True
    model_uri: str | None = None
    arch: str | None = None  # the student's architecture, for people reading the table


def _split(objectives: Objectives) -> tuple[list[str], list[Mode]]:
    names = [name for name, _ in objectives]
    if not names:
        raise ValueError("objectives: give at least one, e.g. [('val_top1', 'max')]")
    if len(set(names)) != len(names):
        raise ValueError(f"objectives: each metric may appear once, got {names}")
    return names, as_modes([mode for _, mode in objectives])


def _is_eligible(row: TrialRow, names: Sequence[str]) -> bool:
    if row.state != "COMPLETE" or not row.feasible:
        return False
    return all(name in row.metrics and not math.isnan(float(row.metrics[name])) for name in names)


def eligible(rows: Sequence[TrialRow], objectives: Objectives) -> list[TrialRow]:
    """Rows that may be on the frontier: COMPLETE (ran its full budget), feasible, no objective NaN."""
    names, _ = _split(objectives)
    return [row for row in rows if _is_eligible(row, names)]


def _points_min(rows: Sequence[TrialRow], objectives: Objectives) -> np.ndarray:
    names, modes = _split(objectives)
    raw = np.array([[float(row.metrics[name]) for name in names] for row in rows], dtype=float)
    return normalise(raw.reshape(len(rows), len(names)), modes)


def _best_first(rows: Sequence[TrialRow], points_min: np.ndarray) -> list[int]:
    # First objective decides; the others and the trial id only break ties, for a stable order.
    return sorted(range(len(rows)), key=lambda i: (*points_min[i].tolist(), rows[i].trial_id))


def _reference_vector(objectives: Objectives, reference: Mapping[str, float]) -> list[float]:
    names, _ = _split(objectives)
    missing = [name for name in names if name not in reference]
    if missing:
        raise ValueError(f"reference_point.{missing[0]}: missing; give a value for every objective {names}")
    return [float(reference[name]) for name in names]


def hypervolume_of_rows(
    rows: Sequence[TrialRow], objectives: Objectives, reference: Mapping[str, float]
) -> float:
    """Hypervolume of the eligible rows; reference in original metric units (``hypervolume``)."""
    vector = _reference_vector(objectives, reference)
    candidates = eligible(rows, objectives)
    names, modes = _split(objectives)
    raw = [[float(row.metrics[name]) for name in names] for row in candidates]
    return hypervolume(np.array(raw, dtype=float).reshape(-1, len(names)), modes, vector)


def hypervolume_box(objectives: Objectives, reference: Mapping[str, float], ideal: Mapping[str, float]) -> float:
    """Volume of the box between the reference and the ideal point: what a hypervolume is a fraction of."""
    names, modes = _split(objectives)
    volume = 1.0
    for name, mode in zip(names, modes):
        span = mode.sign * (reference[name] - ideal[name])
        if not math.isfinite(span) or span <= 0:
            raise ValueError(f"ideal_point.{name}: {ideal[name]} must be better than the reference {reference[name]}")
        volume *= span
    return volume


def frontier_table(
    rows: Sequence[TrialRow], objectives: Objectives, reference: Mapping[str, float] | None,
    ideal: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Every eligible row with its ``on_frontier`` flag, frontier rows first, plus the hypervolume.

    Each table row is ``{trial_id, run_id, model_uri, on_frontier, metrics: {...}, params: {...}}``
    (metrics and params stay separate so a param can never shadow a metric of the same name).
    ``hypervolume`` is None when no reference point is given; ``hypervolume_normalised`` (the fraction
    of the box between the reference and ``ideal``, in [0, 1]) is None without both.
    """
    names, modes = _split(objectives)
    candidates = eligible(rows, objectives)
    points = _points_min(candidates, objectives) if candidates else np.zeros((0, len(names)))
    mask = non_dominated_mask(points) if candidates else np.zeros(0, dtype=bool)
    order = _best_first(candidates, points)
    order = [i for i in order if mask[i]] + [i for i in order if not mask[i]]
    table_rows = [
        {
            "trial_id": candidates[i].trial_id,
            "run_id": candidates[i].run_id,
            "model_uri": candidates[i].model_uri,
            "arch": candidates[i].arch,
            "on_frontier": bool(mask[i]),
            "metrics": {key: float(value) for key, value in candidates[i].metrics.items()},
            "params": dict(candidates[i].params),
        }
        for i in order
    ]
    volume = None if reference is None else hypervolume_of_rows(rows, objectives, reference)
    normalised = None
    if volume is not None and ideal is not None:
        normalised = volume / hypervolume_box(objectives, reference, ideal)
    return {
        "objectives": [{"name": n, "mode": d.value} for n, d in zip(names, modes)],
        "reference_point": None if reference is None else dict(reference),
        "ideal_point": None if ideal is None else dict(ideal),
        "hypervolume": volume,
        "hypervolume_normalised": normalised,
        "n_eligible": len(candidates),
        "n_frontier": int(mask.sum()),
        "rows": table_rows,
    }


def _json_safe(value: Any) -> Any:
    # Strict JSON has no Infinity/NaN (browsers and MLflow's viewer reject them): write them as
    # the strings "inf", "-inf", "nan", which float() reads back.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def table_to_json(table: Mapping[str, Any]) -> str:
    """The table as strict JSON text (non-finite floats as strings, other objects via ``str``)."""
    return json.dumps(_json_safe(table), indent=2, allow_nan=False, default=str)


def _metric_columns(table: Mapping[str, Any]) -> list[str]:
    objective_names = [objective["name"] for objective in table["objectives"]]
    others = sorted({key for row in table["rows"] for key in row["metrics"]} - set(objective_names))
    return objective_names + others


# The terminal shows the registry's summary columns; the CSV and JSON keep every metric.


def _summary_columns(table: Mapping[str, Any]) -> list[str]:
    objective_names = [objective["name"] for objective in table["objectives"]]
    present = {key for row in table["rows"] for key in row["metrics"]}
    return objective_names + [m for m in summary_metrics() if m in present and m not in objective_names]


def _param_columns(table: Mapping[str, Any]) -> list[str]:
    return sorted({key for row in table["rows"] for key in row["params"]})


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (str, int, float, bool)):
        return str(value)
    return json.dumps(_json_safe(value), default=str)


def write_table(table: Mapping[str, Any], directory: str | Path) -> list[Path]:
    """Write ``frontier.csv`` (a line per eligible trial, frontier first) and ``frontier.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metric_columns = _metric_columns(table)
    param_columns = _param_columns(table)
    csv_path = directory / "frontier.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["on_frontier", "trial_id", "run_id", "model_uri"]
            + metric_columns
            + [f"params.{name}" for name in param_columns]
        )
        for row in table["rows"]:
            writer.writerow(
                [_cell(row[key]) for key in ("on_frontier", "trial_id", "run_id", "model_uri")]
                + [_cell(row["metrics"].get(name)) for name in metric_columns]
                + [_cell(row["params"].get(name)) for name in param_columns]
            )
    json_path = directory / "frontier.json"
    json_path.write_text(table_to_json(table) + "\n", encoding="utf-8")
    return [csv_path, json_path]


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return _cell(value)


def format_table(table: Mapping[str, Any], max_rows: int | None = None) -> str:
    """Fixed-width text table for terminals; frontier rows are marked ``*`` and listed first."""
    metric_columns = _summary_columns(table)
    param_columns = _param_columns(table)
    header = ["", "trial_id", "run_id"] + metric_columns + param_columns
    shown = table["rows"] if max_rows is None else table["rows"][:max_rows]
    lines = [
        ["*" if row["on_frontier"] else "", _cell(row["trial_id"]), _cell(row["run_id"])]
        + [_short(row["metrics"].get(name)) for name in metric_columns]
        + [_short(row["params"].get(name)) for name in param_columns]
        for row in shown
    ]
    widths = [max(len(cells[c]) for cells in [header, *lines]) for c in range(len(header))]
    text = [
        "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()
        for cells in [header, *lines]
    ]
    hidden = len(table["rows"]) - len(shown)
    if hidden > 0:
        text.append(f"... {hidden} more eligible trials not shown")
    objectives = ", ".join(f"{o['name']} ({o['mode']})" for o in table["objectives"])
    volume = table.get("hypervolume")
    volume_text = "n/a (no reference point)" if volume is None else f"{volume:.6g}"
    text.append(
        f"{table['n_frontier']} on the frontier of {table['n_eligible']} eligible trials; "
        f"objectives: {objectives}; hypervolume: {volume_text}"
    )
    return "\n".join(text)


class IncrementalFrontier:
    """The front and hypervolume of a growing set of points, updated per point (a sweep's live view).

    Adding a point costs one dominance check against the current front and, only when the front
    changes, Optuna's exact hypervolume of the front: not a recomputation over every trial. Agrees
    exactly with `frontier_table` on the same eligible points (tested).
    """

    def __init__(self, objectives: Objectives, reference: Mapping[str, float],
                 ideal: Mapping[str, float] | None = None) -> None:
        names, self._modes = _split(objectives)
        self._reference = normalise(np.array([_reference_vector(objectives, reference)]), self._modes)[0]
        self._box = hypervolume_box(objectives, reference, ideal) if ideal is not None else None
        self._names = names
        self._front = np.zeros((0, len(names)))
        self.hypervolume = 0.0

    @property
    def size(self) -> int:
        return len(self._front)

    @property
    def normalised(self) -> float | None:
        return None if self._box is None else self.hypervolume / self._box

    def add(self, metrics: Mapping[str, float]) -> bool:
        """Add one eligible trial's metrics; returns whether the front changed."""
        point = normalise(np.array([[float(metrics[name]) for name in self._names]]), self._modes)[0]
        if np.isnan(point).any():
            return False
        front = self._front
        if len(front):
            if dominates(front, point).any():
                return False
            front = front[~dominates(point, front)]
        self._front = np.vstack([front, point])
        self.hypervolume = hypervolume_min(self._front, self._reference)
        return True


def trial_outcomes(rows: list[TrialRow]) -> dict[str, str]:
    """Tune trial id → how the trial ended. A retried trial has a run per attempt (`orchestrator.driver.attempts`):
    it is COMPLETE if an attempt completed, else its latest attempt's state (rows come newest first)."""
    outcomes: dict[str, str] = {}
    for row in rows:
        if outcomes.get(row.trial_id) != "COMPLETE" and (row.trial_id not in outcomes or row.state == "COMPLETE"):
            outcomes[row.trial_id] = row.state
    return outcomes
