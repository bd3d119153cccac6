"""`pxd select`, `pxd remeasure` and `pxd frontier` on bad input: one clear error before any compute or write,
nothing recorded is lost or changed; and what they record and print when the input is good.

One small sweep (three in-process trials against the session's real MLflow server: two copies of one 16 px
student that differ only in a distillation weight, and an 8 px one) serves every test; sweeps whose students
cannot load, or that an older pxd left with a bogus reference latency, are made from real runs by hand.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.driver.finish import finish_sweep
from orchestrator.driver.parent_run import ensure_experiment, open_parent_run
from orchestrator.results import schema
from orchestrator.results.hardware import TimingRequest, remeasure
from orchestrator.space.spec import parse_spec
from orchestrator.worker.context import TrialContext
from orchestrator.worker.trial import run_trial
from pxd.errors import ConfigError
from tests.orchestrator.conftest import free_port, tiny_space

SWEEP = "inputs-sweep"
EXPERIMENT = "inputs-test"
QUICK = ["--repeats", "3", "--warmup", "0", "--batch", "1"]


def _spec():
    raw = tiny_space()
    raw["seed"] = 43  # stages of its own: the stage store is shared with the other sweep tests
    raw["student"]["arch"] = "blockwise_resnet"
    raw["student"]["resolution"] = {"choice": [8, 16]}
    raw["distill"]["kd"] = {"choice": [0.5, 1.0]}
    return parse_spec(raw, source_path="inputs.yaml")


@pytest.fixture(scope="module")
def sweep(mlflow_server):
    """A finished sweep of three trials: (16 px, kd 1.0), (16 px, kd 0.5), (8 px, kd 1.0)."""
    spec = _spec()
    client = MlflowClient(mlflow_server)
    experiment_id = ensure_experiment(client, EXPERIMENT)
    parent = open_parent_run(client, experiment_id, SWEEP, spec, "sqlite:///unused.db", resume=False)
    context = TrialContext(spec=spec, sweep_name=SWEEP, tracking_uri=mlflow_server, experiment_id=experiment_id,
                           parent_run_id=parent)
    trials = {key: run_trial({"student.resolution": key[0], "distill.kd": key[1]}, context)
              for key in ((16, 1.0), (16, 0.5), (8, 1.0))}
    finish_sweep(client, parent)
    return {"parent": parent, "experiment_id": experiment_id, "trials": {k: t.run_id for k, t in trials.items()},
            "spec": spec}


@pytest.fixture(scope="module")
def timed(sweep, mlflow_server):
    """The sweep re-timed on this machine as label `here` through the CLI."""
    assert main(["remeasure", SWEEP, "--hardware", "here", *QUICK, "--tracking-uri", mlflow_server]) == 0
    return sweep


def _versions(uri: str) -> list[tuple[str, str]]:
    return sorted((v.name, v.version) for v in MlflowClient(uri).search_model_versions())


def _parent_tags(uri: str, run_id: str) -> dict[str, str]:
    return dict(MlflowClient(uri).get_run(run_id).data.tags)


def _hand_made_sweep(client: MlflowClient, sweep: dict, name: str, model_uri: str, metrics: dict[str, float]) -> str:
    """A sweep run with one COMPLETE trial run holding `model_uri`, written as a sweep writes them."""
    parent = open_parent_run(client, sweep["experiment_id"], name, sweep["spec"], "sqlite:///unused.db", resume=False)
    tags = schema.trial_start_tags(sweep=name, parent_run_id=parent, trial_id=f"{name}-0", params={},
                                   hostname="here", node_id="local", pid=os.getpid())
    run = client.create_run(sweep["experiment_id"], tags={**tags, schema.Tag.STATE: "COMPLETE",
                                                          schema.Tag.FEASIBLE: "true", schema.Tag.MODEL_URI: model_uri})
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    return parent


# -- pxd select: names, aliases and limits are checked before anything is registered -----------------------

@pytest.mark.parametrize(("flags", "field", "says"), [
    (["--name", "qs-student", "--alias", "v1"], "--alias", "reserved"),
    (["--alias", "latest"], "--alias", "reserved"),
    (["--alias", "bad alias"], "--alias", "alphanumerics"),
    (["--name", "a/b"], "--name", "cannot contain '/'"),
    (["--name", ""], "--name", "empty"),
    (["--name", "   "], "--name", "empty"),
])
def test_select_refuses_a_bad_model_name_or_alias_and_registers_nothing(sweep, mlflow_server, capsys, flags, field,
                                                                       says):
    before = _versions(mlflow_server)
    assert main(["select", SWEEP, *flags, "--tracking-uri", mlflow_server]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pxd: error: {field}: ") and says in err and "Traceback" not in err
    assert _versions(mlflow_server) == before


@pytest.mark.parametrize(("flags", "says"), [
    (["--min-top1", "75"], "a fraction in [0, 1], got 75 (for 75 %, pass 0.75)"),
    (["--min-top1", "-1"], "a fraction in [0, 1]"),
    (["--min-top1", "nan"], "a fraction in [0, 1]"),
    (["--max-pixels", "-5"], "above 0"),
    (["--max-pixels", "nan"], "finite"),
    (["--max-gmacs", "0"], "above 0"),
    (["--max-latency-ms", "inf"], "finite"),
])
def test_select_refuses_a_limit_out_of_its_range(sweep, mlflow_server, capsys, flags, says):
    before = _versions(mlflow_server)
    assert main(["select", SWEEP, *flags, "--tracking-uri", mlflow_server]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pxd: error: {flags[0]}: ") and says in err
    assert _versions(mlflow_server) == before


def test_only_a_latency_limit_suggests_re_timing(timed, mlflow_server, capsys):
    assert main(["select", SWEEP, "--max-pixels", "1", "--tracking-uri", mlflow_server]) == 2
    err = capsys.readouterr().err
    assert "--max-pixels 1" in err and "relax it" in err and "remeasure" not in err
    assert main(["select", SWEEP, "--hardware", "here", "--max-latency-ms", "1e-9", "--tracking-uri", mlflow_server]) == 2
    assert "re-time with pxd remeasure" in capsys.readouterr().err


def test_select_prints_load_lines_that_work_as_written(timed, mlflow_server, capsys):
    assert main(["select", SWEEP, "--name", "inputs-student", "--alias", "champion", "--tracking-uri",
                 mlflow_server]) == 0
    out = capsys.readouterr().out
    lines = out.split("load it:\n", 1)[1].strip().splitlines()
    assert len(lines) == 1 and lines[0].strip().startswith(f"MLFLOW_TRACKING_URI={mlflow_server} python -c ")
    script = f"{lines[0].strip()}\n"
    loaded = subprocess.run(["bash", "-c", script], env=_shell_env(), capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert "torch.Size([1, 4])" in loaded.stdout


def _shell_env() -> dict[str, str]:
    """A user's shell: this environment's python and mlflow first on PATH, no tracking URI set."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # a faster start (pxd's embedded server sets it too)
    return env


@pytest.mark.slow  # starts an `mlflow server` of its own, as the printed lines say
def test_with_the_embedded_store_select_says_to_serve_it_and_that_loads(timed, mlflow_server, results_root, capsys,
                                                                       monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["select", SWEEP, "--name", "inputs-embedded", "--root", str(results_root)]) == 0
    lines = [line.strip() for line in capsys.readouterr().out.split("load it:\n", 1)[1].strip().splitlines()]
    serve = shlex.split(lines[0].split("&", 1)[0])
    assert serve[:2] == ["mlflow", "server"] and f"sqlite:///{results_root / 'mlflow.db'}" in serve
    assert lines[1].startswith("MLFLOW_TRACKING_URI=http://127.0.0.1:5000 python -c ")
    # the printed server command, on a free port instead of 5000 (another test may hold 5000)
    port = free_port()
    serve[serve.index("--port") + 1] = str(port)
    env = _shell_env()
    server = subprocess.Popen(serve, stdout=open(tmp_path / "server.log", "w"),
                              stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        script = lines[1].replace("127.0.0.1:5000", f"127.0.0.1:{port}") + "\n"
        loaded = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=300)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert "torch.Size([1, 4])" in loaded.stdout


# -- an unknown root or sweep creates nothing ---------------------------------------------------------------

@pytest.mark.parametrize("command", [["select", "nosuch"], ["remeasure", "nosuch", "--hardware", "x"],
                                     ["frontier", "nosuch"], ["stages"]])
def test_an_unknown_root_is_refused_and_nothing_is_created(command, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PXD_HOME", raising=False)
    missing, empty = tmp_path / "typo", tmp_path / "empty"
    empty.mkdir()
    for root in (missing, empty):
        assert main([*command, "--root", str(root)]) == 2
        assert f"pxd: error: --root: no pxd results at {root}" in capsys.readouterr().err
    assert not missing.exists() and not any(empty.iterdir())
    database = tmp_path / "nothere.db"
    assert main([*command, "--tracking-uri", f"sqlite:///{database}"]) == 2
    assert "--tracking-uri" in capsys.readouterr().err and not database.exists()


@pytest.mark.parametrize("command", [["select", "nosuch"], ["remeasure", "nosuch", "--hardware", "x"]])
def test_an_unknown_sweep_is_named_with_what_to_check(command, sweep, mlflow_server, capsys):
    assert main([*command, "--tracking-uri", mlflow_server]) == 2
    err = capsys.readouterr().err
    assert "no sweep named or with run id 'nosuch'" in err and "check the name and --tracking-uri/--root" in err


# -- pxd remeasure: what cannot be timed is refused up front; a run that times nothing records nothing ------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_remeasure_on_cuda_without_cuda_is_refused_and_records_no_label(sweep, mlflow_server, capsys):
    before = _parent_tags(mlflow_server, sweep["parent"])
    assert main(["remeasure", SWEEP, "--hardware", "gpu0", "--device", "cuda", "--tracking-uri", mlflow_server]) == 2
    assert capsys.readouterr().err.startswith("pxd: error: --device: cuda, but CUDA is not available")
    assert _parent_tags(mlflow_server, sweep["parent"]) == before


@pytest.mark.parametrize("flags", [["--dtype", "float16", "--runtime", "onnxruntime"],
                                   ["--dtype", "bfloat16", "--runtime", "onnxruntime", "--device", "cuda"],
                                   ["--device", "tpu"], ["--repeats", "1"]])
def test_remeasure_refuses_a_request_that_cannot_measure_what_it_says(sweep, mlflow_server, capsys, flags):
    before = _parent_tags(mlflow_server, sweep["parent"])
    assert main(["remeasure", SWEEP, "--hardware", "h", *flags, "--tracking-uri", mlflow_server]) == 2
    field = next(f for f in flags if f in ("--dtype", "--device", "--repeats"))
    assert capsys.readouterr().err.startswith(f"pxd: error: {field}: ")
    assert _parent_tags(mlflow_server, sweep["parent"]) == before


def test_remeasure_takes_its_runtimes_from_the_registry(sweep, mlflow_server, capsys, monkeypatch):
    """--runtime accepts what pxd.runtimes registers and nothing else; an unknown name lists the registered ones."""
    from pxd import runtimes

    before = _parent_tags(mlflow_server, sweep["parent"])
    assert main(["remeasure", SWEEP, "--hardware", "h", "--runtime", "tflite", "--tracking-uri", mlflow_server]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pxd: error: --runtime: use one of ") and all(name in err for name in runtimes.RUNTIMES)
    # a runtime registered beside the shipped ones is one the request check accepts (it refuses only its dtype)
    monkeypatch.setitem(runtimes.RUNTIMES, "eager-copy", runtimes.Runtime("eager-copy", prepare=lambda m, r, d, t: m,
                                                                          autocast=False))
    assert main(["remeasure", SWEEP, "--hardware", "h", "--runtime", "eager-copy", "--dtype", "float16",
                 "--tracking-uri", mlflow_server]) == 2
    assert "--dtype: float16 is for the runtimes torch, torch-compile" in capsys.readouterr().err
    assert _parent_tags(mlflow_server, sweep["parent"]) == before


def test_remeasure_with_an_unreachable_ray_address_fails_at_once(sweep, mlflow_server, capsys):
    import ray

    joined = ray.is_initialized()  # another module's local Ray may run in this session
    code = main(["remeasure", SWEEP, "--hardware", "edge", "--resource", "edge", "--ray-address", "127.0.0.1:1",
                 "--tracking-uri", mlflow_server])
    assert code == 2 and "pxd: error: --ray-address: cannot reach 127.0.0.1:1" in capsys.readouterr().err
    assert ray.is_initialized() == joined
    # without --resource the address would be ignored: refused as well
    assert main(["remeasure", SWEEP, "--hardware", "edge", "--ray-address", "127.0.0.1:1", "--tracking-uri",
                 mlflow_server]) == 2
    assert "add --resource" in capsys.readouterr().err


def test_a_remeasure_that_times_no_student_records_nothing_and_fails(sweep, mlflow_server, capsys):
    client = MlflowClient(mlflow_server)
    parent = _hand_made_sweep(client, sweep, "inputs-unloadable", "models:/m-00000000000000000000000000000000",
                              {"val_top1": 0.5, "pixels": 64.0})
    before = _parent_tags(mlflow_server, parent)
    with pytest.raises(ConfigError) as error:
        remeasure(client, mlflow_server, parent, TimingRequest(label="nothing", repeats=2, warmup=0, batch_size=1),
                  report=lambda _: None)
    assert error.value.field == "--hardware" and "nothing was recorded" in error.value.message
    assert main(["remeasure", "inputs-unloadable", "--hardware", "nothing", *QUICK, "--tracking-uri",
                 mlflow_server]) == 2
    assert "no student of inputs-unloadable could be timed" in capsys.readouterr().err
    after = _parent_tags(mlflow_server, parent)
    assert after == before and "pxd.hardware.nothing.reference" not in after
    assert main(["frontier", parent, "--hardware", "nothing", "--tracking-uri", mlflow_server]) == 2


def test_the_reference_latency_comes_from_the_first_run_that_measured_a_student(timed, mlflow_server):
    client = MlflowClient(mlflow_server)
    source = client.get_run(timed["trials"][(8, 1.0)])
    parent = _hand_made_sweep(client, timed, "inputs-legacy", source.data.tags[schema.Tag.MODEL_URI],
                              {"val_top1": source.data.metrics["val_top1"], "pixels": 64.0})
    # what pxd before this fix recorded for a label whose run timed nothing
    client.set_tag(parent, schema.Tag.HARDWARE_LABELS, json.dumps(["old"]))
    client.set_tag(parent, "pxd.hardware.old.reference", "2.0")
    request = TimingRequest(label="old", repeats=3, warmup=0, batch_size=1)
    first = remeasure(client, mlflow_server, parent, request, report=lambda _: None)
    trial = first["timed"][0]
    latency = client.get_run(trial).data.metrics["latency_ms.old"]
    reference = float(_parent_tags(mlflow_server, parent)["pxd.hardware.old.reference"])
    assert reference == pytest.approx(2.0 * latency)
    assert first["reference_point"]["latency_ms.old"] == pytest.approx(reference)
    remeasure(client, mlflow_server, parent, request, report=lambda _: None)  # a later run keeps the reference
    assert float(_parent_tags(mlflow_server, parent)["pxd.hardware.old.reference"]) == reference


def test_copies_of_one_student_share_one_timing(timed, mlflow_server):
    client = MlflowClient(mlflow_server)
    runs = {key: client.get_run(run_id) for key, run_id in timed["trials"].items()}
    records = {key: json.loads(run.data.tags["pxd.hardware.here"]) for key, run in runs.items()}
    copies = [(16, 1.0), (16, 0.5)]
    assert runs[copies[0]].data.metrics["latency_ms.here"] == runs[copies[1]].data.metrics["latency_ms.here"]
    assert records[copies[0]]["timed_run"] == records[copies[1]]["timed_run"] in {timed["trials"][k] for k in copies}
    assert records[(8, 1.0)]["timed_run"] == timed["trials"][(8, 1.0)]  # another input size: timed on its own
    labels = json.loads(_parent_tags(mlflow_server, timed["parent"])[schema.Tag.HARDWARE_LABELS])
    assert "here" in labels


# -- pxd frontier --plot without --compare ------------------------------------------------------------------

@pytest.mark.parametrize("hardware", [[], ["--hardware", "here"]])
def test_frontier_plot_without_compare_writes_that_frontier(timed, mlflow_server, tmp_path, capsys, hardware):
    plot = tmp_path / "frontier.png"
    assert main(["frontier", SWEEP, *hardware, "--plot", str(plot), "--tracking-uri", mlflow_server]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot {plot}" in capsys.readouterr().out
