"""The cluster topology of docker-compose.yml, run natively with real processes.

Postgres at 127.0.0.1:5432 holds the MLflow backend store and, in a second database, the Optuna study
and the stage-lease table; a real `mlflow server` on Postgres with proxied artifacts; a Ray head and a
Ray worker node (two `ray start --block` processes with 1 CPU each, so two concurrent trials must land
on different nodes); `pxd sweep` as its own driver process and `pxd frontier` from yet another process.

Why two databases and not one: MLflow and Optuna both keep their schema revision in an Alembic table
named `alembic_version`; in one database the second of them to start finds the other's revision and
refuses the schema (Optuna: "no longer compatible with the table schema").

Every process started here is stopped in the fixture finalisers by its own pid / process group; the
Ray nodes use their own temp dir, ports and auth token, so other Ray instances on the machine are left
alone. Needs Postgres (tests skip with the reason otherwise) and ~2-3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.orchestrator.conftest import free_port, tiny_space
from tests.orchestrator.test_mlflow_auth import PROTECTED, _auth_config, _status

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
SWEEP = "cl"
TRIALS = 4
START_TIMEOUT_S = 180.0
SWEEP_TIMEOUT_S = 480.0


# -- helpers -----------------------------------------------------------------------------------------
def _pg_dialect() -> str | None:
    """The SQLAlchemy URL scheme with an explicit, installed driver.

    A bare `postgresql://` means psycopg (v3) under SQLAlchemy 2.1 but psycopg2 under 2.0, so the URL
    names the driver that is actually importable.
    """
    for module, dialect in (("psycopg", "postgresql+psycopg"), ("psycopg2", "postgresql+psycopg2")):
        try:
            __import__(module)
        except ImportError:
            continue
        return dialect
    return None


def _pg_url(database: str) -> str:
    return f"{_pg_dialect()}://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


def _admin_engine():
    import sqlalchemy as sa

    return sa.create_engine(_pg_url("postgres"), isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})


def _postgres_unavailable() -> str | None:
    """Why the Postgres tests cannot run here, or None when they can."""
    if _pg_dialect() is None:
        return "no PostgreSQL driver installed (pip install psycopg2-binary, or the `test` extra)"
    import sqlalchemy as sa

    try:
        engine = _admin_engine()
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
    except sa.exc.OperationalError as exc:
        return f"Postgres is not reachable at {PG_HOST}:{PG_PORT} as user {PG_USER} ({str(exc).splitlines()[0]})"
    return None


def _tool(name: str) -> list[str]:
    """The console script of this venv (what a user runs), found beside the running interpreter."""
    path = BIN / name
    if not path.exists():
        pytest.skip(f"`{name}` is not installed beside {sys.executable}")
    return [str(path)]


def _cluster_env(token: str) -> dict[str, str]:
    """The environment of every process of the test cluster: one shared Ray auth token, no stray
    tracking URI or Ray address from the caller."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(
        RAY_AUTH_MODE="token",  # Ray's default for new clusters, made explicit so every node agrees
        RAY_AUTH_TOKEN=token,  # per test cluster, so the user's ~/.ray/auth_token is neither read nor written
        RAY_USAGE_STATS_ENABLED="0",
        TQDM_DISABLE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def _descendants(root_pid: int) -> list[int]:
    """Every live process under `root_pid`, from /proc (Ray's workers start their own process groups)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [root_pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a process we started (as a session leader) with its process group and every descendant."""
    pids = _descendants(process.pid) if Path("/proc").is_dir() else []
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def _wait_for(ready, process: subprocess.Popen, what: str, log: Path, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        if process.poll() is not None:
            pytest.fail(f"{what} exited with status {process.returncode} while starting:\n{_tail(log)}")
        time.sleep(0.5)
    pytest.fail(f"{what} was not ready within {timeout_s:.0f}s:\n{_tail(log)}")


def _run(command: list[str], timeout_s: float, **kwargs) -> subprocess.CompletedProcess:
    """Run a command to completion; the caller asserts on its exit status and output."""
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout_s, **kwargs)


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _ray_started(log: Path) -> bool:
    return log.exists() and "Ray runtime started" in log.read_text(errors="replace")


# -- the cluster ---------------------------------------------------------------------------------------
@dataclass
class Cluster:
    ray_address: str
    tracking_uri: str
    optuna_storage: str
    mlflow_db: str
    env: dict[str, str]
    workdir: Path
    processes: list[subprocess.Popen] = field(default_factory=list)
    workers: list[subprocess.Popen] = field(default_factory=list)  # the worker nodes' `ray start` processes


@pytest.fixture(scope="module")
def databases() -> Iterator[dict[str, str]]:
    """Two fresh databases for this run (MLflow's; Optuna's + leases), dropped at the end."""
    reason = _postgres_unavailable()
    if reason:
        pytest.skip(reason)
    with fresh_databases("pxd_it") as names:
        yield names


@contextmanager
def fresh_databases(prefix: str) -> Iterator[dict[str, str]]:
    """Two fresh databases (MLflow's; Optuna's + leases) named `<prefix>_<random>_<kind>`, dropped at the end
    (also bench/scale.py's)."""
    import sqlalchemy as sa

    prefix = f"{prefix}_{secrets.token_hex(4)}"
    names = {"mlflow": f"{prefix}_mlflow", "optuna": f"{prefix}_optuna"}
    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            for name in names.values():
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        yield names
    finally:
        with engine.connect() as conn:
            for name in names.values():
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


@pytest.fixture(scope="module")
def cluster(databases) -> Iterator[Cluster]:
    """A Ray head + a Ray worker node + `mlflow server` on Postgres, each a real process we own."""
    with running_cluster(databases) as result:
        yield result


@contextmanager
def running_cluster(databases: dict[str, str], *, head_cpus: int = 1, worker_cpus: tuple[int, ...] = (1,),
                    env_extra: dict[str, str] | None = None, ray_args: tuple[str, ...] = ()) -> Iterator[Cluster]:
    """A Ray head + worker nodes (`worker_cpus`: one per node; `ray_args` added to every `ray start`) + `mlflow
    server` on Postgres, each a real process we own, all stopped at the end."""
    ray_cli, mlflow_cli = _tool("ray"), _tool("mlflow")
    # Ray's unix sockets live under the temp dir and must stay under ~107 bytes: a short path
    workdir = Path(tempfile.mkdtemp(prefix="pxdcl-"))
    env = {**_cluster_env(secrets.token_hex(32)), **(env_extra or {})}
    # MLflow with basic auth on, as the compose stack runs it: the server bootstraps its admin from
    # MLFLOW_AUTH_ADMIN_*, every pxd process (driver, trials on every node) logs in with MLflow's standard
    # MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD
    login = ("pxd-admin", secrets.token_urlsafe(24))
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(_auth_config(workdir)), MLFLOW_AUTH_ADMIN_USERNAME=login[0],
               MLFLOW_AUTH_ADMIN_PASSWORD=login[1], MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
               MLFLOW_TRACKING_USERNAME=login[0], MLFLOW_TRACKING_PASSWORD=login[1])
    ray_port, dashboard_port, mlflow_port = free_port(), free_port(), free_port()
    result = Cluster(
        ray_address=f"127.0.0.1:{ray_port}",
        tracking_uri=f"http://127.0.0.1:{mlflow_port}",
        optuna_storage=_pg_url(databases["optuna"]),
        mlflow_db=databases["mlflow"],
        env=env,
        workdir=workdir,
    )

    def start(command: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as handle:  # the child keeps its own copy of the descriptor
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=workdir,
                                       start_new_session=True)
        result.processes.append(process)
        return process

    ray_common = ["--disable-usage-stats", "--temp-dir", str(workdir / "ray"), *ray_args, "--block"]
    # this process reads the runs back as a logged-in user too (restored at the end)
    caller_login = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_USERNAME=login[0], MLFLOW_TRACKING_PASSWORD=login[1])
    try:
        head_log, mlflow_log = workdir / "ray-head.log", workdir / "mlflow.log"
        # --dashboard-port: even without the dashboard UI the head binds it; the default 8265 may be taken
        head = start([*ray_cli, "start", "--head", "--port", str(ray_port), "--include-dashboard=false",
                      "--dashboard-port", str(dashboard_port), "--num-cpus", str(head_cpus), *ray_common], head_log)
        server = start([*mlflow_cli, "server", "--app-name", "basic-auth",
                        "--backend-store-uri", _pg_url(databases["mlflow"]),
                        "--serve-artifacts", "--artifacts-destination", str(workdir / "artifacts"),
                        "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"], mlflow_log)
        _wait_for(lambda: _ray_started(head_log), head, "the Ray head", head_log)
        for index, cpus in enumerate(worker_cpus):
            worker_log = workdir / f"ray-worker-{index}.log"
            worker = start([*ray_cli, "start", "--address", result.ray_address, "--num-cpus", str(cpus), *ray_common],
                           worker_log)
            _wait_for(lambda log=worker_log: _ray_started(log), worker, f"Ray worker node {index}", worker_log)
            result.workers.append(worker)
        _wait_for(lambda: _healthy(result.tracking_uri), server, "mlflow server", mlflow_log)
        yield result
    finally:
        for process in reversed(result.processes):
            _kill_tree(process)
        shutil.rmtree(workdir, ignore_errors=True)
        for key, value in caller_login.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class SweepRun:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def cluster_sweep(cluster: Cluster) -> SweepRun:
    """`pxd sweep` as its own driver process, joining the cluster: 4 trials, 2 at a time."""
    space = cluster.workdir / "space.yaml"
    space.write_text(yaml.safe_dump(tiny_space(trials=TRIALS, max_concurrent=2), sort_keys=False))
    command = [
        *_tool("pxd"), "sweep", str(space), "--ray-address", cluster.ray_address,
        "--tracking-uri", cluster.tracking_uri, "--optuna-storage", cluster.optuna_storage,
        "--root", str(cluster.workdir / "root"), "--name", SWEEP, "--quiet", "--json",
    ]
    done = _run(command, SWEEP_TIMEOUT_S, env=cluster.env, cwd=cluster.workdir)
    return SweepRun(done.returncode, done.stdout, done.stderr)


def _require_success(run: SweepRun) -> None:
    assert run.returncode == 0, f"pxd sweep exited {run.returncode}:\n{run.stderr[-4000:]}"


def _client(cluster: Cluster):
    from mlflow.tracking import MlflowClient

    return MlflowClient(cluster.tracking_uri)


def _trial_runs(cluster: Cluster) -> list:
    client = _client(cluster)
    experiment = client.get_experiment_by_name(tiny_space()["name"])
    assert experiment is not None, "the sweep's MLflow experiment (the space's name) is missing"
    runs = client.search_runs([experiment.experiment_id], f"tags.`pxd.sweep` = '{SWEEP}' and tags.`pxd.kind` = 'trial'")
    return list(runs)


def _stage_runs(cluster: Cluster, stage: str) -> list:
    from orchestrator.results.schema import STAGES_EXPERIMENT

    client = _client(cluster)
    experiment = client.get_experiment_by_name(STAGES_EXPERIMENT)
    assert experiment is not None, "no stage was stored"
    return list(client.search_runs([experiment.experiment_id],
                                   f"tags.`pxd.stage` = '{stage}' and tags.`pxd.stage_complete` = 'true'"))


# -- the sweep on two nodes ------------------------------------------------------------------------
def test_sweep_on_two_nodes_records_every_trial_as_a_complete_child_run(cluster, cluster_sweep):
    _require_success(cluster_sweep)
    runs = _trial_runs(cluster)
    assert len(runs) == TRIALS
    parents = {run.data.tags["mlflow.parentRunId"] for run in runs}
    assert len(parents) == 1
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["pxd.state"] == "COMPLETE"
        assert {"val_top1", "gmacs", "params_m", "pixels", "latency_ms"} <= set(run.data.metrics)
        assert run.data.tags["pxd.hostname"] == socket.gethostname()
    # 1 CPU per node and 2 trials at a time: the second concurrent trial can only run on the other node
    node_ids = {run.data.tags["pxd.node_id"] for run in runs}
    assert len(node_ids) >= 2, f"all trials ran on one Ray node: {node_ids}"
    assert "local" not in node_ids
    parent = _client(cluster).get_run(parents.pop())
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_complete"] == TRIALS


def test_the_optuna_study_in_postgres_holds_the_same_complete_trials(cluster, cluster_sweep):
    import optuna

    _require_success(cluster_sweep)
    study = optuna.load_study(study_name=SWEEP, storage=cluster.optuna_storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * TRIALS
    by_id = {run.info.run_id: run for run in _trial_runs(cluster)}
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == set(by_id)
    for trial in study.trials:
        run = by_id[trial.user_attrs["mlflow_run_id"]]
        assert trial.values == [run.data.metrics["val_top1"], run.data.metrics["pixels"]]


def test_shared_stages_are_trained_once_across_nodes_with_leases_in_postgres(cluster, cluster_sweep):
    import sqlalchemy as sa

    _require_success(cluster_sweep)
    runs = _trial_runs(cluster)
    teachers = _stage_runs(cluster, "teacher")
    assert len(teachers) == 1
    assert {run.data.tags["pxd.stage.teacher.run_id"] for run in runs} == {teachers[0].info.run_id}
    # assistants are trained inside concurrent trials on both nodes: still one per student architecture
    architectures = {run.data.params["student.arch"] for run in runs}
    assert len(_stage_runs(cluster, "assistant")) == len(architectures)
    engine = sa.create_engine(cluster.optuna_storage)
    try:
        assert "pxd_stage_leases" in sa.inspect(engine).get_table_names()
        with engine.connect() as conn:
            held = conn.execute(sa.text("SELECT key, owner FROM pxd_stage_leases")).fetchall()
    finally:
        engine.dispose()
    assert held == [], f"a finished sweep left leases held: {held}"


def test_pxd_frontier_from_another_process_shows_the_tagged_frontier(cluster, cluster_sweep):
    _require_success(cluster_sweep)
    tagged = {run.info.run_id for run in _trial_runs(cluster) if run.data.tags.get("pxd.on_frontier") == "true"}
    assert tagged
    printed_by_sweep = json.loads(cluster_sweep.stdout)
    assert {row["run_id"] for row in printed_by_sweep["rows"] if row["on_frontier"]} == tagged
    command = [*_tool("pxd"), "frontier", SWEEP, "--tracking-uri", cluster.tracking_uri, "--json"]
    done = _run(command, 180, env=cluster.env, cwd=cluster.workdir)
    assert done.returncode == 0, done.stderr[-4000:]
    table = json.loads(done.stdout)
    assert {row["run_id"] for row in table["rows"] if row["on_frontier"]} == tagged


# -- bad cluster input and the compose file ------------------------------------------------------------
def test_a_cluster_sweep_without_a_tracking_server_fails_before_anything_launches(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(tiny_space(trials=TRIALS, max_concurrent=2)))
    root = tmp_path / "root"
    env = _cluster_env(secrets.token_hex(32))
    # nothing listens on this port: a launch attempt would hang or fail differently
    command = [*_tool("pxd"), "sweep", str(space), "--ray-address", f"127.0.0.1:{free_port()}", "--root", str(root)]
    done = _run(command, 120, env=env, cwd=tmp_path)
    assert done.returncode == 2
    error = done.stderr.strip()
    assert error.count("\n") == 0 and "--tracking-uri" in error, error
    assert not root.exists(), "nothing may be created or launched before the error"


def test_the_cluster_tracking_server_refuses_requests_without_a_login(cluster, cluster_sweep):
    """The sweep above ran against it with MLflow's credential variables; without them the API says 401."""
    _require_success(cluster_sweep)
    assert _status(cluster.tracking_uri + PROTECTED) == 401
    login = (cluster.env["MLFLOW_TRACKING_USERNAME"], cluster.env["MLFLOW_TRACKING_PASSWORD"])
    assert _status(cluster.tracking_uri + PROTECTED, login) == 200


def test_remeasure_times_on_the_ray_node_with_the_custom_resource(cluster, cluster_sweep):
    """A third node offers the custom resource `edge` with 2 CPUs: `pxd remeasure --resource edge` times every
    student there, with the requested thread count, and records that node with each measurement."""
    _require_success(cluster_sweep)
    ray_cli = _tool("ray")
    log = cluster.workdir / "ray-edge.log"
    with open(log, "ab") as handle:
        edge = subprocess.Popen([*ray_cli, "start", "--address", cluster.ray_address, "--num-cpus", "2",
                                 "--resources", '{"edge": 1}', "--disable-usage-stats", "--temp-dir",
                                 str(cluster.workdir / "ray"), "--block"], stdout=handle, stderr=subprocess.STDOUT,
                                env=cluster.env, cwd=cluster.workdir, start_new_session=True)
    cluster.processes.append(edge)
    _wait_for(lambda: _ray_started(log), edge, "the edge Ray node", log)
    done = _run([*_tool("pxd"), "remeasure", SWEEP, "--hardware", "edge-2t", "--resource", "edge", "--threads", "2",
                 "--repeats", "4", "--warmup", "1", "--batch", "2", "--ray-address", cluster.ray_address,
                 "--tracking-uri", cluster.tracking_uri], SWEEP_TIMEOUT_S, env=cluster.env, cwd=cluster.workdir)
    assert done.returncode == 0, done.stderr[-4000:]
    nodes = _run([sys.executable, "-c", "import json, ray; ray.init(address='" + cluster.ray_address + "', "
                  "logging_level='ERROR'); print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() "
                  "if n['Alive']}))"], 120, env=cluster.env, cwd=cluster.workdir)
    resources = json.loads(nodes.stdout.strip().splitlines()[-1])
    edge_nodes = {node for node, offered in resources.items() if offered.get("edge")}
    runs = [r for r in _trial_runs(cluster) if r.data.tags.get("pxd.state") == "COMPLETE"]
    assert runs
    for run in runs:
        record = json.loads(run.data.tags["pxd.hardware.edge-2t"])
        assert record["node_id"] in edge_nodes, "the timing ran on the node with the custom resource"
        assert record["threads"] == 2 and run.data.metrics["latency_ms.edge-2t"] > 0
