"""End-to-end sweeps on real Ray, a real MLflow server over HTTP and a real Optuna RDB study.

Tiny trials (a few seconds each on CPU). Checked against what a user relies on: MLflow's contents,
the frontier against brute-force non-dominance on the logged metrics, the hypervolume against a value
computed by hand, failed trials kept out of the frontier, and stages trained once and shared.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.driver.launch import SweepOptions, run_sweep
from orchestrator.results.schema import STAGES_EXPERIMENT
from orchestrator.space.spec import parse_spec
from tests.orchestrator.conftest import tiny_space

pytestmark = pytest.mark.slow


def _children(client, outcome):
    return client.search_runs([outcome.experiment_id], f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")


def _stage_runs(client, stage, sweep):
    """Usable stage runs of one kind that the sweep `sweep` trained (the store is shared with other tests)."""
    experiment = client.get_experiment_by_name(STAGES_EXPERIMENT)
    return client.search_runs(
        [experiment.experiment_id],
        f"tags.`pxd.stage` = '{stage}' and tags.`pxd.stage_complete` = 'true' and tags.`pxd.sweep` = '{sweep}'",
    )


def _brute_force_front(points):
    """Indices of points (maximise column 0, minimise column 1) that no other point dominates."""
    front = []
    for i, (acc_i, pix_i) in enumerate(points):
        dominated = any(
            acc_j >= acc_i and pix_j <= pix_i and (acc_j > acc_i or pix_j < pix_i)
            for j, (acc_j, pix_j) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return front


def _staircase_hypervolume(points, reference):
    """2-D hypervolume by hand: sort by pixels, add the rectangles each point adds over the reference."""
    ref_acc, ref_pix = reference
    best = sorted(((pix, acc) for acc, pix in points if acc > ref_acc and pix < ref_pix), key=lambda p: (p[0], -p[1]))
    volume, top = 0.0, ref_acc
    for index, (pix, acc) in enumerate(best):
        if acc <= top:
            continue
        # the region from this point's pixels to the reference, between the previous best accuracy and this one
        volume += (ref_pix - pix) * (acc - top)
        top = acc
    return volume


@pytest.fixture(scope="module")
def first_sweep(ray_local, mlflow_server, results_root):
    spec = parse_spec(tiny_space(), source_path="tiny.yaml")
    outcome = run_sweep(spec, SweepOptions(name="tiny-a", tracking_uri=mlflow_server, root=str(results_root), quiet=True))
    return spec, outcome


def test_every_trial_is_a_child_run_with_metrics_params_and_a_loadable_model(first_sweep, mlflow_server, monkeypatch):
    _, outcome = first_sweep
    client = MlflowClient(mlflow_server)
    children = _children(client, outcome)
    assert len(children) == 6
    combos = set()
    for run in children:
        assert run.info.status == "FINISHED" and run.data.tags["pxd.state"] == "COMPLETE"
        for metric in ("val_top1", "gmacs", "params_m", "pixels", "latency_ms"):
            assert metric in run.data.metrics, metric
        assert run.data.params["student.arch"] in ("blockwise_resnet", "resnet10t")
        resolution = int(run.data.params["student.resolution"])
        assert run.data.metrics["pixels"] == resolution * resolution
        assert "student.val_top1" in {m for m in run.data.metrics}  # per-epoch history
        combos.add((run.data.params["student.arch"], resolution))
    assert len(combos) == 6, "the grid sampler covers every combination once"
    # the student model loads from MLflow (tensors, checked against its run's sha256) at its own resolution
    from orchestrator.results.students import load_student

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # as a user would, to resolve models:/ URIs
    run = children[0]
    model = load_student(run.data.tags["pxd.model_uri"])
    resolution = int(run.data.params["student.resolution"])
    assert model(torch.zeros(1, 3, resolution, resolution)).shape == (1, 4)


def test_frontier_matches_brute_force_and_hypervolume_matches_hand_computation(first_sweep, mlflow_server):
    _, outcome = first_sweep
    client = MlflowClient(mlflow_server)
    children = sorted(_children(client, outcome), key=lambda r: r.info.run_id)
    points = [(r.data.metrics["val_top1"], r.data.metrics["pixels"]) for r in children]
    expected = {children[i].info.run_id for i in _brute_force_front(points)}
    tagged = {r.info.run_id for r in children if r.data.tags.get("pxd.on_frontier") == "true"}
    assert tagged == expected and expected
    parent = client.get_run(outcome.parent_run_id)
    assert parent.data.metrics["hypervolume"] == pytest.approx(_staircase_hypervolume(points, (0.0, 1024.0)))
    assert parent.data.metrics["frontier_size"] == len(expected)
    # normalised: the fraction of the box between the reference (0, 1024) and the ideal point (1, 0)
    assert parent.data.metrics["hypervolume_normalised"] == pytest.approx(parent.data.metrics["hypervolume"] / 1024.0)
    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id, "frontier")}
    assert {"frontier/frontier.csv", "frontier/frontier.json", "frontier/frontier.png", "frontier/frontier.html"} <= artifacts
    with tempfile.TemporaryDirectory() as tmp:
        table = json.loads(Path(client.download_artifacts(outcome.parent_run_id, "frontier/frontier.json", tmp)).read_text())
    assert {row["run_id"] for row in table["rows"] if row["on_frontier"]} == expected
    assert all(row["model_uri"] for row in table["rows"])


def test_optuna_study_holds_the_same_trials(first_sweep, results_root, mlflow_server):
    _, outcome = first_sweep
    storage = f"sqlite:///{results_root / 'sweeps' / 'tiny-a' / 'optuna.db'}"
    study = optuna.load_study(study_name="tiny-a", storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 6
    client = MlflowClient(mlflow_server)
    for trial in complete:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert trial.values == [run.data.metrics["val_top1"], run.data.metrics["pixels"]]


def test_shared_stages_are_trained_once(first_sweep, mlflow_server):
    _, outcome = first_sweep
    client = MlflowClient(mlflow_server)
    teachers = _stage_runs(client, "teacher", "tiny-a")
    assert len(teachers) == 1
    assistants = _stage_runs(client, "assistant", "tiny-a")
    assert len(assistants) == 2, "one assistant per student architecture"
    children = _children(client, outcome)
    used = {r.data.tags["pxd.stage.teacher.run_id"] for r in children}
    assert used == {teachers[0].info.run_id}
    assert {r.data.tags["pxd.stage.assistant.run_id"] for r in children} == {r.info.run_id for r in assistants}
    # the sweep trains the teacher before launching trials; every trial then reuses it
    assert all(r.data.tags["pxd.stage.teacher.reused"] == "true" for r in children)
    # it trains alone, so on the CPUs of both trial slots (max_concurrent 2 × 1 CPU) where the machine has them;
    # the assistants train inside one-CPU trials: on that thread, plus the thread of a trial waiting for the
    # same assistant while it does (orchestrator.driver.lending), never more
    assert teachers[0].data.metrics["train_threads"] == min(2, os.cpu_count())
    assert all(1.0 <= r.data.metrics["train_threads"] <= 2.0 for r in assistants)
    assert sum(r.data.tags["pxd.stage.assistant.reused"] == "false" for r in children) == 2
    parent = client.get_run(outcome.parent_run_id)
    assert parent.data.metrics["stages_reused"] == 6 + 4  # teacher reused by 6 trials, each assistant by 2
    assert parent.data.metrics["teachers_trained"] == 1 and parent.data.metrics["assistants_trained"] == 2
    assert parent.data.metrics["stages_trained"] == 1 + 2 + 6


def test_pxd_frontier_and_pxd_stages_read_back_from_mlflow(first_sweep, mlflow_server, capsys):
    _, outcome = first_sweep
    assert main(["frontier", "tiny-a", "--tracking-uri", mlflow_server, "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    client = MlflowClient(mlflow_server)
    tagged = {r.info.run_id for r in _children(client, outcome) if r.data.tags.get("pxd.on_frontier") == "true"}
    assert {row["run_id"] for row in table["rows"] if row["on_frontier"]} == tagged
    assert main(["stages", "--tracking-uri", mlflow_server, "--json"]) == 0
    stages = json.loads(capsys.readouterr().out)
    used = {r.data.tags[f"pxd.stage.{kind}.run_id"] for r in _children(client, outcome) for kind in ("teacher", "assistant", "student")}
    listed = {row["run_id"]: row for row in stages}
    assert used <= set(listed), "every stage the sweep used is listed"
    assert {"teacher", "assistant", "student"} == {listed[run_id]["stage"] for run_id in used}
    assert all(listed[run_id]["state"] == "ok" and listed[run_id]["size_mb"] > 0 for run_id in used)


def test_worker_processes_are_kept_between_trials_by_default(first_sweep, mlflow_server):
    """search.reuse_actors is on by default (pxd's choice; Tune's own default is off): 6 trials on 2
    slots run in fewer worker processes than trials."""
    _, outcome = first_sweep
    children = _children(MlflowClient(mlflow_server), outcome)
    pids = [(r.data.tags["pxd.hostname"], r.data.tags["pxd.pid"]) for r in children]
    assert len(pids) == 6 and len(set(pids)) < 6, pids


def test_a_second_sweep_with_the_same_teacher_trains_no_teacher(first_sweep, mlflow_server, results_root):
    # and, with search.reuse_actors off, each trial in a fresh worker process (Tune's own default)
    raw = tiny_space(trials=2, max_concurrent=1, reuse_actors=False)
    raw["student"]["resolution"] = {"choice": [12]}
    spec = parse_spec(raw, source_path="tiny-b.yaml")
    outcome = run_sweep(spec, SweepOptions(name="tiny-b", tracking_uri=mlflow_server, root=str(results_root), quiet=True))
    client = MlflowClient(mlflow_server)
    assert _stage_runs(client, "teacher", "tiny-b") == [], "the second sweep trains no teacher"
    first_teacher = _stage_runs(client, "teacher", "tiny-a")[0].info.run_id
    children = _children(client, outcome)
    assert len(children) == 2
    assert {r.data.tags["pxd.stage.teacher.run_id"] for r in children} == {first_teacher}
    assert all(r.data.tags["pxd.stage.teacher.reused"] == "true" for r in children)
    assert all(r.data.tags["pxd.stage.assistant.reused"] == "true" for r in children)
    assert len({r.data.tags["pxd.pid"] for r in children}) == 2, "reuse_actors: false starts a process per trial"


def test_failed_trials_are_recorded_and_never_enter_the_frontier(ray_local, mlflow_server, results_root):
    raw = tiny_space(trials=4)
    raw["student"]["arch"] = "blockwise_resnet"
    raw["student"]["resolution"] = {"choice": [8, 16]}
    raw["distill"]["temperature"] = {"choice": [4.0, 1e30]}  # T² overflows float32: those trials diverge
    spec = parse_spec(raw, source_path="tiny-fail.yaml")
    outcome = run_sweep(spec, SweepOptions(name="tiny-fail", tracking_uri=mlflow_server, root=str(results_root), quiet=True))
    client = MlflowClient(mlflow_server)
    children = _children(client, outcome)
    failed = [r for r in children if r.data.tags["pxd.state"] == "FAILED"]
    complete = [r for r in children if r.data.tags["pxd.state"] == "COMPLETE"]
    assert len(failed) == 2 and len(complete) == 2
    # a diverged loss would diverge again: one attempt per trial, although search.max_retries defaults to 2
    assert len({r.data.tags["pxd.trial_id"] for r in children}) == len(children) == 4
    for run in failed:
        assert run.info.status == "FAILED"
        assert "diverged" in run.data.tags["pxd.error"]
        assert run.data.tags.get("pxd.on_frontier") is None
    assert {r["run_id"] for r in outcome.table["rows"]} == {r.info.run_id for r in complete}
    assert client.get_run(outcome.parent_run_id).data.metrics["trials_failed"] == 2
    storage = f"sqlite:///{results_root / 'sweeps' / 'tiny-fail' / 'optuna.db'}"
    states = [t.state for t in optuna.load_study(study_name="tiny-fail", storage=storage).trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 2
    assert states.count(optuna.trial.TrialState.COMPLETE) == 2


def test_bad_space_fails_before_anything_is_launched(tmp_path, capsys):
    space = tmp_path / "bad.yaml"
    raw = tiny_space()
    raw["student"]["resolution"] = {"choice": [8, 64]}  # 64 > teacher resolution 32
    import yaml

    space.write_text(yaml.safe_dump(raw))
    root = tmp_path / "root"
    assert main(["sweep", str(space), "--root", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "student.resolution" in err
    assert not root.exists(), "nothing may be created or launched for a bad space"



def test_a_sweep_leaves_the_process_tracking_uri_alone(first_sweep, monkeypatch):
    """A later sweep in the same process must not inherit this sweep's server (stopped by then)."""
    import os

    assert os.environ.get("MLFLOW_TRACKING_URI") is None


def test_a_frontier_point_is_reproduced_by_pxd_train_with_its_parameters_as_set_flags(first_sweep, mlflow_server, tmp_path):
    """`pxd train SPACE --set <the row's parameters>` trains exactly the trial's stages (same keys)."""
    import yaml

    from orchestrator.results.schema import collect_rows, find_sweep_run

    spec, outcome = first_sweep
    client = MlflowClient(mlflow_server)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(spec.raw, sort_keys=False))
    rows = collect_rows(client, find_sweep_run(client, outcome.sweep_name))
    chosen = [r for r in rows if r.params["student.arch"] == "resnet10t"][:1] + \
             [r for r in rows if r.params["student.arch"] == "blockwise_resnet"][:1]
    assert len(chosen) == 2
    for row in chosen:
        flags = [arg for name, value in row.params.items() for arg in ("--set", f"{name}={value}")]
        out = tmp_path / row.trial_id
        assert main(["train", str(space), *flags, "--json", "--output", str(out)]) == 0
        keys = json.loads((out / "stages.json").read_text())
        tags = client.get_run(row.run_id).data.tags
        assert keys == {kind: tags[f"pxd.stage.{kind}.key"] for kind in ("teacher", "assistant", "student")}


def test_searching_student_weights_trains_one_teacher_and_one_assistant_per_architecture(
        ray_local, mlflow_server, results_root):
    """A continuous kd, a temperature and an lr for the student: 1 teacher (the warmed-up one) + one
    assistant per student architecture + one student per trial."""
    raw = tiny_space(trials=4, max_concurrent=2, sampler={"name": "random", "seed": 3})
    raw["seed"] = 31  # stages of its own in the shared store
    raw["student"]["resolution"] = 16
    raw["distill"]["kd"] = {"uniform": [0.2, 0.9]}
    raw["distill"]["temperature"] = {"choice": [1.0, 2.0]}
    raw["train"]["lr"] = {"loguniform": [0.01, 0.1]}
    raw["teacher"]["train"] = {"lr": 0.05}
    raw["search"]["objectives"] = [{"metric": "val_top1"}, {"metric": "gmacs"}]
    raw["search"]["reference_point"] = {"gmacs": 10.0}
    spec = parse_spec(raw, source_path="reuse.yaml")
    outcome = run_sweep(spec, SweepOptions(name="tiny-reuse", tracking_uri=mlflow_server, root=str(results_root), quiet=True))
    client = MlflowClient(mlflow_server)
    trials = [r for r in _children(client, outcome) if r.data.tags["pxd.state"] == "COMPLETE"]
    assert len(trials) == 4
    archs = {r.data.params["student.arch"] for r in trials}
    parent = client.get_run(outcome.parent_run_id).data.metrics
    assert parent["teachers_trained"] == 1
    assert parent["assistants_trained"] == len(archs)
    assert parent["students_trained"] == 4
    assert len({r.data.tags["pxd.stage.teacher.key"] for r in trials}) == 1


# -- job 3: re-run the frontier for new hardware; job 2: select and register -----------------------------


@pytest.fixture(scope="module")
def remeasured(first_sweep, mlflow_server):
    """The first sweep re-timed on two labels of this machine: eager torch (1 thread), ONNX Runtime."""
    from orchestrator.results.hardware import TimingRequest, remeasure

    _, outcome = first_sweep
    client = MlflowClient(mlflow_server)
    lines: list[str] = []
    tables = {}
    for label, runtime in (("here-torch", "torch"), ("here-ort", "onnxruntime")):
        request = TimingRequest(label=label, runtime=runtime, threads=1, repeats=5, warmup=1, batch_size=2)
        tables[label] = remeasure(client, mlflow_server, outcome.sweep_name, request, report=lines.append)
    return outcome, tables, lines


def test_remeasure_logs_each_label_to_the_trial_runs_and_a_frontier_to_the_sweep(remeasured, mlflow_server):
    outcome, tables, lines = remeasured
    client = MlflowClient(mlflow_server)
    children = [r for r in _children(client, outcome) if r.data.tags["pxd.state"] == "COMPLETE"]
    for run in children:
        for label, runtime in (("here-torch", "torch"), ("here-ort", "onnxruntime")):
            assert run.data.metrics[f"latency_ms.{label}"] > 0 and f"latency_cv.{label}" in run.data.metrics
            record = json.loads(run.data.tags[f"pxd.hardware.{label}"])
            assert record["runtime"] == runtime and record["threads"] == 1 and record["repeats"] == 5
    assert len(tables["here-torch"]["timed"]) == len(children) and not tables["here-torch"]["skipped"]
    assert any("timed" in line for line in lines)  # progress, one line per model
    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id, "hardware/here-ort")}
    assert {"hardware/here-ort/frontier.png", "hardware/here-ort/frontier.html", "hardware/here-ort/frontier.csv"} <= artifacts
    # the label's latency is the compute axis of its frontier
    assert [o["name"] for o in tables["here-ort"]["objectives"]] == ["val_top1", "pixels", "latency_ms.here-ort"]


def test_remeasuring_a_label_again_replaces_its_numbers(remeasured, mlflow_server):
    from orchestrator.results.hardware import TimingRequest, remeasure

    outcome, _, _ = remeasured
    client = MlflowClient(mlflow_server)
    remeasure(client, mlflow_server, outcome.sweep_name,
              TimingRequest(label="here-torch", threads=2, repeats=4, warmup=1, batch_size=2), report=lambda _: None)
    run = next(r for r in _children(client, outcome) if r.data.tags["pxd.state"] == "COMPLETE")
    assert json.loads(run.data.tags["pxd.hardware.here-torch"])["threads"] == 2  # the latest record, not a second one
    assert json.loads(client.get_run(outcome.parent_run_id).data.tags["pxd.hardware_labels"]) == ["here-ort", "here-torch"]


def test_frontier_per_hardware_and_the_comparison_of_two(remeasured, mlflow_server, tmp_path, capsys):
    outcome, _, _ = remeasured
    assert main(["frontier", outcome.sweep_name, "--hardware", "here-ort", "--tracking-uri", mlflow_server]) == 0
    assert "on hardware here-ort" in capsys.readouterr().out
    plot = tmp_path / "compare.png"
    assert main(["frontier", outcome.sweep_name, "--compare", "here-torch", "here-ort", "--plot", str(plot),
                 "--tracking-uri", mlflow_server, "--json"]) == 0
    comparison = json.loads(capsys.readouterr().out)
    assert set(comparison) >= {"stay", "leave", "join"} and plot.stat().st_size > 0
    assert main(["frontier", outcome.sweep_name, "--hardware", "never-timed", "--tracking-uri", mlflow_server]) == 2


def test_select_registers_the_most_accurate_feasible_frontier_point_and_it_loads(remeasured, mlflow_server, capsys,
                                                                                monkeypatch):
    from orchestrator.results.students import load_student

    outcome, tables, _ = remeasured
    front = [r for r in tables["here-ort"]["rows"] if r["on_frontier"]]
    limit = sorted(r["metrics"]["pixels"] for r in front)[0]  # only the cheapest input size passes
    code = main(["select", outcome.sweep_name, "--hardware", "here-ort", "--max-pixels", str(limit), "--name",
                 "tiny-student", "--alias", "edge", "--tracking-uri", mlflow_server, "--json"])
    assert code == 0
    chosen = json.loads(capsys.readouterr().out)
    feasible = [r for r in front if r["metrics"]["pixels"] <= limit]
    assert chosen["metrics"]["val_top1"] == max(r["metrics"]["val_top1"] for r in feasible)
    assert chosen["uri"] == "models:/tiny-student@edge"
    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias("tiny-student", "edge")
    assert version.tags["pxd.sweep"] == outcome.sweep_name and version.tags["pxd.trial_run"] == chosen["run_id"]
    assert version.tags["pxd.hardware"] == "here-ort"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # as a user would, to resolve models:/ URIs
    model = load_student("models:/tiny-student@edge")
    side = chosen["input_size"]
    assert model(torch.zeros(3, 3, side, side)).shape == (3, 4)


def test_select_with_no_feasible_point_names_the_tightest_limit_and_registers_nothing(remeasured, mlflow_server, capsys):
    from mlflow.exceptions import MlflowException

    outcome, _, _ = remeasured
    code = main(["select", outcome.sweep_name, "--max-pixels", "1", "--min-top1", "0.0", "--name", "never-registered",
                 "--tracking-uri", mlflow_server])
    assert code == 2
    assert "--max-pixels" in capsys.readouterr().err
    with pytest.raises(MlflowException):
        MlflowClient(mlflow_server).get_registered_model("never-registered")


def test_pxd_experiments_open_in_the_model_training_view(first_sweep, mlflow_server):
    _, outcome = first_sweep
    client = MlflowClient(mlflow_server)
    assert client.get_experiment(outcome.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def _chromium() -> str:
    """Debian's chromium, else skip with the reason (.ci/run installs it first and fails on such a skip; no
    test installs anything)."""
    import shutil

    pytest.importorskip("playwright.sync_api", reason="the Pareto page test needs the playwright package (pxd[test])")
    found = shutil.which("chromium")
    if found is None:
        pytest.skip("no chromium browser for the Pareto page test: apt-get install chromium (.ci/run does)")
    return found


def test_the_pareto_page_works_inside_the_mlflow_ui(first_sweep, mlflow_server, tmp_path):
    """In headless Chromium: the sweep's frontier.html in MLflow's own artifact viewer shows one point per
    eligible trial, a hover names the trial, and a click on a point shows that trial's run in the whole MLflow UI,
    in a new tab. MLflow's viewer sandboxes the page to scripts only (no popups, no top-level navigation), so a
    plain click there says to Ctrl-click; a Ctrl-click opens the run. The address pxd prints opens the
    experiment's runs in the Model-training view in a fresh browser."""
    import re

    from playwright.sync_api import expect, sync_playwright

    from orchestrator.tracking.server import experiment_page

    executable = _chromium()
    _, outcome = first_sweep
    client = MlflowClient(mlflow_server)
    with tempfile.TemporaryDirectory() as tmp:
        table = json.loads(Path(client.download_artifacts(outcome.parent_run_id, "frontier/frontier.json", tmp)).read_text())
    url = (f"{mlflow_server}/#/experiments/{outcome.experiment_id}/runs/{outcome.parent_run_id}"
           "/artifacts/frontier/frontier.html")
    navigated: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            context.on("page", lambda tab: tab.on("framenavigated", lambda frame: navigated.append(frame.url)))
            page = context.new_page()
            page.goto(url)
            frame = page.frame_locator("iframe.mlflow-html-iframe")
            frame.locator("svg[data-axis]").first.wait_for(timeout=120_000)
            points = frame.locator("svg[data-axis]:visible circle.pt")
            assert points.count() == table["n_eligible"] == 6  # one point per eligible trial
            assert frame.locator("svg[data-axis]:visible circle.pt.front").count() == table["n_frontier"]
            page.screenshot(path=str(tmp_path / "pareto.png"))
            assert (tmp_path / "pareto.png").stat().st_size > 10_000
            front = frame.locator("svg[data-axis]:visible circle.pt.front").first
            row = table["rows"][int(front.get_attribute("data-row"))]
            run_name = client.get_run(row["run_id"]).info.run_name
            front.hover()
            assert row["run_id"] in frame.locator("#pxd-selected").text_content()
            tooltip = front.locator("title").text_content()
            assert row["arch"] in tooltip and f"run {row['run_id']}" in tooltip and "val_top1" in tooltip
            if "allow-popups" not in (page.locator("iframe.mlflow-html-iframe").get_attribute("sandbox") or ""):
                front.click()  # the sandbox blocks the new tab: the page stays and says what opens the run
                expect(frame.locator("#pxd-open")).to_contain_text(
                    f"Ctrl-click (Cmd-click on a Mac) or middle-click the point, or this link, to open run {row['run_id']}")
                expect(front).to_be_visible()
                assert len(context.pages) == 1
            with context.expect_page(timeout=30_000) as opened:
                front.click(modifiers=["ControlOrMeta"])
            tab = opened.value
            expect(tab.get_by_text(run_name, exact=True).first).to_be_visible(timeout=60_000)  # the run's own page
            expect(tab.get_by_text(row["run_id"]).first).to_be_visible()
            tab.screenshot(path=str(tmp_path / "run.png"))
            navigated.append(tab.url)  # a new tab's first navigation can precede its framenavigated hook
            # the address pxd prints, in a fresh browser (MLflow would otherwise open its GenAI view)
            address = re.search(r"https?://\S+", experiment_page(outcome.ui, outcome.experiment_id)).group(0)
            fresh = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            fresh.goto(address)
            sweep_run = client.get_run(outcome.parent_run_id).info.run_name
            expect(fresh.get_by_text(sweep_run, exact=True).first).to_be_visible(timeout=60_000)
            expect(fresh.get_by_text("Model registry", exact=True).first).to_be_visible()  # its sidebar, not GenAI's
            assert f"/#/experiments/{outcome.experiment_id}/runs?" in fresh.url  # GenAI's would move to its overview
        finally:
            browser.close()
    assert any(u.endswith(f"/#/experiments/{outcome.experiment_id}/runs/{row['run_id']}") for u in navigated), navigated
