"""Budget before compute: a trial whose architecture and input break a hard limit on a metric known
before training (gmacs, params_m, pixels) is recorded infeasible (PRUNED, with the reason) without
training anything, and Optuna holds its constraint values so the sampler learns the region.

Real components: a local Ray, a real `mlflow server`, an Optuna RDB study, real timm models.
"""

from __future__ import annotations

import optuna
from mlflow.tracking import MlflowClient

from orchestrator.driver.launch import SweepOptions, run_sweep
from orchestrator.results import schema
from orchestrator.space.spec import broken_before_training, parse_spec
from pxd.cost import static_cost
from pxd.metrics import metrics_before_training
from pxd.models import create_model
from tests.orchestrator.conftest import tiny_space


def test_broken_limits_are_named_and_unknown_ones_are_not_guessed():
    spec = parse_spec(tiny_space(constraints={"max_pixels": 300, "min_val_top1": 0.5, "max_gmacs": 10.0}))
    broken, values = broken_before_training(spec, {"pixels": 576.0, "gmacs": 0.01, "params_m": 0.1})
    assert broken == ["pixels 576 > max_pixels 300"]
    assert values == [276.0, 0.0, 0.01 - 10.0]  # val_top1 is not known before training: not shown broken
    assert broken_before_training(spec, {"pixels": 256.0, "gmacs": 0.01, "params_m": 0.1})[0] == []


def test_static_cost_is_what_the_trained_student_costs():
    from orchestrator.space.spec import materialize

    spec = parse_spec(tiny_space())
    config = materialize(spec, {"student.arch": "resnet10t", "student.resolution": 24})
    model = create_model(config.student, 4, field="student")
    before = metrics_before_training(static_cost(model, 24))
    assert set(before) == {"gmacs", "params_m", "pixels"} and before["pixels"] == 576.0
    assert before["gmacs"] > 0 and before["params_m"] > 0


def test_a_trial_over_a_hard_budget_is_pruned_before_anything_trains(ray_local, mlflow_server, tmp_path):
    raw = tiny_space(trials=6, max_concurrent=2, constraints={"max_pixels": 300})  # 24 px (576) breaks it
    raw["seed"] = 51
    spec = parse_spec(raw, source_path="budget-before.yaml")
    outcome = run_sweep(spec, SweepOptions(tracking_uri=mlflow_server, root=str(tmp_path), quiet=True,
                                           name="over-budget"))
    client = MlflowClient(mlflow_server)
    runs = schema.trial_runs(client, client.get_run(outcome.parent_run_id))
    refused = [r for r in runs if r.data.tags[schema.Tag.STATE] == "PRUNED"]
    complete = [r for r in runs if r.data.tags[schema.Tag.STATE] == "COMPLETE"]
    assert len(refused) == 2 and len(complete) == 4  # the grid: 2 architectures × 24 px
    for run in refused:
        assert run.data.metrics["pixels"] == 576.0 and run.data.tags[schema.Tag.FEASIBLE] == "false"
        assert "infeasible before training: pixels 576 > max_pixels 300" in run.data.tags[schema.Tag.ERROR]
        assert run.info.status == "KILLED" and schema.Tag.MODEL_URI not in run.data.tags
        assert not any(key.startswith("pxd.stage.") for key in run.data.tags), "no stage was used"
    # one student trained per feasible trial, none for the refused ones
    parent = client.get_run(outcome.parent_run_id)
    assert parent.data.metrics[schema.SweepMetric.trained("student")] == 4
    assert not {row["run_id"] for row in outcome.table["rows"]} & {r.info.run_id for r in refused}  # never on the frontier
    study = optuna.load_study(study_name="over-budget", storage=f"sqlite:///{tmp_path / 'sweeps/over-budget/optuna.db'}")
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert len(pruned) == 2 and all(t.params["student.resolution"] == 24 for t in pruned)
    # what constrained samplers (TPE) read: the trial is infeasible, by how much
    assert all(t.constraints == {"max_pixels": 276.0} for t in pruned)
