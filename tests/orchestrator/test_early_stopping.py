"""Multi-objective early stopping (MO-ASHA): the ranking, the scheduler's decisions and their
persistence across a resume, and a real sweep in which stopped trials are PRUNED in Optuna and MLflow
and never reach the frontier."""

from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest
from mlflow.tracking import MlflowClient
from ray.tune.schedulers import TrialScheduler

from orchestrator.driver.early_stopping import MOASHA, goes_on, keep_best, rungs
from orchestrator.driver.launch import SweepOptions, run_sweep
from orchestrator.results import schema
from orchestrator.results.pareto import nondominated_ranks
from orchestrator.space.spec import parse_spec
from pxd.errors import ConfigError
from tests.orchestrator.conftest import tiny_space


def test_rungs_are_grace_times_powers_of_eta_below_the_last_epoch():
    assert rungs(1, 3, 30) == [1, 3, 9, 27]
    assert rungs(2, 2, 8) == [2, 4]
    assert rungs(5, 3, 5) == []


def test_nondominated_sorting_ranks_fronts():
    # minimise both: (1, 3) and (2, 1) are the front, (2, 3) is dominated by both, (3, 4) by all
    points = [(1, 3), (2, 1), (2, 3), (3, 4)]
    assert nondominated_ranks(points) == [0, 0, 1, 2]
    assert keep_best(points, 1 / 2) == {0, 1}
    assert keep_best(points, 1 / 3) == {0, 1}  # ceil(4/3) = 2
    assert keep_best([(1, 1)], 1 / 3) == {0}  # the first trial at a rung always goes on


def test_with_keep_front_only_dominated_trials_outside_the_best_fraction_are_stopped():
    # minimise both; at η = 3 the best ceil(4/3) = 2 go on by rank and crowding
    points = [(1, 3), (2, 1), (1.5, 2), (3, 4)]  # the first three are mutually non-dominated
    best = keep_best(points, 1 / 3)
    assert len(best) == 2 and 3 not in best
    front_point_outside_best = ({0, 1, 2} - best).pop()
    assert not goes_on(points, front_point_outside_best, 1 / 3, keep_front=False)  # classic MO-ASHA stops it
    assert goes_on(points, front_point_outside_best, 1 / 3, keep_front=True)  # no point dominates it
    assert not goes_on(points, 3, 1 / 3, keep_front=True)  # dominated by every other point
    assert all(goes_on(points, i, 1 / 3, keep_front=True) for i in best)


def test_moasha_keeps_a_front_trial_that_classic_mo_asha_stops(tmp_path):
    objectives = [("val_top1", "max"), ("pixels", "min")]
    go, stop = TrialScheduler.CONTINUE, TrialScheduler.STOP
    decisions = {}
    for keep_front in (True, False):
        scheduler = MOASHA(objectives, grace_period=1, reduction_factor=3, max_t=4, keep_front=keep_front,
                           state_path=tmp_path / f"{keep_front}.json")
        assert scheduler.on_trial_result(None, SimpleNamespace(trial_id="a"), _result(1, 0.5, 576)) == go
        # b is cheaper and less accurate: neither dominates; only one of 2 is kept by rank
        decisions[keep_front] = scheduler.on_trial_result(None, SimpleNamespace(trial_id="b"), _result(1, 0.3, 64))
        # c is dominated by a (less accurate at the same pixels): stopped under both rules
        assert scheduler.on_trial_result(None, SimpleNamespace(trial_id="c"), _result(1, 0.4, 576)) == stop
    assert decisions == {True: go, False: stop}


def _result(trial_epoch: int, val: float, pixels: float, stage: str = "student") -> dict:
    return {schema.ReportKey.STAGE: stage, schema.ReportKey.EPOCH: trial_epoch, schema.epoch_metric("student"): val,
            "pixels": pixels}


def test_moasha_stops_dominated_trials_at_a_rung_and_keeps_its_records_across_a_resume(tmp_path):
    state = tmp_path / "early_stopping.json"
    objectives = [("val_top1", "max"), ("pixels", "min")]
    scheduler = MOASHA(objectives, grace_period=1, reduction_factor=2, max_t=4, state_path=state)
    a, b, c = (SimpleNamespace(trial_id=name) for name in "abc")
    go, stop = TrialScheduler.CONTINUE, TrialScheduler.STOP
    assert scheduler.on_trial_result(None, a, _result(1, 0.5, 256)) == go  # alone at the rung
    assert scheduler.on_trial_result(None, a, _result(3, 0.5, 256)) == go  # not a rung
    assert scheduler.on_trial_result(None, a, _result(1, 0.9, 256, stage="assistant")) == go  # not the student
    assert scheduler.on_trial_result(None, b, _result(1, 0.4, 576)) == stop  # dominated by a
    assert scheduler.on_trial_result(None, c, _result(1, 0.8, 256)) == go  # dominates a: best of 3, keeps 2
    # a resumed sweep builds a new scheduler: the rung's records are read back from the sweep's folder
    resumed = MOASHA(objectives, grace_period=1, reduction_factor=2, max_t=4, state_path=state)
    d = SimpleNamespace(trial_id="d")
    assert resumed.on_trial_result(None, d, _result(1, 0.3, 576)) == stop  # 4 at the rung, worst of them


def test_moasha_needs_val_top1_among_the_objectives():
    with pytest.raises(ConfigError) as error:
        parse_spec(tiny_space(early_stopping={"kind": "moasha"}, objectives=[{"metric": "pixels"}, {"metric": "gmacs"}],
                              reference_point={"pixels": 1024, "gmacs": 1.0}))
    assert error.value.field == "search.early_stopping.kind"
    with pytest.raises(ConfigError) as error:
        parse_spec(tiny_space(early_stopping={"kind": "hyperband"}))
    assert error.value.field == "search.early_stopping.kind" and "moasha" in error.value.message


def test_a_sweep_with_moasha_prunes_stopped_trials_everywhere(ray_local, mlflow_server, tmp_path):
    # classic MO-ASHA (keep_front: false): in this tiny space the 6 trials are mostly mutually
    # non-dominated at the rung, so the default rule would stop few or none; the plumbing is the same
    raw = tiny_space(trials=6, max_concurrent=1, early_stopping={"kind": "moasha", "grace_period": 1,
                                                                 "reduction_factor": 3, "keep_front": False})
    raw["seed"] = 61
    raw["student"]["epochs"] = 3  # one rung, at student epoch 1
    outcome = run_sweep(parse_spec(raw, source_path="moasha.yaml"),
                        SweepOptions(tracking_uri=mlflow_server, root=str(tmp_path), quiet=True, name="moasha"))
    client = MlflowClient(mlflow_server)
    runs = schema.trial_runs(client, client.get_run(outcome.parent_run_id))
    states = {run.data.tags[schema.Tag.TRIAL_ID]: run.data.tags[schema.Tag.STATE] for run in runs}
    stopped = [run for run in runs if run.data.tags[schema.Tag.STATE] == "PRUNED"]
    assert stopped, "with 6 trials and η = 3 some trials are outside the best third at the rung"
    assert "RUNNING" not in states.values() and "FAILED" not in states.values()
    for run in stopped:
        assert "stopped early by MO-ASHA at student epoch 1" in run.data.tags[schema.Tag.ERROR]
        assert run.info.status == "KILLED" and schema.Tag.MODEL_URI not in run.data.tags
        history = client.get_metric_history(run.info.run_id, schema.epoch_metric("student"))
        assert max(m.step for m in history) < 3, "a stopped trial did not train its student to the end"
    assert not {row["run_id"] for row in outcome.table["rows"]} & {run.info.run_id for run in stopped}
    study = optuna.load_study(study_name="moasha", storage=f"sqlite:///{tmp_path / 'sweeps/moasha/optuna.db'}")
    optuna_states = {t.user_attrs["tune_trial_id"]: t.state.name for t in study.trials}
    assert optuna_states == states  # Optuna and MLflow agree: PRUNED, never COMPLETE with a partial result


def test_the_pickled_scheduler_holds_no_password(tmp_path):
    """Tune pickles the scheduler into the sweep's folder (tuner.pkl)."""
    import pickle

    scheduler = MOASHA([("val_top1", "max"), ("pixels", "min")], grace_period=1, reduction_factor=3, max_t=9,
                       state_path=tmp_path / "state.json", tracking_uri="http://pxd:s3cret-pw@mlflow:5000")
    assert b"s3cret-pw" not in pickle.dumps(scheduler)
