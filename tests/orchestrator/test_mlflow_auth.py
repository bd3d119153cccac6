"""pxd against an MLflow server with basic auth on, as the compose stack runs it.

A real `mlflow server --app-name basic-auth` (SQLite tracking and user stores in a temp dir, the admin
bootstrapped from MLflow's own MLFLOW_AUTH_ADMIN_* variables, the shipped docker/mlflow-auth.ini with
only its database moved) on a free port. Anonymous requests must be refused, the compose health check
must still pass, and pxd must work with nothing but MLflow's standard MLFLOW_TRACKING_USERNAME /
MLFLOW_TRACKING_PASSWORD variables set. The server is stopped by its own process group.
"""

from __future__ import annotations

import base64
import configparser
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.orchestrator.conftest import free_port, tiny_space

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180.0
PROTECTED = "/api/2.0/mlflow/experiments/search?max_results=1"


@dataclass
class AuthServer:
    uri: str
    username: str
    password: str
    workdir: Path

    def client_env(self, *, with_login: bool) -> dict[str, str]:
        """A user's environment: MLflow's standard credential variables (or none), nothing else of ours."""
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("MLFLOW_TRACKING_", "MLFLOW_AUTH_", "RAY_ADDRESS"))}
        env["PYTHONPATH"] = str(REPO)  # this checkout, in the driver and in the Ray workers it starts
        if with_login:
            env.update(MLFLOW_TRACKING_USERNAME=self.username, MLFLOW_TRACKING_PASSWORD=self.password)
        return env


def _status(url: str, login: tuple[str, str] | None = None) -> int:
    """The HTTP status of a GET, or 0 when nothing answers."""
    request = urllib.request.Request(url)
    if login is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(login).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


def _auth_config(workdir: Path) -> Path:
    """The shipped auth settings with the user store moved from the compose Postgres to a temp SQLite file."""
    config = configparser.ConfigParser()
    config.read(REPO / "docker" / "mlflow-auth.ini")
    config["mlflow"]["database_uri"] = f"sqlite:///{workdir / 'users.db'}"
    path = workdir / "mlflow-auth.ini"
    with open(path, "w") as handle:
        config.write(handle)
    return path


def _stop(process: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory) -> Iterator[AuthServer]:
    workdir = tmp_path_factory.mktemp("mlflow-auth")
    port = free_port()
    server = AuthServer(uri=f"http://127.0.0.1:{port}", username="pxd-admin",
                        password=secrets.token_urlsafe(24), workdir=workdir)
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(_auth_config(workdir)), MLFLOW_AUTH_ADMIN_USERNAME=server.username,
               MLFLOW_AUTH_ADMIN_PASSWORD=server.password, MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16))
    command = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
               "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
               "--serve-artifacts", "--artifacts-destination", str(workdir / "mlartifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = workdir / "server.log"
    with open(log, "ab") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=workdir,
                                   start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while _status(f"{server.uri}/health") != 200:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server --app-name basic-auth did not start:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield server
    finally:
        _stop(process)


def test_the_rest_api_refuses_requests_without_the_right_login(auth_server):
    url = auth_server.uri + PROTECTED
    assert _status(url) == 401
    assert _status(url, (auth_server.username, "not-the-password")) == 401
    assert _status(url, (auth_server.username, auth_server.password)) == 200


def test_the_compose_health_check_of_mlflow_passes_without_a_login(auth_server):
    """The compose file's own health check command, pointed at this server's port."""
    raw = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    kind, *command = raw["services"]["mlflow"]["healthcheck"]["test"]
    assert kind == "CMD"
    port = auth_server.uri.rsplit(":", 1)[1]
    command = [word.replace("127.0.0.1:5000", f"127.0.0.1:{port}") for word in command]
    command[0] = sys.executable if command[0] == "python" else command[0]
    assert any(port in word for word in command), f"the health check no longer names 127.0.0.1:5000: {command}"
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def _pxd(arguments: list[str], env: dict[str, str], cwd: Path, timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *arguments], check=False, capture_output=True,
                          text=True, timeout=timeout_s, env=env, cwd=cwd)


def test_pxd_sweeps_and_reads_back_with_mlflow_standard_credential_variables(auth_server, tmp_path):
    """The driver, the trial it runs in a Ray worker (model and stage artifacts through the server's artifact
    proxy), and `pxd frontier` / `pxd stages` from other processes, all with only MLflow's variables set."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(tiny_space(trials=1, max_concurrent=1)))
    env = auth_server.client_env(with_login=True)
    tracking = ["--tracking-uri", auth_server.uri]
    sweep = _pxd(["sweep", str(space), *tracking, "--root", str(tmp_path / "root"), "--name", "auth", "--json"],
                 env, tmp_path, 600)
    assert sweep.returncode == 0, sweep.stderr[-4000:]

    frontier = _pxd(["frontier", "auth", *tracking, "--json"], env, tmp_path, 180)
    assert frontier.returncode == 0, frontier.stderr[-4000:]
    rows = json.loads(frontier.stdout)["rows"]
    assert len(rows) == 1 and rows[0]["on_frontier"], rows
    stages = _pxd(["stages", *tracking], env, tmp_path, 180)
    assert stages.returncode == 0, stages.stderr[-4000:]
    assert "teacher" in stages.stdout and "assistant" in stages.stdout, stages.stdout


def test_pxd_without_a_login_stops_with_one_line_naming_mlflow_credential_variables(auth_server, tmp_path):
    done = _pxd(["stages", "--tracking-uri", auth_server.uri], auth_server.client_env(with_login=False), tmp_path, 180)
    assert done.returncode == 2, done.stderr[-4000:]
    error = done.stderr.strip()
    assert error.count("\n") == 0, error
    assert "HTTP 401" in error and "MLFLOW_TRACKING_USERNAME" in error and "MLFLOW_TRACKING_PASSWORD" in error, error
