"""Sweeps that never silently waste compute, mix results or hang: each bad launch is refused before any
compute with one clear error, and a sweep cut by its time budget records its trials as stopped.

Real components throughout: a local Ray, a real `mlflow server`, Optuna RDB studies, the `pxd` CLI in
subprocesses where the process boundary is what is tested.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.driver.launch import SweepOptions, run_sweep
from orchestrator.results import schema
from orchestrator.space.spec import parse_spec, read_yaml
from pxd.errors import ConfigError
from tests.orchestrator.conftest import free_port, tiny_space
from tests.orchestrator.test_faults import REPO, _env

SAFETY_TIMEOUT_S = 600  # a guard against hanging forever; nothing asserts on durations


def _spec(seed: int = 0, **search):
    raw = tiny_space(**search)
    raw["seed"] = seed
    return parse_spec(raw, source_path="guards.yaml")


def _options(root, uri, **extra):
    return SweepOptions(tracking_uri=uri, root=str(root), quiet=True, **extra)


# -- accepted nonsense, refused at parse time -------------------------------------------------------


def test_a_duplicated_yaml_key_is_refused(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("name: x\nsearch:\n  trials: 4\nteacher:\n  epochs: 2\nsearch:\n  trials: 8\n")
    with pytest.raises(ConfigError) as error:
        read_yaml(path)
    assert error.value.field == str(path)
    assert "'search' appears twice at line 2 and line 6" in error.value.message
    path.write_text("student:\n  arch: resnet10t\n  arch: resnet18\n")  # nested too
    with pytest.raises(ConfigError, match="'arch' appears twice"):
        read_yaml(path)


@pytest.mark.parametrize("name", ["quick start/../x", "a/b", "..", "tab\there", "back\\slash"])
def test_a_name_that_is_not_one_folder_is_refused_before_anything_is_created(name, tmp_path):
    raw = tiny_space()
    raw["name"] = name
    with pytest.raises(ConfigError) as error:
        parse_spec(raw)
    assert error.value.field == "name" and "would not be one folder name" in error.value.message
    with pytest.raises(ConfigError) as error:  # the same for --name, before Ray or a server starts
        run_sweep(_spec(), _options(tmp_path / "root", None, name=name))
    assert error.value.field == "--name"
    assert not (tmp_path / "root").exists()


def test_a_mode_that_contradicts_the_metric_is_refused():
    raw = tiny_space(objectives=[{"metric": "val_top1"}, {"metric": "gmacs", "mode": "max"}],
                     reference_point={"gmacs": 0.0})
    with pytest.raises(ConfigError) as error:
        parse_spec(raw)
    assert error.value.field == "search.objectives.1.mode" and "mode is min" in error.value.message


@pytest.mark.parametrize(("reference", "field"), [
    ({"val_top1": 1.5, "pixels": 1024}, "search.reference_point.val_top1"),
    ({"val_top1": 1.0, "pixels": 1024}, "search.reference_point.val_top1"),
    ({"val_top1": 0.0, "pixels": 500}, "search.reference_point.pixels"),  # 24 px students have 576 pixels
])
def test_a_reference_point_valid_trials_cannot_beat_is_refused(reference, field):
    with pytest.raises(ConfigError) as error:
        parse_spec(tiny_space(reference_point=reference))
    assert error.value.field == field


# -- names and resume -------------------------------------------------------------------------------


def test_default_sweep_names_never_collide():
    from orchestrator.driver.folder import default_name

    spec = _spec()
    assert len({default_name(spec) for _ in range(50)}) == 50  # same second, different names


def test_an_existing_sweep_name_is_refused_without_resume(ray_local, mlflow_server, tmp_path):
    (tmp_path / "sweeps" / "taken").mkdir(parents=True)
    with pytest.raises(ConfigError) as error:
        run_sweep(_spec(), _options(tmp_path, mlflow_server, name="taken"))
    assert error.value.field == "--name" and "--resume" in error.value.message
    assert schema.find_sweep_run(MlflowClient(mlflow_server), "taken") is None  # nothing recorded


def test_a_name_the_tracking_server_already_holds_is_refused(ray_local, mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment(f"guards-{free_port()}")
    client.create_run(experiment, tags={schema.Tag.KIND: schema.KIND_SWEEP, schema.Tag.SWEEP: "held-elsewhere"})
    with pytest.raises(ConfigError, match="already holds a sweep named 'held-elsewhere'"):
        run_sweep(_spec(), _options(tmp_path, mlflow_server, name="held-elsewhere"))
    assert not (tmp_path / "sweeps" / "held-elsewhere").exists()  # the claimed directory is given back


def test_resume_refuses_a_changed_space_with_a_readable_diff(ray_local, mlflow_server, tmp_path):
    original = _spec()
    sweep_dir = tmp_path / "sweeps" / "resumable"
    (sweep_dir / "tune").mkdir(parents=True)
    (sweep_dir / "spec.yaml").write_text(yaml.safe_dump(original.raw, sort_keys=False))
    changed = copy.deepcopy(original.raw)
    changed["student"]["resolution"] = {"choice": [8, 16]}
    changed["search"]["objectives"][1] = {"metric": "gmacs", "mode": "min"}
    changed["search"]["reference_point"] = {"val_top1": 0.0, "gmacs": 1.0}
    with pytest.raises(ConfigError) as error:
        run_sweep(parse_spec(changed), _options(tmp_path, mlflow_server, name="resumable", resume=True))
    assert error.value.field == "--resume"
    assert "student.resolution.choice.2: 24 → (unset)" in error.value.message
    assert "search.objectives.1.metric: 'pixels' → 'gmacs'" in error.value.message


def test_resume_refuses_a_lowered_budget(ray_local, mlflow_server, tmp_path):
    original = _spec(trials=6, timeout_s=600)
    sweep_dir = tmp_path / "sweeps" / "lowered"
    (sweep_dir / "tune").mkdir(parents=True)
    (sweep_dir / "spec.yaml").write_text(yaml.safe_dump(original.raw, sort_keys=False))
    with pytest.raises(ConfigError) as error:
        run_sweep(_spec(trials=4, timeout_s=600), _options(tmp_path, mlflow_server, name="lowered", resume=True))
    assert "search.trials: 6 → 4 (a budget may only be raised on resume)" in error.value.message
    with pytest.raises(ConfigError, match=r"search.timeout_s: 600 → 60 \(a budget may only be raised"):
        run_sweep(_spec(trials=6, timeout_s=60), _options(tmp_path, mlflow_server, name="lowered", resume=True))


def test_resume_with_a_raised_trial_budget_runs_only_the_new_trials(ray_local, mlflow_server, tmp_path):
    first = run_sweep(_spec(seed=31, trials=2), _options(tmp_path, mlflow_server, name="raised"))
    assert len([r for r in first.rows if r.state == "COMPLETE"]) == 2
    resumed = run_sweep(_spec(seed=31, trials=4), _options(tmp_path, mlflow_server, name="raised", resume=True))
    assert resumed.parent_run_id == first.parent_run_id
    complete = [r for r in resumed.rows if r.state == "COMPLETE"]
    assert len(complete) == 4 and len({r.trial_id for r in complete}) == 4
    study = optuna.load_study(study_name="raised", storage=f"sqlite:///{tmp_path / 'sweeps/raised/optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    combos = {(t.params["student.arch"], t.params["student.resolution"]) for t in study.trials}
    assert len(combos) == 4, "the grid sampler goes on where the first launch stopped"
    parent = MlflowClient(mlflow_server).get_run(first.parent_run_id)
    assert json.loads(parent.data.tags[schema.Tag.BUDGET])["trials"] == 4
    assert parent.data.params[schema.Param.TRIALS] == "2"  # what the sweep was launched with
    stored = yaml.safe_load((tmp_path / "sweeps/raised/spec.yaml").read_text())
    assert stored["search"]["trials"] == 4  # a later resume compares with the raised space


def test_resume_reaches_the_new_embedded_server_when_the_first_launchs_port_is_gone(ray_local, tmp_path, monkeypatch):
    """Without --tracking-uri each launch starts its own embedded server; a resumed sweep's server listens
    on another port (here the first one's is held by something else), and what Tune restores of the first
    launch (recorded trials, the MO-ASHA scheduler, the lost-attempt callback) must talk to the new one."""
    import socket

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a stale URI fails at once, not after minutes
    root = tmp_path / "root"
    early = {"kind": "moasha", "grace_period": 1, "reduction_factor": 2}
    first = run_sweep(_spec(seed=33, trials=2, early_stopping=early), _options(root, None, name="moved"))
    assert len([r for r in first.rows if r.state == "COMPLETE"]) == 2
    old_port = int(first.tracking_uri.rsplit(":", 1)[1])
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the old server's closed connections linger
        squatter.bind(("127.0.0.1", old_port))  # bound, not listening: a request to the old URI is refused at once
        resumed = run_sweep(_spec(seed=33, trials=4, early_stopping=early),
                            _options(root, None, name="moved", resume=True))
    assert resumed.tracking_uri != first.tracking_uri and resumed.parent_run_id == first.parent_run_id
    assert len({r.trial_id for r in resumed.rows if r.state in ("COMPLETE", "PRUNED")}) == 4
    from orchestrator.tracking.server import resolve_tracking

    target = resolve_tracking(None, root, read_only=True)
    try:
        assert MlflowClient(target.uri).get_run(first.parent_run_id).info.status == "FINISHED"
    finally:
        target.close()


def test_a_launch_that_fails_marks_its_parent_run_failed(ray_local, mlflow_server, tmp_path, monkeypatch):
    """A launch ended by an error leaves its sweep's parent run FAILED, as MLflow's own start_run does,
    not RUNNING forever; a resume sets it RUNNING again and finishes it."""
    import ray.tune

    def broken_fit(self):
        raise RuntimeError("the tuner broke")  # a fault injected after the parent run exists

    monkeypatch.setattr(ray.tune.Tuner, "fit", broken_fit)
    with pytest.raises(RuntimeError, match="the tuner broke"):
        run_sweep(_spec(seed=35, trials=1), _options(tmp_path, mlflow_server, name="broke"))
    client = MlflowClient(mlflow_server)
    parent = schema.find_sweep_run(client, "broke")
    assert parent is not None and parent.info.status == "FAILED"
    monkeypatch.undo()
    resumed = run_sweep(_spec(seed=35, trials=1), _options(tmp_path, mlflow_server, name="broke", resume=True))
    assert client.get_run(resumed.parent_run_id).info.status == "FINISHED"


def test_the_time_budget_is_the_latest_launchs(tmp_path):
    from orchestrator.driver.budget import LaunchBudget, SweepSearchGenerator, write_budget
    from orchestrator.driver.searcher import make_searcher

    budget = tmp_path / "budget.json"
    write_budget(tmp_path, trials=3, timeout_s=0)
    stopper = LaunchBudget(budget)
    assert stopper.stop_all()  # a zero budget has run out
    time.sleep(0.01)  # a new mtime
    write_budget(tmp_path, trials=5, timeout_s=3600)  # the resume raised both
    assert not stopper.stop_all()
    write_budget(tmp_path, trials=5, timeout_s=None)
    assert not stopper.stop_all()
    # Tune restores the generator's target from its checkpoint: the budget file raises it, never lowers it
    generator = SweepSearchGenerator(make_searcher(_spec(), "gen", f"sqlite:///{tmp_path / 'o.db'}"), budget)
    generator.set_state({"counter": 3, "total_samples": 3, "finished": False, "experiment": None})
    assert generator.total_samples == 5 and not generator.is_finished()
    write_budget(tmp_path, trials=2, timeout_s=None)
    generator.set_state({"counter": 3, "total_samples": 3, "finished": False, "experiment": None})
    assert generator.total_samples == 3 and generator.is_finished()


def test_resume_checks_the_stored_studys_objectives(ray_local, mlflow_server, tmp_path):
    spec = _spec()
    sweep_dir = tmp_path / "sweeps" / "study-check"
    (sweep_dir / "tune").mkdir(parents=True)
    (sweep_dir / "spec.yaml").write_text(yaml.safe_dump(spec.raw, sort_keys=False))
    storage = f"sqlite:///{sweep_dir / 'optuna.db'}"
    study = optuna.create_study(study_name="study-check", storage=storage, directions=["maximize", "maximize"])
    study.set_metric_names(["val_top1", "throughput_ips"])
    with pytest.raises(ConfigError, match="optimises"):
        run_sweep(spec, _options(tmp_path, mlflow_server, name="study-check", resume=True))


# -- resources the cluster does not have -----------------------------------------------------------


def test_gpu_resources_the_cluster_lacks_are_refused_before_compute(ray_local, mlflow_server, tmp_path):
    with pytest.raises(ConfigError) as error:
        run_sweep(_spec(resources={"cpu": 1, "gpu": 1}), _options(tmp_path, mlflow_server, name="gpu-less"))
    assert error.value.field == "search.resources.gpu" and "has 0" in error.value.message
    assert not (tmp_path / "sweeps" / "gpu-less").exists()


def test_a_sweep_refused_for_resources_starts_no_tracking_server(ray_local, tmp_path, monkeypatch):
    """With the embedded store, a sweep refused after Ray is up (here: GPUs the cluster lacks) has started
    no MLflow server and created no store: the resources are checked before the tracking server starts."""
    from orchestrator.tracking.server import SERVER_FILE, EmbeddedServer

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "root"
    with pytest.raises(ConfigError) as error:
        run_sweep(_spec(resources={"cpu": 1, "gpu": 1}), _options(root, None, name="gpu-less-embedded"))
    assert error.value.field == "search.resources.gpu"
    assert EmbeddedServer(root).running() is None
    for created in (SERVER_FILE, "mlflow.db", "mlflow-server.log", "mlartifacts", "sweeps"):
        assert not (root / created).exists(), f"{created} was created before the error"


def test_a_latency_device_that_is_not_there_is_refused_before_compute(ray_local, mlflow_server, tmp_path):
    with pytest.raises(ConfigError) as error:
        run_sweep(_spec(latency={"device": "cuda"}), _options(tmp_path, mlflow_server, name="no-cuda"))
    assert error.value.field == "search.latency.device"


def _cli(tmp_path: Path, *args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    space = tmp_path / "space.yaml"
    raw = tiny_space(trials=1, max_concurrent=1)
    raw["seed"] = 21
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    env = _env(RAY_TMPDIR=tempfile.mkdtemp(prefix="pxdray"), **(env_extra or {}))
    env.pop("RAY_ADDRESS", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", str(space), "--root", str(tmp_path / "root"),
                           "--quiet", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=SAFETY_TIMEOUT_S)


def test_an_unreachable_ray_address_fails_with_a_clear_error(mlflow_server, tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    # a lease store every node could reach (never connected to: the address is checked first)
    storage = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
    done = _cli(tmp_path, "--ray-address", dead, "--tracking-uri", mlflow_server, "--optuna-storage", storage)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"--ray-address: cannot reach {dead}" in done.stderr


@pytest.mark.parametrize("storage", [None, "sqlite:///optuna.db"])
def test_a_cluster_sweep_without_a_lease_store_every_node_reaches_is_refused_before_launch(mlflow_server, tmp_path,
                                                                                          storage):
    """Stage leases live in the Optuna database; a SQLite file on the driver's disk is not shared by the
    nodes, and single-flight would be lost. Nothing listens at the Ray address: the refusal comes first."""
    root = tmp_path / "root"
    options = SweepOptions(tracking_uri=mlflow_server, root=str(root), quiet=True, optuna_storage=storage,
                           ray_address=f"127.0.0.1:{free_port()}")
    with pytest.raises(ConfigError) as error:
        run_sweep(_spec(), options)
    assert error.value.field == "--optuna-storage"
    assert "every node must reach" in error.value.message and "postgresql+psycopg2://" in error.value.message
    assert not root.exists(), "nothing may be created or launched before the error"


@pytest.mark.slow
def test_without_ray_address_a_stale_cluster_is_neither_joined_nor_waited_on(mlflow_server, tmp_path):
    # RAY_ADDRESS names a cluster that is gone (as Ray's own state does after an earlier `ray start`)
    done = _cli(tmp_path, "--tracking-uri", mlflow_server, "--json", env_extra={"RAY_ADDRESS": f"127.0.0.1:{free_port()}"})
    assert done.returncode == 0, done.stderr[-3000:]


# -- the time budget -------------------------------------------------------------------------------


@pytest.mark.slow
def test_trials_cut_by_the_time_budget_are_recorded_as_stopped(ray_local, mlflow_server, tmp_path):
    raw = tiny_space(trials=4, max_concurrent=1, timeout_s=30)
    raw["seed"] = 23
    raw["student"]["epochs"] = 400  # the first trial is still training when the budget runs out
    spec = parse_spec(raw, source_path="budget.yaml")
    outcome = run_sweep(spec, _options(tmp_path, mlflow_server, name="budget-cut"))
    client = MlflowClient(mlflow_server)
    runs = schema.trial_runs(client, client.get_run(outcome.parent_run_id))
    states = {run.data.tags[schema.Tag.TRIAL_ID]: run.data.tags[schema.Tag.STATE] for run in runs}
    assert "PRUNED" in states.values() and "RUNNING" not in states.values() and "FAILED" not in states.values()
    for run in runs:
        if run.data.tags[schema.Tag.STATE] == "PRUNED":
            assert run.info.status == "KILLED" and "search.timeout_s" in run.data.tags[schema.Tag.ERROR]
    study = optuna.load_study(study_name="budget-cut", storage=f"sqlite:///{tmp_path / 'sweeps/budget-cut/optuna.db'}")
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    optuna_states = {t.user_attrs["tune_trial_id"]: t.state.name for t in study.trials}
    assert states == {k: v for k, v in optuna_states.items() if k in states}  # Optuna and MLflow agree
    assert study.metric_names == ["val_top1", "pixels"]  # named objectives in optuna-dashboard
