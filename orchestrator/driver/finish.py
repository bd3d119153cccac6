"""A sweep's end: its frontier and totals on the parent run, frontier tags on trial runs, the terminal summary."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mlflow.entities import Metric

from orchestrator.driver.options import SweepOutcome
from orchestrator.driver.reconcile import close_lost_trials
from orchestrator.results import schema
from orchestrator.results.artifacts import log_frontier
from orchestrator.results.frontier import TrialRow, format_table, frontier_table, trial_outcomes
from orchestrator.results.schema import Tag
from orchestrator.tracking import credentials
from orchestrator.tracking.server import experiment_page
from orchestrator.tracking.watch import RunsWatch
from pxd.control import CONTROL
from pxd.metrics import primary_metric

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

__all__ = ["SweepWatch", "distillation_paid", "finish_sweep", "summary"]


class SweepWatch:
    """A sweep's trial runs and the stage runs it trained, read by the driver as they end (`RunsWatch`), so
    that its end reads only the last few: the end then takes about as long at 1,000 trials as at 100."""

    def __init__(self, client: MlflowClient, parent: Run) -> None:
        self.trials = RunsWatch(client, lambda: parent.info.experiment_id, schema.trial_filter(parent.info.run_id))
        stages: list[str] = []

        def stages_experiment() -> str | None:  # created by the first stage stored: looked up until then
            if not stages:
                experiment = client.get_experiment_by_name(schema.STAGES_EXPERIMENT)
                if experiment is not None:
                    stages.append(experiment.experiment_id)
            return stages[0] if stages else None

        self.stages = RunsWatch(client, stages_experiment, _trained_stages_filter(parent.data.tags[Tag.SWEEP]))

    def start(self) -> SweepWatch:
        self.trials.start()
        self.stages.start()
        return self

    def stop(self) -> None:
        self.trials.stop()
        self.stages.stop()


def finish_sweep(client: MlflowClient, parent_run_id: str, stopped: dict[str, str] | None = None, *,
                 watched: SweepWatch | None = None) -> tuple[dict[str, Any], list[TrialRow]]:
    """Frontier of the sweep → the parent run (table, plots, hypervolume) and tags on frontier runs.
    `stopped`: Tune trial id → why, for trials stopped before their final result (Optuna: PRUNED).
    `watched`: the sweep's trial and stage runs as the driver read them while they ended (`SweepWatch`);
    without it, both are read back here (a watch never started reads everything at its end)."""
    parent = client.get_run(parent_run_id)
    objectives, reference, ideal = schema.sweep_objectives(parent)
    watched = watched or SweepWatch(client, parent)
    runs = watched.trials.final()
    rows = [schema.read_trial_row(run) for run in runs]  # as `schema.collect_rows`, keeping the runs' tags
    close_lost_trials(client, rows, stopped or {})
    table = frontier_table(rows, objectives, reference, ideal)
    on_front = {row["run_id"] for row in table["rows"] if row["on_frontier"]}
    _tag_frontier(client, runs, rows, on_front)
    x_metrics = tuple(m for m, _ in objectives if m != primary_metric()) or ("gmacs",)
    log_frontier(client, parent, table, "frontier", png_axes=x_metrics)
    outcomes = trial_outcomes(rows)
    counts = {state: sum(s == state for s in outcomes.values()) for state in ("COMPLETE", "FAILED", "PRUNED")}
    metric = schema.SweepMetric
    totals = {metric.HYPERVOLUME: float(table["hypervolume"]),
              metric.HYPERVOLUME_NORMALISED: float(table["hypervolume_normalised"]),
              metric.FRONTIER_SIZE: float(len(on_front)), metric.TRIALS_COMPLETE: float(counts["COMPLETE"]),
              metric.TRIALS_FAILED: float(counts["FAILED"]), metric.TRIALS_STOPPED: float(counts["PRUNED"])}
    totals.update(_stage_totals(rows, watched.stages.final()))
    now = int(time.time() * 1000)
    client.log_batch(parent_run_id, metrics=[Metric(key, value, now, 0) for key, value in totals.items()])
    client.set_terminated(parent_run_id, status="FINISHED")
    return table, rows


def _tag_frontier(client: MlflowClient, runs: list[Run], rows: list[TrialRow], on_front: set[str]) -> None:
    """`Tag.ON_FRONTIER` on every COMPLETE trial run, set only where it changes: a trial writes "false" when it
    completes (`schema.log_trial_result`), so a sweep's end sets its frontier's runs, not every trial's (one
    request each: a thousand at the end of a 1,000-trial sweep, bench/scale.py)."""
    tagged = {run.info.run_id: run.data.tags.get(Tag.ON_FRONTIER) for run in runs}
    for row in rows:
        wanted = str(row.run_id in on_front).lower()
        if row.state == "COMPLETE" and tagged.get(row.run_id) != wanted:
            client.set_tag(row.run_id, Tag.ON_FRONTIER, wanted)


def _trained_stages_filter(sweep: str) -> str:
    """The MLflow filter of the stage runs a sweep trained to the end (in `schema.STAGES_EXPERIMENT`)."""
    return f"tags.`{Tag.SWEEP}` = '{sweep}' and tags.`{Tag.STAGE_COMPLETE}` = 'true'"


def _stage_totals(rows: list[TrialRow], trained: list[Run]) -> dict[str, float]:
    """Stages this sweep trained (teacher warm-up included) and reused, and the training time reuse saved."""
    metric = schema.SweepMetric
    totals = {metric.trained(kind): float(sum(run.data.tags.get(Tag.STAGE) == kind for run in trained))
              for kind in ("teacher", "assistant", "student", CONTROL)}
    totals[metric.STAGES_TRAINED] = float(len(trained))
    totals[metric.STAGES_REUSED] = float(sum(row.metrics.get(metric.STAGES_REUSED, 0.0) for row in rows))
    totals[metric.STAGE_SECONDS_SAVED] = float(sum(row.metrics.get(metric.STAGE_SECONDS_SAVED, 0.0) for row in rows))
    return totals


def distillation_paid(table: Mapping[str, Any]) -> str | None:
    """One line answering "did distillation pay here?" from the frontier points' `gain_vs_ce`
    (search.ce_control), or None when the sweep trained no controls."""
    gains = sorted(row["metrics"]["gain_vs_ce"] for row in table["rows"]
                   if row["on_frontier"] and row["metrics"].get("gain_vs_ce") is not None)
    if not gains:
        return None
    better = sum(gain > 0 for gain in gains)
    return (f"did distillation pay? gain_vs_ce (val_top1 minus the same student trained on labels alone) on the "
            f"{len(gains)} frontier point(s): median {statistics.median(gains):+.3f}, from {gains[0]:+.3f} to "
            f"{gains[-1]:+.3f}; {better} of {len(gains)} above their control")


def summary(outcome: SweepOutcome) -> str:
    lines = [format_table(outcome.table)]
    outcomes = list(trial_outcomes(outcome.rows).values())
    failed, stopped = outcomes.count("FAILED"), outcomes.count("PRUNED")
    lines.append(f"hypervolume {outcome.table['hypervolume_normalised']:.4f} of the reference-to-ideal box "
                 f"({outcome.table['hypervolume']:.6g} in the objectives' units) · frontier "
                 f"{sum(r['on_frontier'] for r in outcome.table['rows'])} of {outcome.table['n_eligible']} eligible"
                 f" · {failed} failed · {stopped} stopped")
    paid = distillation_paid(outcome.table)
    if paid:
        lines.append(paid)
    if failed or stopped:  # raising search.trials by one after a lost trial would otherwise seem to run none
        raised = max(outcome.trials_budget, len(outcomes)) + failed + stopped
        lines.append(f"failed, stopped and infeasible trials count toward search.trials, as in the Optuna study: "
                     f"to run {failed + stopped} more, resume with it raised by as many (--resume --name "
                     f"{outcome.sweep_name} --set search.trials={raised})")
    lines.append(f"sweep {outcome.sweep_name}: parent run {outcome.parent_run_id} (experiment {outcome.experiment_id}) at {outcome.tracking_uri}")
    lines.append(f"MLflow UI: {experiment_page(outcome.ui, outcome.experiment_id)}")
    lines.append(f"frontier runs in the UI: filter  tags.`{Tag.ON_FRONTIER}` = 'true'")
    return credentials.scrub("\n".join(lines))
