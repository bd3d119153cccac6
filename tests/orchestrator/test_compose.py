"""docker-compose.yml as a user brings it up: valid, wired, locked down, and refusing to start without its secrets.

The real `docker-compose` client resolves the file with an env file made from .env.example (random secrets
in place of the placeholders, so each can be traced to where it lands), and the tests read what compose
would run. There is no Docker engine on the development machines, so nothing is started; the Ray health
check the file uses is run for real against a native token-authenticated Ray head.
"""

from __future__ import annotations

import configparser
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from tests.orchestrator.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
GPU_OVERRIDE = REPO / "docker-compose.gpu.yml"
ENV_EXAMPLE = REPO / ".env.example"
SECRETS = ("POSTGRES_PASSWORD", "MLFLOW_ADMIN_USERNAME", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
           "RAY_AUTH_TOKEN")
RAY_SERVICES = ("ray-head", "ray-worker", "sweep")
RAY_PORTS = {"6379", "8265", "10001"}  # GCS, dashboard, Ray Client


# -- helpers -----------------------------------------------------------------------------------------
def _example_settings() -> dict[str, str]:
    settings = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            settings[name.strip()] = value.strip()
    return settings


def _env_file(tmp_path: Path, **changes: str | None) -> tuple[Path, dict[str, str]]:
    """.env.example with a fresh random value for every secret; `NAME=None` leaves NAME out."""
    settings = {**_example_settings(), **{name: f"{name.lower()}-{secrets.token_hex(8)}" for name in SECRETS}}
    settings.update(changes)
    settings = {name: value for name, value in settings.items() if value is not None}
    path = tmp_path / "env"
    path.write_text("".join(f"{name}={value}\n" for name, value in settings.items()))
    return path, settings


def _compose(env_file: Path, *arguments: str, files: tuple[Path, ...] = (COMPOSE,)) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("the docker-compose client is not installed (Debian: apt-get install docker-compose)")
    # the caller's own settings would override the env file; a developer's .env is replaced by --env-file
    referenced = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text() + GPU_OVERRIDE.read_text()))
    env = {name: value for name, value in os.environ.items()
           if name not in referenced and not name.startswith("COMPOSE_")}
    command = [binary, "--env-file", str(env_file), *[word for path in files for word in ("-f", str(path))], *arguments]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)


def _resolved(tmp_path: Path, files: tuple[Path, ...] = (COMPOSE,)) -> tuple[dict, dict[str, str]]:
    env_file, settings = _env_file(tmp_path)
    done = _compose(env_file, "config", files=files)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout), settings


def _words(command: str | list[str]) -> list[str]:
    # a list command may wrap a shell line (`sh -c "ray start ... && pxd sweep ..."`): split every part
    return [word for part in ([command] if isinstance(command, str) else command) for word in shlex.split(part)]


def _flag(command: str | list[str], flag: str) -> str:
    """The value of `--flag VALUE` or `--flag=VALUE` in a service's command."""
    words = _words(command)
    for index, word in enumerate(words):
        if word == flag:
            return words[index + 1]
        if word.startswith(f"{flag}="):
            return word.split("=", 1)[1]
    raise AssertionError(f"{flag} is missing from {command!r}")


def _published(service: dict) -> list[tuple[str, str]]:
    """(host address, container port) of every port a service publishes, in either compose syntax."""
    published = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            published.append((port.get("host_ip", ""), str(port["target"])))
        else:
            *host, target = port.split("/")[0].split(":")
            published.append((host[0] if len(host) == 2 else "", target))
    return published


# -- the file as compose reads it ---------------------------------------------------------------------
def test_the_stack_validates_with_an_env_file_made_from_the_example(tmp_path):
    env_file, _ = _env_file(tmp_path)
    for files in ((COMPOSE,), (COMPOSE, GPU_OVERRIDE)):
        done = _compose(env_file, "config", "-q", files=files)
        assert done.returncode == 0, f"{[path.name for path in files]}: {done.stderr}"


@pytest.mark.parametrize("missing", SECRETS)
def test_a_missing_secret_stops_compose_with_a_message_naming_it(tmp_path, missing):
    env_file, _ = _env_file(tmp_path, **{missing: None})
    done = _compose(env_file, "config", "-q")
    assert done.returncode != 0, f"compose accepted the stack without {missing}"
    assert missing in done.stderr and ".env" in done.stderr, done.stderr


def test_every_secret_is_required_in_the_file_and_comes_only_from_the_env_file(tmp_path):
    text = COMPOSE.read_text()
    for name in SECRETS:
        uses = re.findall(r"\$\{" + name + r"([^}]*)\}", text)
        assert uses and all(use.startswith(":?") for use in uses), f"{name} must be required: ${{{name}:?message}}"
    resolved, settings = _resolved(tmp_path)
    dumped = yaml.safe_dump(resolved)
    for name in SECRETS:
        assert settings[name] in dumped, f"{name} from the env file reaches no service"
    assert "replace-with-a-generated-secret" not in dumped
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], check=False, cwd=REPO, timeout=30)
    assert ignored.returncode == 0, ".env must be ignored by git"
    example = subprocess.run(["git", "check-ignore", "-q", ".env.example"], check=False, cwd=REPO, timeout=30)
    assert example.returncode == 1, ".env.example must not be ignored"


def test_postgres_asks_for_a_password_and_no_url_carries_one(tmp_path):
    resolved, settings = _resolved(tmp_path)
    services = resolved["services"]
    postgres = services["postgres"]["environment"]
    assert postgres["POSTGRES_PASSWORD"] == settings["POSTGRES_PASSWORD"]
    assert postgres["POSTGRES_HOST_AUTH_METHOD"] == "scram-sha-256"
    assert "trust" not in yaml.safe_dump(resolved)
    # every client of the database gets the password as libpq's PGPASSWORD, never inside a URL
    for name in ("mlflow", *RAY_SERVICES):
        assert services[name]["environment"]["PGPASSWORD"] == settings["POSTGRES_PASSWORD"], name
        for word in _words(services[name]["command"]):
            if word.startswith("postgresql"):
                assert sa.engine.make_url(word).password is None, f"{name} puts a password in {word}"


def test_the_databases_every_service_names_are_created_by_the_init_script(tmp_path):
    services = _resolved(tmp_path)[0]["services"]
    init = next(volume.split(":")[0] for volume in services["postgres"]["volumes"]
                if "docker-entrypoint-initdb.d" in str(volume))
    created = set(re.findall(r"CREATE DATABASE (\w+)", Path(init).read_text(), flags=re.IGNORECASE))
    created.add(services["postgres"]["environment"]["POSTGRES_DB"])
    auth = configparser.ConfigParser()
    auth.read(REPO / "docker" / "mlflow-auth.ini")
    urls = {
        "MLflow's tracking store": _flag(services["mlflow"]["command"], "--backend-store-uri"),
        "MLflow's user store": auth["mlflow"]["database_uri"],
        "the Optuna study and stage leases": _flag(services["sweep"]["command"], "--optuna-storage"),
    }
    databases = {role: sa.engine.make_url(url).database for role, url in urls.items()}
    for role, database in databases.items():
        assert database in created, f"{role} uses {database!r}, which nothing creates"
    # MLflow and Optuna both stamp `alembic_version`: one database each
    assert len(set(databases.values())) == len(databases), databases
    for url in urls.values():
        try:
            sa.engine.make_url(url).get_dialect().import_dbapi()
        except ImportError as exc:
            pytest.fail(f"{url} needs a driver that is not installed ({exc}); name it, e.g. postgresql+psycopg2://")


def test_mlflow_asks_for_a_login_and_is_published_on_loopback_only(tmp_path):
    resolved, settings = _resolved(tmp_path)
    mlflow = resolved["services"]["mlflow"]
    assert _flag(mlflow["command"], "--app-name") == "basic-auth"
    allowed = _flag(mlflow["command"], "--allowed-hosts").split(",")
    assert "*" not in allowed and "mlflow:5000" in allowed, allowed
    environment = mlflow["environment"]
    assert environment["MLFLOW_AUTH_ADMIN_USERNAME"] == settings["MLFLOW_ADMIN_USERNAME"]
    assert environment["MLFLOW_AUTH_ADMIN_PASSWORD"] == settings["MLFLOW_ADMIN_PASSWORD"]
    assert environment["MLFLOW_FLASK_SERVER_SECRET_KEY"] == settings["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    mounted = {volume.split(":")[1]: volume.split(":")[0] for volume in mlflow["volumes"]}
    assert Path(mounted[environment["MLFLOW_AUTH_CONFIG_PATH"]]) == REPO / "docker" / "mlflow-auth.ini"
    assert _published(mlflow) == [("127.0.0.1", "5000")]
    for name, service in resolved["services"].items():
        if name != "mlflow":
            assert not _published(service), f"{name} publishes {service['ports']}"


def test_every_ray_process_presents_the_token_and_the_mlflow_login(tmp_path):
    resolved, settings = _resolved(tmp_path)
    services = resolved["services"]
    for name in RAY_SERVICES:
        environment = services[name]["environment"]
        assert environment["RAY_AUTH_MODE"] == "token", name
        assert environment["RAY_AUTH_TOKEN"] == settings["RAY_AUTH_TOKEN"], name
        assert environment["MLFLOW_TRACKING_USERNAME"] == settings["MLFLOW_ADMIN_USERNAME"], name
        assert environment["MLFLOW_TRACKING_PASSWORD"] == settings["MLFLOW_ADMIN_PASSWORD"], name
        assert not RAY_PORTS & {port for _, port in _published(services[name])}, name
    assert _flag(services["ray-head"]["command"], "--include-dashboard") == "false"
    # the roles reach each other where the head and the tracking server listen
    head = f"ray-head:{_flag(services['ray-head']['command'], '--port')}"
    assert _flag(services["ray-worker"]["command"], "--address") == head
    assert _flag(services["sweep"]["command"], "--ray-address") == head
    assert _flag(services["sweep"]["command"], "--tracking-uri") == (
        f"http://mlflow:{_flag(services['mlflow']['command'], '--port')}")


def test_every_service_has_a_health_check(tmp_path):
    services = _resolved(tmp_path)[0]["services"]
    for name, service in services.items():
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable") and check["test"][0] != "NONE", f"{name} has none"


def test_workers_scale_and_reserve_gpus_only_with_the_gpu_override(tmp_path):
    plain = _resolved(tmp_path)[0]["services"]["ray-worker"]
    assert "container_name" not in plain and not _published(plain), "a fixed name or host port stops --scale"
    assert "deploy" not in plain, "without the override the workers must start on a machine with no GPU"
    with_gpus = _resolved(tmp_path, (COMPOSE, GPU_OVERRIDE))[0]["services"]["ray-worker"]
    devices = with_gpus["deploy"]["resources"]["reservations"]["devices"]
    assert any(device["driver"] == "nvidia" and "gpu" in device["capabilities"] for device in devices), devices


# -- the Ray health check, run for real --------------------------------------------------------------
@pytest.mark.slow
def test_the_ray_health_check_passes_with_the_token_and_fails_without(tmp_path):
    """The workers' health check command from the file, against a native head with token auth on."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    kind, *check = services["ray-worker"]["healthcheck"]["test"]
    assert kind == "CMD" and check[0] == "ray", check
    ray_cli = Path(sys.executable).parent / "ray"
    port = free_port()
    check = [str(ray_cli), *(word.replace("ray-head:6379", f"127.0.0.1:{port}") for word in check[1:])]
    assert f"127.0.0.1:{port}" in check, f"the health check no longer names ray-head:6379: {check}"
    token = secrets.token_hex(32)
    base = {name: value for name, value in os.environ.items() if not name.startswith("RAY_")}
    base["HOME"] = str(tmp_path)  # no ~/.ray/auth_token of the caller's
    with_token = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    log = tmp_path / "head.log"
    # a short temp dir: Ray's socket paths under pytest's tmp_path pass the 107-byte AF_UNIX limit
    ray_temp = tempfile.mkdtemp(prefix="pxd-ray-")
    with open(log, "ab") as handle:
        head = subprocess.Popen([str(ray_cli), "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                                 "--num-cpus", "0", "--include-dashboard=false", "--disable-usage-stats",
                                 "--temp-dir", ray_temp, "--block"],
                                stdout=handle, stderr=subprocess.STDOUT, env=with_token, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while subprocess.run(check, check=False, capture_output=True, env=with_token, timeout=120).returncode != 0:
            started = head.poll() is None and time.monotonic() < deadline
            assert started, f"the Ray head did not start:\n{log.read_text()}"
            time.sleep(2)
        for wrong in ({**base}, {**with_token, "RAY_AUTH_TOKEN": secrets.token_hex(32)}):
            done = subprocess.run(check, check=False, capture_output=True, text=True, env=wrong, timeout=120)
            assert done.returncode != 0 and "Authentication" in done.stderr, done.stderr[-2000:]
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
                head.wait(timeout=30)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(ray_temp, ignore_errors=True)
