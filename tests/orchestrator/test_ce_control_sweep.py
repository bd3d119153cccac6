"""`search.ce_control: true`: every trial gets its cross-entropy control, shared per student architecture ×
side × schedule × seed, and `gain_vs_ce` on its run, in the frontier table (CSV and JSON) and the summary;
controls never enter the frontier."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from mlflow.tracking import MlflowClient

from orchestrator.driver.finish import summary
from orchestrator.driver.launch import SweepOptions, run_sweep
from orchestrator.results.schema import STAGES_EXPERIMENT
from orchestrator.space.spec import parse_spec
from tests.orchestrator.conftest import tiny_space


def test_a_sweep_with_ce_controls_records_gain_vs_ce_on_every_trial(ray_local, mlflow_server, results_root, tmp_path):
    raw = tiny_space(ce_control=True, trials=4)
    raw["seed"] = 95  # its own stages in the session's shared store
    raw["student"]["resolution"] = {"choice": [8, 16]}  # 2 archs × 2 sides: 4 controls for 4 trials
    spec = parse_spec(raw, source_path="tiny-control.yaml")
    outcome = run_sweep(spec, SweepOptions(name="tiny-control", tracking_uri=mlflow_server, root=str(results_root),
                                           quiet=True))
    client = MlflowClient(mlflow_server)
    trials = client.search_runs([outcome.experiment_id], f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    assert len(trials) == 4
    controls = {}
    for run in trials:
        metrics, tags = run.data.metrics, run.data.tags
        assert metrics["gain_vs_ce"] == metrics["val_top1"] - metrics["control_val_top1"]
        controls[(run.data.params["student.arch"], run.data.params["student.resolution"])] = tags["pxd.stage.control.key"]
    assert len(set(controls.values())) == 4  # one control per arch × side

    # the controls are stage runs, one per key, never trial runs, so never on the frontier
    stages = client.search_runs([client.get_experiment_by_name(STAGES_EXPERIMENT).experiment_id],
                                "tags.`pxd.stage` = 'control' and tags.`pxd.stage_complete` = 'true'")
    assert set(controls.values()) <= {run.data.tags["pxd.stage_key"] for run in stages}
    table = outcome.table
    assert table["n_eligible"] == 4 and {row["run_id"] for row in table["rows"]} == {r.info.run_id for r in trials}

    # the table a user downloads carries it, and the summary answers the question
    folder = Path(client.download_artifacts(outcome.parent_run_id, "frontier", str(tmp_path)))
    rows = list(csv.DictReader((folder / "frontier.csv").open()))
    assert all(row["gain_vs_ce"] != "" for row in rows)
    saved = json.loads((folder / "frontier.json").read_text())
    assert all("gain_vs_ce" in row["metrics"] for row in saved["rows"])
    text = summary(outcome)
    assert "gain_vs_ce" in text and "did distillation pay?" in text
