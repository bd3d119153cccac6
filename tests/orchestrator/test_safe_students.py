"""Students that are safe to load: a trial logs its student as tensors plus data with the weights file's sha256
on its run, and every loader pxd has (`pxd remeasure`, `pxd select`'s check, the line it prints for users)
rebuilds it from tensors only, after checking that sha256.

Payloads are planted as someone who can write the tracking server's artifacts could: a pickle whose load
would create a file, in place of a student's weights file, and an old-style pickled model (MLflow's pytorch
flavor, what pxd logged before). No loader may create that file; each says which run it refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import pickle
import subprocess
import sys
from pathlib import Path

import mlflow
import mlflow.pytorch
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from torch import nn

from orchestrator.cli import main
from orchestrator.driver.finish import finish_sweep
from orchestrator.driver.parent_run import ensure_experiment, open_parent_run
from orchestrator.results import schema
from orchestrator.results.students import TRUST_FLAG, check_student, load_student
from orchestrator.space.spec import parse_spec
from orchestrator.tracking.server import fluent_tracking_uri
from orchestrator.worker.context import TrialContext
from orchestrator.worker.model_log import log_student
from orchestrator.worker.trial import run_trial
from pxd import students
from pxd.errors import StudentRefused
from pxd.models import create_model
from pxd.sections import StudentConfig
from tests.orchestrator.conftest import tiny_space

EXPERIMENT = "safe-students-test"
QUICK = ["--repeats", "2", "--warmup", "0", "--batch", "1"]
SIDE = 8
STUDENT = StudentConfig(arch="blockwise_resnet", resolution=SIDE, depths=(1, 1, 1, 1), widths=(8, 8, 16, 16))


class Payload:
    """What an attacker plants: unpickling it creates `marker` (it could as well run anything else)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


class PayloadModule(nn.Module):
    """A module whose pickle is the payload: what an old-style (pickled) student can hold."""

    def __init__(self, marker: Path) -> None:
        super().__init__()
        self.marker = str(marker)

    def __reduce_ex__(self, protocol):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _spec():
    raw = tiny_space()
    raw["seed"] = 47  # stages of its own: the stage store is shared with the other sweep tests
    raw["student"]["arch"] = "blockwise_resnet"
    raw["student"]["resolution"] = SIDE
    return parse_spec(raw, source_path="safe.yaml")


@pytest.fixture(scope="module")
def experiment(mlflow_server):
    return ensure_experiment(MlflowClient(mlflow_server), EXPERIMENT)


def _trained_student() -> nn.Module:
    """A student whose weights and batch-norm statistics are not those it was built with."""
    torch.manual_seed(5)
    model = create_model(STUDENT, 4)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        images, labels = torch.randn(8, 3, SIDE, SIDE), torch.randint(0, 4, (8,))
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimiser.step()
    return model.eval()


def _hand_made_sweep(uri: str, experiment: str, name: str, log) -> tuple[str, str, str]:
    """A finished sweep with one COMPLETE trial whose student `log()` logs (inside the trial's run):
    (sweep run, trial run, model URI)."""
    client = MlflowClient(uri)
    parent = open_parent_run(client, experiment, name, _spec(), "sqlite:///unused.db", resume=False)
    tags = schema.trial_start_tags(sweep=name, parent_run_id=parent, trial_id=f"{name}-0", params={},
                                   hostname="here", node_id="local", pid=os.getpid())
    run = client.create_run(experiment, tags={**tags, schema.Tag.STATE: "COMPLETE", schema.Tag.FEASIBLE: "true"})
    run_id = run.info.run_id
    with fluent_tracking_uri(uri), mlflow.start_run(run_id=run_id):
        model_uri = log()
    client.set_tag(run_id, schema.Tag.MODEL_URI, model_uri)
    client.log_metric(run_id, "val_top1", 0.5)
    client.log_metric(run_id, "pixels", float(SIDE * SIDE))
    client.set_terminated(run_id)
    return parent, run_id, model_uri


def _tensor_sweep(uri: str, experiment: str, name: str) -> tuple[str, str, str]:
    return _hand_made_sweep(uri, experiment, name, lambda: log_student(_trained_student(), STUDENT))


def _pickled_sweep(uri: str, experiment: str, name: str, module: nn.Module) -> tuple[str, str, str]:
    """A sweep whose student was logged as an earlier pxd did: the whole module pickled, no sha256 tag."""
    return _hand_made_sweep(uri, experiment, name, lambda: str(mlflow.pytorch.log_model(
        module, name="student", serialization_format="pickle", pip_requirements=["torch"]).model_uri))


def _model_id(model_uri: str) -> str:
    return model_uri.removeprefix("models:/")


def _plant(uri: str, model_uri: str, files: dict[str, bytes], tmp_path: Path) -> None:
    """Overwrite files of a logged model on the tracking server, as a writer of its artifacts could."""
    folder = tmp_path / "planted"
    for relative, content in files.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(content)
    MlflowClient(uri).log_model_artifacts(_model_id(model_uri), str(folder))


def _versions(uri: str) -> list[tuple[str, str]]:
    return sorted((v.name, v.version) for v in MlflowClient(uri).search_model_versions())


# -- a good student round-trips -----------------------------------------------------------------------------

def test_a_student_is_logged_as_tensors_and_loads_with_the_same_logits(mlflow_server, experiment, monkeypatch):
    trained = _trained_student()
    _, run_id, model_uri = _hand_made_sweep(mlflow_server, experiment, "safe-round-trip",
                                            lambda: log_student(trained, STUDENT))
    with fluent_tracking_uri(mlflow_server):
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    flavors = yaml.safe_load((local / "MLmodel").read_text())["flavors"]
    assert list(flavors) == ["python_function"] and flavors["python_function"]["loader_module"] == "pxd.students"
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pth", ".pt")], "no pickle is logged"
    weights = local / "data" / "student" / "student.safetensors"
    tag = MlflowClient(mlflow_server).get_run(run_id).data.tags[schema.Tag.STUDENT_SHA256]
    assert tag == hashlib.sha256(weights.read_bytes()).hexdigest()
    meta = yaml.safe_load((local / "MLmodel").read_text())["signature"]
    assert json.loads(meta["inputs"])[0]["tensor-spec"] == {"dtype": "float32", "shape": [-1, 3, SIDE, SIDE]}
    assert json.loads(meta["outputs"])[0]["tensor-spec"] == {"dtype": "float32", "shape": [-1, 4]}
    images = torch.randn(5, 3, SIDE, SIDE)
    with torch.no_grad():
        expected = trained(images)
        for reference in (model_uri, run_id):  # pxd's loader, by model URI and by trial run
            assert torch.equal(load_student(reference, mlflow_server)(images), expected)
    # the MLflow way: pxd's own loader module, tensors only
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    served = mlflow.pyfunc.load_model(model_uri)
    assert torch.equal(torch.as_tensor(served.predict(images.numpy())), expected)
    assert isinstance(served.get_raw_model(), nn.Module)


def test_a_trials_student_carries_its_sha256_and_select_registers_one_that_loads(mlflow_server, experiment,
                                                                                 monkeypatch, capsys):
    spec = _spec()
    client = MlflowClient(mlflow_server)
    parent = open_parent_run(client, experiment, "safe-sweep", spec, "sqlite:///unused.db", resume=False)
    context = TrialContext(spec=spec, sweep_name="safe-sweep", tracking_uri=mlflow_server, experiment_id=experiment,
                           parent_run_id=parent)
    trial = run_trial({}, context)
    finish_sweep(client, parent)
    assert check_student(trial.run_id, mlflow_server) == "tensors"
    assert main(["remeasure", "safe-sweep", "--hardware", "safe-here", *QUICK, "--tracking-uri", mlflow_server]) == 0
    assert "safe-here" in "".join(client.get_run(trial.run_id).data.metrics)
    capsys.readouterr()
    assert main(["select", "safe-sweep", "--name", "safe-student", "--alias", "champion", "--tracking-uri",
                 mlflow_server, "--json"]) == 0
    chosen = json.loads(capsys.readouterr().out)
    assert chosen["run_id"] == trial.run_id and "load_student(" in chosen["load"][-1]
    assert "trust_pickles" not in chosen["load"][-1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    with torch.no_grad():
        loaded = load_student("models:/safe-student@champion")(torch.zeros(2, 3, SIDE, SIDE))
    served = mlflow.pyfunc.load_model("models:/safe-student@champion").predict(torch.zeros(2, 3, SIDE, SIDE).numpy())
    assert loaded.shape == (2, 4) and torch.allclose(loaded, torch.as_tensor(served))


# -- a pickle in place of the weights file ------------------------------------------------------------------

def test_a_weights_file_replaced_by_a_pickle_is_refused_naming_the_run(mlflow_server, experiment, tmp_path, capsys):
    marker = tmp_path / "pwned"
    name = "safe-swapped-weights"
    _, run_id, model_uri = _tensor_sweep(mlflow_server, experiment, name)
    _plant(mlflow_server, model_uri, {"data/student/student.safetensors": pickle.dumps(Payload(marker))}, tmp_path)
    with pytest.raises(StudentRefused) as refused:
        load_student(model_uri, mlflow_server)
    assert run_id in str(refused.value) and "sha256" in str(refused.value)
    assert main(["remeasure", name, "--hardware", "safe-swapped", *QUICK, "--tracking-uri", mlflow_server]) == 2
    err = capsys.readouterr().err
    assert f"the student of run {run_id}" in err and "sha256" in err
    before = _versions(mlflow_server)
    assert main(["select", name, "--name", "safe-never", "--tracking-uri", mlflow_server]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pxd: error: the student of run {run_id}: its weights file") and "re-run the trial" in err
    assert _versions(mlflow_server) == before
    # MLflow's own way reads pxd's loader module, which checks the manifest beside the weights
    with fluent_tracking_uri(mlflow_server), pytest.raises(StudentRefused):
        mlflow.pyfunc.load_model(model_uri)
    assert not marker.exists()
    with fluent_tracking_uri(mlflow_server):  # the control: the planted file is live, unpickling it runs it
        planted = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "control")))
    pickle.loads((planted / "data" / "student" / "student.safetensors").read_bytes())
    assert marker.exists()


def test_a_payload_with_a_matching_sha256_is_still_never_unpickled(mlflow_server, experiment, tmp_path):
    """A writer of the run and of the artifacts both (the manifest and the tag rewritten to the payload's
    sha256): the weights are still read as tensors only, so the payload is refused, not run."""
    marker = tmp_path / "pwned"
    _, run_id, model_uri = _tensor_sweep(mlflow_server, experiment, "safe-forged")
    payload = pickle.dumps(Payload(marker))
    forged = hashlib.sha256(payload).hexdigest()
    manifest = {"format": students.STUDENT_FORMAT, "weights": "student.safetensors",
                "weights_format": "safetensors", "sha256": forged}
    _plant(mlflow_server, model_uri, {"data/student/student.safetensors": payload,
                                      "data/student/student.json": json.dumps(manifest).encode()}, tmp_path)
    MlflowClient(mlflow_server).set_tag(run_id, schema.Tag.STUDENT_SHA256, forged)
    with pytest.raises(StudentRefused) as refused:
        load_student(run_id, mlflow_server)
    assert run_id in str(refused.value) and "cannot be read as safetensors tensors" in str(refused.value)
    with fluent_tracking_uri(mlflow_server), pytest.raises(StudentRefused):
        mlflow.pyfunc.load_model(model_uri)
    assert not marker.exists()


def test_the_torch_weights_format_is_read_with_weights_only(tmp_path):
    """Where safetensors is missing, weights are a torch file read with weights_only=True: a payload in one
    (its sha256 recorded as the manifest's) is refused, not run."""
    marker = tmp_path / "pwned"
    trained = _trained_student()
    folder = tmp_path / "student"
    sha256 = students.save_student(trained, students.student_architecture(STUDENT, 4), folder, fmt="torch")
    images = torch.randn(2, 3, SIDE, SIDE)
    with torch.no_grad():
        assert torch.equal(students.load_student(folder, expected_sha256=sha256)(images), trained(images))
    torch.save(Payload(marker), folder / "student.pt")
    forged = hashlib.sha256((folder / "student.pt").read_bytes()).hexdigest()
    with pytest.raises(StudentRefused, match="cannot be read as torch tensors"):
        students.load_student(folder, expected_sha256=forged)
    assert not marker.exists()


# -- an old-style pickled model -----------------------------------------------------------------------------

def test_a_pickled_student_is_refused_naming_the_run_and_the_flag(mlflow_server, experiment, tmp_path, capsys):
    marker = tmp_path / "pwned"
    name = "safe-old-payload"
    _, run_id, model_uri = _pickled_sweep(mlflow_server, experiment, name, PayloadModule(marker))
    assert not marker.exists()  # logging pickles it; only loading would run it
    with pytest.raises(StudentRefused) as refused:
        load_student(model_uri, mlflow_server)
    assert run_id in str(refused.value) and TRUST_FLAG in str(refused.value)
    assert main(["remeasure", name, "--hardware", "safe-old", *QUICK, "--tracking-uri", mlflow_server]) == 2
    err = capsys.readouterr().err
    assert f"the student of run {run_id} is a pickled PyTorch model" in err and TRUST_FLAG in err
    before = _versions(mlflow_server)
    assert main(["select", name, "--name", "safe-never", "--tracking-uri", mlflow_server]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pxd: error: the student of run {run_id} is a pickled PyTorch model") and TRUST_FLAG in err
    assert _versions(mlflow_server) == before
    assert not marker.exists()
    # the control: what loading it the old way does (the payload runs, then MLflow finds no module)
    with fluent_tracking_uri(mlflow_server), pytest.raises(AttributeError):
        mlflow.pytorch.load_model(model_uri)
    assert marker.exists()


def test_a_pickle_in_place_of_a_tensor_student_is_refused_even_when_trusted(mlflow_server, experiment, tmp_path):
    marker = tmp_path / "pwned"
    _, _, old_uri = _pickled_sweep(mlflow_server, experiment, "safe-old-source", PayloadModule(marker))
    _, run_id, model_uri = _tensor_sweep(mlflow_server, experiment, "safe-replaced-model")
    with fluent_tracking_uri(mlflow_server):
        old = Path(mlflow.artifacts.download_artifacts(artifact_uri=old_uri, dst_path=str(tmp_path / "old")))
    _plant(mlflow_server, model_uri, {str(p.relative_to(old)): p.read_bytes() for p in old.rglob("*") if p.is_file()},
           tmp_path)
    for trusted in (False, True):
        with pytest.raises(StudentRefused) as refused:
            load_student(model_uri, mlflow_server, trust_pickles=trusted)
        assert run_id in str(refused.value) and "replaced after logging" in str(refused.value)
    assert not marker.exists()


def test_with_trust_pickles_an_earlier_pxds_student_is_timed_and_registered(mlflow_server, experiment, capsys):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4)).eval()
    name = "safe-old-trusted"
    _, run_id, _ = _pickled_sweep(mlflow_server, experiment, name, module)
    assert main(["remeasure", name, "--hardware", "safe-trusted", *QUICK, TRUST_FLAG, "--tracking-uri",
                 mlflow_server]) == 0
    assert "latency_ms.safe-trusted" in MlflowClient(mlflow_server).get_run(run_id).data.metrics
    capsys.readouterr()
    assert main(["select", name, "--name", "safe-trusted", TRUST_FLAG, "--tracking-uri", mlflow_server, "--json"]) == 0
    chosen = json.loads(capsys.readouterr().out)
    assert chosen["pickled"] and "trust_pickles=True" in chosen["load"][-1]
    with torch.no_grad():
        images = torch.randn(2, 3, SIDE, SIDE)
        loaded = load_student("models:/safe-trusted@champion", mlflow_server, trust_pickles=True)
        assert torch.equal(loaded(images), module(images))


@pytest.mark.slow  # a fresh interpreter, as a user runs the printed line
def test_the_printed_load_line_refuses_a_student_swapped_after_it_was_registered(mlflow_server, experiment,
                                                                               tmp_path, capsys):
    marker = tmp_path / "pwned"
    name = "safe-registered-then-swapped"
    _, run_id, model_uri = _tensor_sweep(mlflow_server, experiment, name)
    assert main(["select", name, "--name", "safe-swapped", "--tracking-uri", mlflow_server]) == 0
    line = capsys.readouterr().out.split("load it:\n", 1)[1].strip().splitlines()[0].strip()
    assert "load_student(" in line and "models:/safe-swapped@champion" in line
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{env.get('PATH', '')}"
    works = subprocess.run(["bash", "-c", line], env=env, capture_output=True, text=True, timeout=300)
    assert works.returncode == 0 and "torch.Size([1, 4])" in works.stdout, works.stderr[-2000:]
    _plant(mlflow_server, model_uri, {"data/student/student.safetensors": pickle.dumps(Payload(marker))}, tmp_path)
    refused = subprocess.run(["bash", "-c", line], env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and f"StudentRefused: the student of run {run_id}" in refused.stderr
    assert not marker.exists()
