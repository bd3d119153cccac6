"""The MLflow run schema: every tag, param and metric name pxd writes, and the paired writer/reader.

This is a user-facing contract (people filter on these names in the MLflow UI; `docs/sweeps.md`
lists them). Names are defined here once; nothing else in pxd spells a `pxd.*` tag.

Runs pxd creates:
- a **sweep** run (parent) per sweep, in the experiment named after the space;
- a **trial** run per trial, a child of its sweep run;
- a **stage** run per stored teacher / assistant / student stage, in experiment `pxd-stages`;
- a **model version** per `pxd select`, in the MLflow Model Registry (`model_version_tags`).

`log_trial_result` writes a trial's final result and `read_trial_row` / `recorded_result` read it back:
what a trial logs is exactly what the frontier reads. The keys of a trial's Tune reports (`ReportKey`)
and the user attributes pxd sets on Optuna trials (`OptunaAttr`) are named here too, with the reports'
writers (`TrialResult.report`, `failed_report`, `over_budget_report`) beside their readers.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.results.frontier import TrialRow
from orchestrator.tracking.artifacts import upload_json
from pxd.errors import ConfigError
from pxd.metrics import Mode, get_metric, primary_metric

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

__all__ = [
    "EXPERIMENT_KIND", "FINAL_REPORT", "KIND_STAGE", "KIND_SWEEP", "KIND_TRIAL", "STAGES_EXPERIMENT",
    "STAGE_CHECKPOINT", "STATES", "OptunaAttr", "Param", "ReportKey", "SweepMetric", "Tag", "TrialResult",
    "collect_rows", "epoch_metric", "failed_report", "find_sweep_run", "hardware_tag", "log_trial_failure",
    "log_trial_over_budget", "log_trial_result", "model_version_tags", "over_budget_report", "read_trial_row",
    "recorded_result", "report_error", "report_over_budget", "require_sweep_run", "stage_tag", "sweep_objectives",
    "sweep_run_tags", "trial_filter", "trial_runs", "trial_start_tags",
]


class Tag:
    """Tag names. `PARENT_RUN` is MLflow's own (it nests trial runs under their sweep in the UI)."""

    PARENT_RUN = "mlflow.parentRunId"
    KIND = "pxd.kind"  # sweep | trial | stage
    SWEEP = "pxd.sweep"  # the sweep's name, on its sweep, trial and stage runs
    # sweep runs
    OBJECTIVES = "pxd.objectives"  # JSON [[metric, mode], ...]
    REFERENCE_POINT = "pxd.reference_point"  # JSON {metric: value}
    IDEAL_POINT = "pxd.ideal_point"  # JSON {metric: value}: the normalised hypervolume's box
    HARDWARE_LABELS = "pxd.hardware_labels"  # JSON [label, ...] the sweep's students were re-timed on
    OPTUNA_STORAGE = "pxd.optuna_storage"
    BUDGET = "pxd.budget"  # JSON {"trials": n, "timeout_s": s} of the latest launch (a resume may raise them)
    OPTUNA_STUDY = "pxd.optuna_study"
    # trial runs
    TRIAL_ID = "pxd.trial_id"  # Ray Tune's trial id
    STATE = "pxd.state"  # RUNNING | COMPLETE | FAILED | PRUNED
    PARAMS = "pxd.sampled"  # JSON {dotted parameter name: sampled value}
    HOSTNAME = "pxd.hostname"
    NODE_ID = "pxd.node_id"  # Ray node id the trial ran on
    PID = "pxd.pid"  # the trial's process on that host (what an out-of-memory killer's log names)
    # a token unique to one run's creation (trial and stage runs): a creation MLflow retried after its answer
    # was lost made a second run with the same token (`new_run_token`, `drop_duplicate_runs`)
    CREATED_AS = "pxd.created_as"
    DEVICE = "pxd.device"
    STOPPED_REASON = "pxd.stopped_reason"  # why early stopping stopped a trial (set when it stops)
    ERROR = "pxd.error"  # first line of the error of a FAILED trial (error.txt holds the traceback)
    WARNINGS = "pxd.warnings"  # JSON list: what the pipeline warned about (e.g. an assistant far below its teacher)
    FEASIBLE = "pxd.feasible"  # "true" | "false": meets every search.constraints limit
    MODEL_URI = "pxd.model_uri"  # the logged student (models:/...)
    STUDENT_SHA256 = "pxd.student_sha256"  # its weights file's sha256, checked before it loads (results/students.py)
    ON_FRONTIER = "pxd.on_frontier"  # "false" when a trial completes; "true" once its sweep's end finds it on the frontier
    # "true" on a trial run whose stages' training was simulated (`pxd.simulated`: benchmarks and tests only)
    SIMULATED_TRAINING = "pxd.simulated_training"
    # stage runs (experiment pxd-stages)
    STAGE = "pxd.stage"  # teacher | assistant | student
    STAGE_KEY = "pxd.stage_key"
    STAGE_COMPLETE = "pxd.stage_complete"  # "true" once the checkpoint is uploaded and hashed
    STAGE_CORRUPT = "pxd.stage_corrupt"
    STAGE_CORRUPT_REASON = "pxd.stage_corrupt_reason"
    CHECKPOINT_SHA256 = "pxd.checkpoint_sha256"
    # JSON {epoch, artifact, sha256, layout}: the last training state of a stage still training (incomplete)
    STAGE_PARTIAL = "pxd.stage_partial"
    STAGE_RESUMED_FROM = "pxd.stage_resumed_from"  # the epoch the last lease holder resumed after
    TRAINED_BY = "pxd.trained_by"  # host:pid:nonce of the process that trained it
    TRAINED_FOR_RUN = "pxd.trained_for_run"  # the trial run that trained it
    # model versions (`pxd select`): also SWEEP, and OBJECTIVES as JSON {metric: the model's value}
    TRIAL_RUN = "pxd.trial_run"  # the trial run whose student this version is
    INPUT_SIZE = "pxd.input_size"  # "<H>x<W>" the student takes
    HARDWARE = "pxd.hardware"  # the hardware label it was chosen on; `hardware_tag` names per-label tags below it
    SELECTION_RULE = "pxd.selection_rule"  # why it was chosen, in words


class ReportKey:
    """Keys of the results a trial reports to Ray Tune (besides the registry's metric names and the
    per-epoch `epoch_metric`): per-epoch reports carry STAGE, EPOCH and MLFLOW_RUN_ID; the final report
    is `TrialResult.report`, `failed_report` or `over_budget_report`."""

    MLFLOW_RUN_ID = "mlflow_run_id"  # the trial attempt's MLflow run
    STAGE = "stage"  # teacher | assistant | student: the stage a per-epoch report is of
    EPOCH = "epoch"  # that stage's epoch
    FINAL = "pxd_final"  # marks the final report (its objectives); absent from per-epoch reports
    MODEL_URI = "model_uri"
    FEASIBLE = "feasible"  # meets every search.constraints limit
    CONSTRAINTS = "constraints"  # Optuna's constraint values, one per set constraint: ≤ 0 satisfied
    ERROR = "pxd_error"  # the error that ended the trial, which would repeat (`failed_report`)
    PRUNED_BEFORE_TRAINING = "pruned_before_training"  # why a hard limit refused it before training
    DONE = "done"  # Tune's own key (`ray.tune.result.DONE`): the trial is finished


class OptunaAttr:
    """User attributes pxd sets on the Optuna trials of a sweep's study."""

    MLFLOW_RUN_ID = "mlflow_run_id"  # the trial's MLflow run (the last attempt's)
    TUNE_TRIAL_ID = "tune_trial_id"  # Ray Tune's trial id (tag pxd.trial_id on its runs)
    PRUNED = "pxd_pruned"  # why it was refused before training


class Param:
    """Params of a sweep run (trial runs log their whole resolved config as dotted params)."""

    SAMPLER = "sampler"
    SAMPLER_SEED = "sampler_seed"
    TRIALS = "trials"
    OBJECTIVES = "objectives"
    REFERENCE_POINT = "reference_point"
    # on a trial run (with `Tag.SIMULATED_TRAINING`): the seconds each simulated epoch slept
    SIMULATED_TRAINING = "simulated_training_s_per_epoch"


class SweepMetric:
    """Metrics of a sweep run. Trial runs log the registry's metrics (`pxd.metrics`) under their names."""

    HYPERVOLUME = "hypervolume"  # in the objectives' own units, against the reference point
    HYPERVOLUME_NORMALISED = "hypervolume_normalised"  # fraction of the reference-to-ideal box, in [0, 1]
    FRONTIER_SIZE = "frontier_size"
    TRIALS_COMPLETE = "trials_complete"
    TRIALS_FAILED = "trials_failed"
    TRIALS_STOPPED = "trials_stopped"  # PRUNED: stopped before their final result (time budget, early stopping)
    STAGES_TRAINED = "stages_trained"  # also per kind: teachers_trained, assistants_trained, students_trained
    STAGES_REUSED = "stages_reused"  # also a trial metric
    STAGE_SECONDS_SAVED = "stage_seconds_saved"  # also a trial metric
    # trial metrics: the training time of the stages the trial trained itself (the rest of its run's wall
    # time is orchestration overhead), and 1.0 when its latency was reused from an earlier trial of the sweep
    STAGE_SECONDS_TRAINED = "stage_seconds_trained"
    LATENCY_REUSED = "latency_reused"

    @staticmethod
    def trained(kind: str) -> str:
        return f"{kind}s_trained"

    @staticmethod
    def overhead(section: str) -> str:
        """`overhead.<section>_s`, a trial metric: seconds the trial spent in one section outside training
        (`pxd.pipeline.TIMED_SECTIONS` and the trial's own `orchestrator.worker.trial.TRIAL_SECTIONS`)."""
        return f"overhead.{section}_s"


STAGES_EXPERIMENT = "pxd-stages"
STAGE_CHECKPOINT = "stage/checkpoint.pt"  # artifact path of a stage run's weights
KIND_SWEEP, KIND_TRIAL, KIND_STAGE = "sweep", "trial", "stage"
STATES = ("RUNNING", "COMPLETE", "FAILED", "PRUNED")
ERROR_ARTIFACT, COST_ARTIFACT = "error.txt", "cost.json"


def epoch_metric(stage: str, name: str | None = None) -> str:
    """The one per-epoch metric name of a stage (`student.val_top1`, step = epoch; `name` defaults to the
    primary metric): on trial runs, on stage runs and in Tune's per-epoch reports alike."""
    return f"{stage}.{name or primary_metric()}"


def hardware_tag(label: str) -> str:
    """`pxd.hardware.<label>`: on a trial run, the JSON timing record (runtime, device, threads, node, host,
    repeats, spread); on the sweep run, the timing request."""
    return f"{Tag.HARDWARE}.{label}"


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # MLflow 3: the model-training UI view


def stage_tag(kind: str, what: str) -> str:
    """`pxd.stage.<kind>.key | reused | run_id` on a trial run: which stored stage it used."""
    return f"{Tag.STAGE}.{kind}.{what}"


def model_version_tags(*, sweep: str, trial_run: str, resolution: int, objectives: Mapping[str, float | None],
                       hardware: str | None, why: str) -> dict[str, str]:
    """The tags of a model version `pxd select` registers: where the student came from and why."""
    return {Tag.SWEEP: sweep, Tag.TRIAL_RUN: trial_run, Tag.INPUT_SIZE: f"{resolution}x{resolution}",
            Tag.OBJECTIVES: json.dumps(dict(objectives)), Tag.HARDWARE: hardware or "(the sweep's own device)",
            Tag.SELECTION_RULE: why}


def _true(value: bool) -> str:
    return str(bool(value)).lower()


FINAL_REPORT = ReportKey.FINAL  # the same key, under the name its importers use


@dataclass
class TrialResult:
    """A trial's final result: what it logs to MLflow, reports to Tune and the frontier reads back."""

    run_id: str
    metrics: dict[str, float]  # the registry's metrics plus stage totals
    feasible: bool
    model_uri: str | None
    constraints: list[float]  # Optuna's convention, one per set constraint: ≤ 0 satisfied

    def report(self) -> dict[str, Any]:
        """The final Tune report. `FINAL_REPORT` marks it: the searcher tells Optuna COMPLETE only for such a
        report (Tune marks `done` the last partial report of a trial a scheduler stopped, too)."""
        return {**self.metrics, ReportKey.MLFLOW_RUN_ID: self.run_id, ReportKey.MODEL_URI: self.model_uri,
                ReportKey.FEASIBLE: self.feasible, ReportKey.CONSTRAINTS: list(self.constraints), ReportKey.FINAL: True}


def failed_report(run_id: str, error: str) -> dict[str, Any]:
    """The final Tune report of a trial that failed with an error that would repeat (not retried): `done`
    without objectives, so the searcher tells FAIL."""
    return {ReportKey.MLFLOW_RUN_ID: run_id, ReportKey.ERROR: error, ReportKey.DONE: True}


def over_budget_report(run_id: str, reason: str, metrics: Mapping[str, float], constraints: Sequence[float]
                       ) -> dict[str, Any]:
    """The final Tune report of a trial refused before training (a hard limit on a metric known before
    training): its known metrics and constraint values, and why; the searcher tells PRUNED."""
    return {**metrics, ReportKey.PRUNED_BEFORE_TRAINING: reason, ReportKey.CONSTRAINTS: list(constraints),
            ReportKey.MLFLOW_RUN_ID: run_id}


def report_over_budget(result: Mapping[str, Any]) -> str | None:
    """Why a final report's trial was refused before training (`over_budget_report`), else None."""
    return result.get(ReportKey.PRUNED_BEFORE_TRAINING)


def report_error(result: Mapping[str, Any]) -> str | None:
    """The error a final report carries (`failed_report`), else None."""
    return result.get(ReportKey.ERROR)


def trial_start_tags(*, sweep: str, parent_run_id: str, trial_id: str, params: Mapping[str, Any],
                     hostname: str, node_id: str, pid: int) -> dict[str, str]:
    return {
        Tag.PARENT_RUN: parent_run_id,
        Tag.SWEEP: sweep,
        Tag.TRIAL_ID: trial_id,
        Tag.KIND: KIND_TRIAL,
        Tag.STATE: "RUNNING",
        Tag.PARAMS: json.dumps(dict(params), sort_keys=True, default=str),
        Tag.HOSTNAME: hostname,
        Tag.NODE_ID: node_id,
        Tag.PID: str(pid),
    }


def log_trial_result(client: MlflowClient, result: TrialResult, *, stages: Mapping[str, Any], device: str,
                     cost: Mapping[str, Any], warnings: Sequence[str] = (), artifact_uri: str | None = None,
                     epochs: Sequence[Any] = ()) -> None:
    """Write a COMPLETE trial: its cost (`COST_ARTIFACT`; `artifact_uri`: the run's, if the caller holds it), then
    in one request `epochs` (per-epoch metrics not sent yet), final metrics, feasibility, stages, model, state."""
    upload_json(client, result.run_id, artifact_uri, dict(cost), COST_ARTIFACT)
    tags = {Tag.STATE: "COMPLETE", Tag.FEASIBLE: _true(result.feasible), Tag.DEVICE: device, Tag.ON_FRONTIER: "false"}
    if result.model_uri:
        tags[Tag.MODEL_URI] = result.model_uri
    if warnings:
        tags[Tag.WARNINGS] = json.dumps(list(warnings))[:4900]
    for kind, outcome in stages.items():
        tags[stage_tag(kind, "key")] = outcome.key
        tags[stage_tag(kind, "reused")] = _true(outcome.reused)
        if outcome.ref:
            tags[stage_tag(kind, "run_id")] = outcome.ref
    finals = [_metric(k, v) for k, v in result.metrics.items() if math.isfinite(v)]
    _set_tags(client, result.run_id, tags, [*epochs, *finals])


def log_trial_failure(client: MlflowClient, run_id: str, error: str, traceback_text: str,
                      state: str = "FAILED") -> None:
    """Record why a trial ended without a result; the run ends FAILED (KILLED for PRUNED). Passwords the
    process knows of are masked (an error may quote a database or tracking URL)."""
    from orchestrator.tracking.credentials import scrub  # imports optuna: imported on first use (start-up cost)

    _set_tags(client, run_id, {Tag.STATE: state, Tag.ERROR: scrub(error)[:4900]})
    client.log_text(run_id, scrub(traceback_text), ERROR_ARTIFACT)


def log_trial_over_budget(client: MlflowClient, run_id: str, metrics: Mapping[str, float], reason: str) -> None:
    """Record a trial refused before training (a hard limit broken on metrics known before training):
    those metrics, infeasible, PRUNED with the reason; the run ends KILLED."""
    client.log_batch(run_id, metrics=[_metric(k, v) for k, v in metrics.items() if math.isfinite(v)])
    _set_tags(client, run_id, {Tag.FEASIBLE: "false"})
    log_trial_failure(client, run_id, reason, "", state="PRUNED")


def _metric(key: str, value: float) -> Any:
    from mlflow.entities import Metric  # mlflow: imported on first use (start-up cost), as below

    return Metric(key, float(value), int(time.time() * 1000), 0)


def _set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str], metrics: Sequence[Any] = ()) -> None:
    from mlflow.entities import RunTag  # start-up cost

    client.log_batch(run_id, metrics=list(metrics), tags=[RunTag(k, str(v)) for k, v in tags.items()])


def read_trial_row(run: Run) -> TrialRow:
    """A trial run as the frontier sees it (the reader of `log_trial_result`)."""
    tags = run.data.tags
    state = tags.get(Tag.STATE, "RUNNING")  # RUNNING until the trial, or the sweep's end, records otherwise
    return TrialRow(
        trial_id=tags.get(Tag.TRIAL_ID, run.info.run_id),
        run_id=run.info.run_id,
        metrics=dict(run.data.metrics),
        params=json.loads(tags.get(Tag.PARAMS, "{}")),
        state=state,
        feasible=tags.get(Tag.FEASIBLE) == "true",
        model_uri=tags.get(Tag.MODEL_URI),
        arch=run.data.params.get("student.arch"),
    )


def recorded_result(run: Run, constraints: Sequence[float]) -> TrialResult:
    """The `TrialResult` a COMPLETE trial run holds (to re-report it to Tune after a resume)."""
    row = read_trial_row(run)
    return TrialResult(run_id=row.run_id or "", metrics=row.metrics, feasible=row.feasible,
                       model_uri=row.model_uri, constraints=list(constraints))


def trial_runs(client: MlflowClient, parent: Run | tuple[str, str], *, trial_id: str | None = None,
               state: str | None = None) -> list[Run]:  # parent: the sweep's run, or (its run id, experiment id)
    """A sweep's trial runs (one Tune trial's, in one state, if given), newest first."""
    parent_id, experiment_id = parent if isinstance(parent, tuple) else (parent.info.run_id, parent.info.experiment_id)
    parts = [trial_filter(parent_id), *([f"tags.`{Tag.TRIAL_ID}` = '{trial_id}'"] if trial_id is not None else []),
             *([f"tags.`{Tag.STATE}` = '{state}'"] if state is not None else [])]
    return list(client.search_runs([experiment_id], filter_string=" and ".join(parts),
                                   order_by=["attributes.start_time DESC"], max_results=50000))


def trial_filter(parent_id: str) -> str:
    """The MLflow filter of a sweep's trial runs (`trial_runs`; the driver's `RunsWatch`)."""
    return f"tags.`{Tag.PARENT_RUN}` = '{parent_id}' and tags.`{Tag.KIND}` = '{KIND_TRIAL}'"


def collect_rows(client: MlflowClient, parent: Run) -> list[TrialRow]:
    """Every trial of a sweep as recorded in MLflow (the source of truth, across resumes)."""
    return [read_trial_row(run) for run in trial_runs(client, parent)]


def sweep_run_tags(*, sweep: str, objectives: Sequence[tuple[str, str]], reference_point: Mapping[str, float],
                   ideal_point: Mapping[str, float], optuna_storage: str, optuna_study: str) -> dict[str, str]:
    return {
        Tag.IDEAL_POINT: json.dumps(dict(ideal_point)),
        Tag.KIND: KIND_SWEEP,
        Tag.SWEEP: sweep,
        Tag.OBJECTIVES: json.dumps([list(o) for o in objectives]),
        Tag.REFERENCE_POINT: json.dumps(dict(reference_point)),
        Tag.OPTUNA_STORAGE: optuna_storage,
        Tag.OPTUNA_STUDY: optuna_study,
    }


def sweep_objectives(parent: Run) -> tuple[list[tuple[str, Mode]], dict[str, float], dict[str, float]]:
    """[(metric, mode), ...], the reference point and the ideal point, as the sweep run recorded them."""
    objectives = [(str(m), Mode(mode)) for m, mode in json.loads(parent.data.tags[Tag.OBJECTIVES])]
    reference = json.loads(parent.data.tags[Tag.REFERENCE_POINT])
    default_ideal = {m: get_metric(m).ideal for m, _ in objectives}  # sweeps recorded before the tag existed
    ideal = json.loads(parent.data.tags.get(Tag.IDEAL_POINT, json.dumps(default_ideal)))
    return objectives, reference, ideal


def find_sweep_run(client: MlflowClient, sweep: str) -> Run | None:
    """A sweep's parent run, by run id or by sweep name (the most recent launch)."""
    from mlflow.exceptions import MlflowException  # start-up cost

    try:
        run = client.get_run(sweep)
        if run.data.tags.get(Tag.KIND) == KIND_SWEEP:
            return run
    except MlflowException:
        pass
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`{Tag.SWEEP}` = '{sweep}' and tags.`{Tag.KIND}` = '{KIND_SWEEP}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def require_sweep_run(client: MlflowClient, sweep: str) -> Run:
    """`find_sweep_run`, or `ConfigError` naming what to check."""
    parent = find_sweep_run(client, sweep)
    if parent is None:
        raise ConfigError("sweep", f"no sweep named or with run id {sweep!r} at {client.tracking_uri}; check the name "
                                   "and --tracking-uri/--root")
    return parent
