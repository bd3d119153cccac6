"""What a user watching `pxd sweep` sees while stages train: one status line per epoch of every stage, the
teacher warm-up's included (its task's own output never reaches the driver), and none with `--quiet`."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.driver.launch import SweepOptions, run_sweep
from orchestrator.driver.progress import SweepProgress
from orchestrator.results import schema
from orchestrator.space.spec import parse_spec
from tests.orchestrator.conftest import tiny_space

# `[pxd] teacher warm-up ·     3s  | teacher epoch 2/3: val_top1 0.625 in 0.4s`
WARM_UP_EPOCH = re.compile(r"^\[pxd\] teacher warm-up · +\d+s  \| teacher epoch (\d+)/(\d+): val_top1 (\d\.\d{3}) in (\d+\.\d)s$")
# `[pxd] 0/2 done · 2 running · ... ·     9s  | trial 5f1c2_00001 student epoch 1/2: val_top1 0.406 in 0.3s`
TRIAL_EPOCH = re.compile(r"^\[pxd\] \d+/\d+ done · .* \| trial (\S+) (\w+) epoch (\d+)/(\d+): val_top1 (\d\.\d{3}) in (\d+\.\d)s$")


def _epoch_report(stage: str, epoch: int, top1: float, seconds: float) -> dict:
    """A per-epoch report as `orchestrator.worker.trial` sends it to Tune."""
    return {schema.ReportKey.STAGE: stage, schema.ReportKey.EPOCH: epoch, schema.epoch_metric(stage): top1,
            schema.epoch_metric(stage, "epoch_seconds"): seconds, schema.ReportKey.MLFLOW_RUN_ID: "run"}


def test_every_epoch_of_concurrent_trials_prints_one_line_naming_its_trial_and_its_stage_length():
    raw = tiny_space(trials=4)
    raw["student"]["epochs"] = {"choice": [2, 5]}  # each trial's own length comes from its sampled config
    spec = parse_spec(raw, source_path="tiny.yaml")
    stream = io.StringIO()
    progress = SweepProgress(spec, total=4, stream=stream)
    short = SimpleNamespace(trial_id="aa_00000", config={"student.arch": "resnet10t", "student.resolution": 8,
                                                         "student.epochs": 2})
    long = SimpleNamespace(trial_id="aa_00001", config={"student.arch": "blockwise_resnet", "student.resolution": 16,
                                                        "student.epochs": 5})
    progress.on_trial_start(0, [], short)
    progress.on_trial_start(0, [], long)
    stream.truncate(0)
    stream.seek(0)
    # interleaved as two trials training side by side report them, with no pause between
    progress.on_trial_result(0, [], long, _epoch_report("assistant", 1, 0.25, 1.5))
    progress.on_trial_result(0, [], short, _epoch_report("student", 1, 0.5, 0.3))
    progress.on_trial_result(0, [], long, _epoch_report("student", 1, 0.375, 2.0))
    progress.on_trial_result(0, [], short, _epoch_report("student", 2, 0.625, 0.3))

    lines = stream.getvalue().splitlines()
    matches = [TRIAL_EPOCH.match(line) for line in lines]
    assert all(matches), lines
    assert [match.groups() for match in matches] == [
        ("aa_00001", "assistant", "1", "1", "0.250", "1.5"),
        ("aa_00000", "student", "1", "2", "0.500", "0.3"),
        ("aa_00001", "student", "1", "5", "0.375", "2.0"),
        ("aa_00000", "student", "2", "2", "0.625", "0.3"),
    ], lines
    assert all(line.startswith("[pxd] 0/4 done · 2 running · 0 failed") for line in lines)


def test_quiet_prints_no_epoch_line():
    spec = parse_spec(tiny_space(trials=2), source_path="tiny.yaml")
    stream = io.StringIO()
    progress = SweepProgress(spec, total=2, quiet=True, stream=stream)
    trial = SimpleNamespace(trial_id="bb_00000", config={"student.arch": "resnet10t", "student.resolution": 8})
    progress.on_trial_start(0, [], trial)
    progress.on_trial_result(0, [], trial, _epoch_report("student", 1, 0.5, 0.3))
    assert stream.getvalue() == ""


@pytest.mark.slow
def test_a_sweep_prints_each_teacher_warm_up_epoch_and_each_trial_stage_epoch(ray_local, mlflow_server, results_root,
                                                                                capsys):
    raw = tiny_space(trials=2, max_concurrent=2)
    raw["seed"] = 91  # stages of its own: the stage store is shared with the other sweep tests
    raw["teacher"]["epochs"] = 3
    raw["student"]["epochs"] = 2
    raw["student"]["arch"] = "blockwise_resnet"  # one assistant, trained by one trial, waited for by the other
    raw["student"]["resolution"] = {"choice": [8, 16]}
    spec = parse_spec(raw, source_path="tiny-progress.yaml")
    outcome = run_sweep(spec, SweepOptions(name="tiny-progress", tracking_uri=mlflow_server, root=str(results_root),
                                           quiet=False))
    lines = capsys.readouterr().err.splitlines()
    client = MlflowClient(mlflow_server)

    # the warm-up: one line per teacher epoch, as the epochs train, between its first and its last line
    preparing = next(i for i, line in enumerate(lines) if "preparing the shared teacher stage" in line)
    trained = next(i for i, line in enumerate(lines) if re.match(r"\[pxd\] teacher \w{12} trained", line))
    between = [line for line in lines[preparing + 1:trained] if line.startswith("[pxd]")]
    warm_up = [WARM_UP_EPOCH.match(line) for line in between]
    assert all(warm_up), between
    assert [(m.group(1), m.group(2)) for m in warm_up] == [("1", "3"), ("2", "3"), ("3", "3")], lines
    teacher_run = client.search_runs(
        [client.get_experiment_by_name(schema.STAGES_EXPERIMENT).experiment_id],
        "tags.`pxd.stage` = 'teacher' and tags.`pxd.stage_complete` = 'true' and tags.`pxd.sweep` = 'tiny-progress'",
    )[0].info.run_id
    history = {m.step: m.value for m in client.get_metric_history(teacher_run, "teacher.val_top1")}
    assert [m.group(3) for m in warm_up] == [f"{history[step]:.3f}" for step in (1, 2, 3)]

    # the trials: every epoch of every stage a trial trained, once, after its trial's id
    epochs = [TRIAL_EPOCH.match(line).groups() for line in lines if TRIAL_EPOCH.match(line)]
    keys = [(trial, stage, epoch) for trial, stage, epoch, *_ in epochs]
    assert len(keys) == len(set(keys)), lines
    parent = client.get_run(outcome.parent_run_id)
    trial_ids = {run.data.tags[schema.Tag.TRIAL_ID] for run in schema.trial_runs(client, parent, state="COMPLETE")}
    assert len(trial_ids) == 2
    for trial_id in trial_ids:
        student = [(epoch, total, top1) for trial, stage, epoch, total, top1, _ in epochs
                   if trial == trial_id and stage == "student"]
        run = schema.trial_runs(client, parent, trial_id=trial_id, state="COMPLETE")[0]
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "student.val_top1")}
        assert student == [("1", "2", f"{history[1]:.3f}"), ("2", "2", f"{history[2]:.3f}")], lines
    assistant = [(epoch, total) for _, stage, epoch, total, *_ in epochs if stage == "assistant"]
    assert assistant == [("1", "1")], "the one assistant, trained by one trial"
    assert not any(stage == "teacher" for _, stage, *_ in epochs), "the warm-up trained the teacher, once"
