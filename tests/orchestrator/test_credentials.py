"""No password from a storage or tracking URL reaches what a sweep writes: Tune's experiment state and
searcher checkpoints, logs, printed output, MLflow params, tags and artifacts.

Postgres at 127.0.0.1:5432 (trust auth, so a URL with any password connects) holds a database of a role
created for the test; tests skip with the reason when it is not reachable.
"""

from __future__ import annotations

import pickle
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.results import schema
from orchestrator.tracking import credentials
from orchestrator.tracking.credentials import PrivateRDBStorage
from tests.orchestrator.conftest import tiny_space
from tests.orchestrator.test_cluster import PG_HOST, PG_PORT, _admin_engine, _pg_dialect, _postgres_unavailable
from tests.orchestrator.test_faults import (
    _env,
    _sweep_command,
    ray_tmp,  # noqa: F401 - a fixture
)

SAFETY_TIMEOUT_S = 600  # a guard against hanging forever; nothing asserts on durations


@pytest.fixture
def private_database() -> Iterator[tuple[str, str]]:
    """(URL with a password, the password) of a fresh database owned by a fresh role, dropped after."""
    reason = _postgres_unavailable()
    if reason:
        pytest.skip(reason)
    import sqlalchemy as sa

    role, password = f"pxd_secret_{secrets.token_hex(4)}", f"pw{secrets.token_hex(12)}"
    engine = _admin_engine()
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'"))
            conn.execute(sa.text(f'CREATE DATABASE "{role}" OWNER {role}'))
        yield f"{_pg_dialect()}://{role}:{password}@{PG_HOST}:{PG_PORT}/{role}", password
    finally:
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{role}" WITH (FORCE)'))
            conn.execute(sa.text(f"DROP ROLE IF EXISTS {role}"))
        engine.dispose()


def test_urls_are_shown_and_kept_without_their_password():
    url = "postgresql+psycopg2://pxd:s3cr%40t@db:5432/optuna?sslmode=require"
    assert credentials.redact(url) == "postgresql+psycopg2://pxd:***@db:5432/optuna?sslmode=require"
    assert credentials.without_password(url) == "postgresql+psycopg2://pxd@db:5432/optuna?sslmode=require"
    assert credentials.redact("http://mlflow:5000") == "http://mlflow:5000"
    assert credentials.redact("sqlite:////tmp/optuna.db") == "sqlite:////tmp/optuna.db"
    credentials.remember(url)
    assert credentials.scrub("failed: s3cr@t / s3cr%40t") == "failed: *** / ***"


def test_the_optuna_storage_pickles_without_its_password_and_reconnects(private_database):
    url, password = private_database
    storage = PrivateRDBStorage(url)
    optuna.create_study(study_name="pickled", storage=storage)
    payload = pickle.dumps(storage)
    assert password.encode() not in payload
    # unpickled in the driver that was given the URL (--resume passes it again): connected with it
    restored = pickle.loads(payload)
    assert restored.url == url and [s.study_name for s in restored.get_all_studies()] == ["pickled"]


@pytest.mark.slow
def test_a_sweep_with_passwords_in_its_urls_writes_them_nowhere(private_database, mlflow_server, results_root,
                                                               tmp_path, ray_tmp):  # noqa: F811 - the fixture
    storage_url, storage_password = private_database
    tracking_password = f"tp{secrets.token_hex(12)}"
    host = mlflow_server.removeprefix("http://")
    tracking_url = f"http://pxd:{tracking_password}@{host}"  # the test server has no auth: it ignores them
    name = f"secret-{uuid.uuid4().hex[:6]}"
    raw = tiny_space(trials=2, max_concurrent=2)
    raw["seed"] = 41
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw, sort_keys=False))
    root = tmp_path / "root"
    command = _sweep_command(space, name, root, tracking_url, "--optuna-storage", storage_url)
    command.remove("--quiet")  # progress lines are output too
    done = subprocess.run(command, env=_env(RAY_ADDRESS="local", RAY_TMPDIR=ray_tmp), capture_output=True,
                          text=True, timeout=SAFETY_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    passwords = (storage_password, tracking_password)

    def leaks(text: str) -> list[str]:
        return [p for p in passwords if p in text]

    assert not leaks(done.stdout + done.stderr), "printed output"
    assert (root / "sweeps" / name / "tune").is_dir()
    files = [p for folder in (root, Path(ray_tmp)) for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.name.startswith("searcher-state") for p in files), "the searcher's checkpoint was written"
    leaked = [str(p) for p in files if any(pw.encode() in p.read_bytes() for pw in passwords)]
    assert not leaked, f"files holding a password: {leaked}"

    client = MlflowClient(mlflow_server)
    parent = schema.find_sweep_run(client, name)
    stages = client.get_experiment_by_name(schema.STAGES_EXPERIMENT)
    runs = [parent, *schema.trial_runs(client, parent),
            *client.search_runs([stages.experiment_id], f"tags.`{schema.Tag.SWEEP}` = '{name}'")]
    assert len(runs) >= 4  # the sweep, 2 trials, the stages they trained
    for run in runs:
        assert not leaks(repr(run.data.params) + repr(run.data.tags)), f"params or tags of run {run.info.run_id}"
    assert parent.data.tags[schema.Tag.OPTUNA_STORAGE] == credentials.redact(storage_url)
    artifacts = [p for p in (results_root / "mlartifacts").rglob("*") if p.is_file() and parent.info.run_id in p.parts]
    assert artifacts and not [p for p in artifacts if any(pw.encode() in p.read_bytes() for pw in passwords)]
