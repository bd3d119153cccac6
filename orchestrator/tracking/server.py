"""Where runs are tracked: a user's MLflow server, or an embedded one that pxd starts.

Tracking URI precedence follows MLflow's habit: `--tracking-uri`, then `MLFLOW_TRACKING_URI`, then an
embedded default. The embedded default is a real `mlflow server` on 127.0.0.1 with a SQLite backend
and proxied artifacts under the results root. Why a server and not `sqlite:///` straight from every
trial: SQLite locks under concurrent writers from several processes; behind one server process the
writes are serialised, and MLflow's HTTP client retries transient errors with backoff, so concurrent
trials (and a restarting server) lose nothing. Trials on other nodes need a URI they can reach, so a
cluster run (`--ray-address`) must name a tracking server. A server with auth on (the compose stack's
`mlflow server --app-name basic-auth`) takes MLflow's own MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD,
which MLflow's client reads in every pxd process and trial; pxd adds no credential settings of its own.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from orchestrator.tracking import credentials
from pxd.errors import ConfigError

__all__ = [
    "DEFAULT_ROOT",
    "EmbeddedServer",
    "TrackingTarget",
    "results_root",
    "resolve_tracking",
    "check_tracking",
    "login_error",
    "ui_command",
    "experiment_page",
    "fluent_tracking_uri",
    "launch_tracking",
    "restored_tracking_uri",
]

DEFAULT_ROOT = "pxd-results"
SERVER_FILE = "mlflow-server.json"
LOCK_FILE = "mlflow-server.lock"
USERS_DIR = "mlflow-server.users"


def results_root(root: str | Path | None = None, *, create: bool = True) -> Path:
    """The folder for embedded stores: `--root`, else `PXD_HOME`, else ./pxd-results (made unless `create` is false)."""
    path = Path(root or os.environ.get("PXD_HOME") or DEFAULT_ROOT).expanduser().resolve()
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


_LAUNCH_URI: list[str] = []  # the tracking URI of the sweep launch this driver runs, while it runs


@contextmanager
def launch_tracking(uri: str) -> Iterator[None]:
    """While a sweep launch runs in this driver: the tracking URI that what Tune restores from an earlier
    launch's pickles (the searcher's recorded trials, the MO-ASHA scheduler, the lost-attempt callback)
    talks to. An earlier launch's URI can be gone: the embedded server of a resumed sweep listens on a
    new port, and a resume finds the sweep's parent run at this launch's URI, so that is where its records are.

    MLflow also keeps one artifact repository per run id for the whole process, whatever tracking URI it
    was resolved against (`mlflow-artifacts:` → the server it was first reached at): a second launch of a
    sweep in one process would upload the parent run's frontier to the first launch's server. Forgotten here."""
    _LAUNCH_URI.append(uri)
    _forget_artifact_repos()
    try:
        yield
    finally:
        _LAUNCH_URI.pop()
        _forget_artifact_repos()  # the launch's embedded server stops now: later writes here resolve afresh


def _forget_artifact_repos() -> None:
    # deferred, as every MLflow import here: the CLI imports this module before it parses its arguments
    from mlflow.tracking._tracking_service import utils as tracking_utils

    cache = getattr(tracking_utils, "_artifact_repos_cache", None)
    if cache is not None:
        cache.clear()


def restored_tracking_uri(pickled: str) -> str:
    """The tracking URI for one that an object pickled (password-free): this launch's while a launch
    runs (`launch_tracking`), else the pickled one with its password back (`credentials.full_url`)."""
    return _LAUNCH_URI[-1] if _LAUNCH_URI else credentials.full_url(pickled)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(uri: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _pid_alive(pid: int) -> bool:
    """Whether `pid` runs. A zombie (exited, not yet reaped by its parent) counts as dead: signal 0
    still reaches it, but it serves nothing and will never exit further."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        # /proc/<pid>/stat: "pid (comm) state ..."; comm may hold spaces or parentheses, so split after the last ')'
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): signal 0 is all there is


@contextmanager
def _root_lock(root: Path) -> Iterator[None]:
    """Serialises starting, joining and stopping the embedded server of one root across processes."""
    with open(root / LOCK_FILE, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class EmbeddedServer:
    """A local `mlflow server` (SQLite backend, proxied artifacts) shared by every pxd process on a root.

    Each user (a sweep, `pxd frontier`, a test) registers a file under `mlflow-server.users/`; the first
    starts the server (in a session of its own, so it outlives its starter), later ones join it, and
    the last one to leave stops it. Users whose process died are pruned, so a crashed sweep never keeps
    a server alive or stops one another sweep is using.
    """

    root: Path
    process: subprocess.Popen | None = None
    uri: str | None = None
    port: int | None = None  # fixed port (e.g. to restart on the same URI); None: any free port
    user: str | None = None  # this object's registration, while it uses the server

    @property
    def backend_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def users_dir(self) -> Path:
        return self.root / USERS_DIR

    def start(self, timeout_s: float = 180.0) -> str:
        """Join the server serving this root, or start one and wait until healthy; register as a user."""
        with _root_lock(self.root):
            uri = self.running() or self._launch(timeout_s)
            self.users_dir.mkdir(exist_ok=True)
            self.user = f"{os.getpid()}-{secrets.token_hex(4)}"
            (self.users_dir / self.user).write_text(str(os.getpid()))
        self.uri = uri
        return uri

    def _launch(self, timeout_s: float) -> str:
        port = self.port or _free_port()
        uri = f"http://127.0.0.1:{port}"
        log = open(self.root / "mlflow-server.log", "ab")
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend_uri,
            "--artifacts-destination", str(self.artifacts),
            "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ]
        # MLflow's job execution (GenAI evaluation and prompt jobs; pxd runs none) starts a job runner and
        # seven huey consumers, each importing MLflow: CPU-seconds at start and pollers for the whole
        # sweep, which on a laptop compete with training. The user's own setting wins.
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the embedded MLflow server exited at start; see {self.root / 'mlflow-server.log'}")
            if _healthy(uri):
                (self.root / SERVER_FILE).write_text(json.dumps({"pid": self.process.pid, "uri": uri}))
                return uri
            time.sleep(0.5)
        _kill_group(self.process.pid)
        raise RuntimeError(f"the embedded MLflow server did not answer within {timeout_s:.0f}s; see {self.root / 'mlflow-server.log'}")

    def running(self) -> str | None:
        """The URI of a healthy server serving this root, if one runs."""
        info = self._info()
        if info and _pid_alive(int(info.get("pid", -1))) and _healthy(info["uri"]):
            return str(info["uri"])
        return None

    def _info(self) -> dict | None:
        try:
            return dict(json.loads((self.root / SERVER_FILE).read_text()))
        except (OSError, json.JSONDecodeError):
            return None

    def stop(self) -> None:
        """Leave the server; the last user (counting only live processes) stops it."""
        if self.user is None:
            return
        with _root_lock(self.root):
            (self.users_dir / self.user).unlink(missing_ok=True)
            self.user = None
            if self._live_users():
                return
            info = self._info()
            if info:
                pid = int(info.get("pid", -1))
                _kill_group(pid, self.process if self.process is not None and self.process.pid == pid else None)
            (self.root / SERVER_FILE).unlink(missing_ok=True)
        if self.process is not None:
            self.process.poll()  # the starter reaps its child also when the last user elsewhere stopped it
        self.process = None

    def _live_users(self) -> list[str]:
        live = []
        for path in self.users_dir.glob("*") if self.users_dir.exists() else []:
            try:
                pid = int(path.read_text() or -1)
            except (OSError, ValueError):
                pid = -1
            if _pid_alive(pid):
                live.append(path.name)
            else:
                path.unlink(missing_ok=True)  # its process died without leaving
        return live


def _kill_group(pid: int, child: subprocess.Popen | None = None) -> None:
    """Stop the server's process group (it runs in a session of its own: pgid == pid): SIGTERM, then
    SIGKILL after 20 s. `child`: the server when this process started it, waited for (and so reaped)."""
    if pid <= 0:
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    if child is not None:
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            child.wait()
        return
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.05)
    if _pid_alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class TrackingTarget:
    uri: str
    server: EmbeddedServer | None  # set when this process uses the root's embedded server
    store: Path | None = None  # the embedded store's root, also when read directly (no server)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


@contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (start_run, log_model, load_model) for `uri`, then the caller's URI back.
    `mlflow.set_tracking_uri` is process-wide and also sets MLFLOW_TRACKING_URI: code that runs in the
    caller's process (a trial run directly, `pxd remeasure` timing here) must not leak it."""
    import mlflow  # deferred: the CLI imports this module before it parses its arguments

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def check_tracking(cli_uri: str | None, *, cluster: bool) -> None:
    """A cluster run needs a tracking server every node reaches; raise `ConfigError` otherwise."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if cluster and uri and uri.startswith(("file:", "sqlite:", "./", "/")):
        raise ConfigError(
            "--tracking-uri",
            f"{uri} is a local store; trials on other nodes cannot write to it. Start `mlflow server` "
            "(e.g. on Postgres) and pass its http:// URI",
        )
    if cluster and not uri:
        raise ConfigError(
            "--tracking-uri",
            "a Ray cluster (--ray-address) needs a tracking server every node can reach; pass "
            "--tracking-uri http://HOST:PORT or set MLFLOW_TRACKING_URI",
        )


# MLflow's error codes for a tracking server's answers 401 (no or a wrong login) and 403 (no permission)
_REFUSAL_STATUS = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}


def login_error(exc: BaseException) -> ConfigError | None:
    """A tracking server's refusal of the credentials as an error that names MLflow's credential
    variables; None for every other error."""
    status = _REFUSAL_STATUS.get(str(getattr(exc, "error_code", "")))
    if status is None:
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    who = f"the MLflow user {user!r}" if user else "a client without a login (MLFLOW_TRACKING_USERNAME is not set)"
    return ConfigError(
        "MLFLOW_TRACKING_USERNAME",
        f"the MLflow tracking server refused {who} (HTTP {status}); set MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD to a login with access (the compose stack's is MLFLOW_ADMIN_* in .env)",
    )


def given_tracking_uri(cli_uri: str | None) -> str | None:
    """The user's tracking URI, by MLflow's precedence (`--tracking-uri`, then MLFLOW_TRACKING_URI); None:
    the embedded store."""
    return cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def resolve_tracking(cli_uri: str | None, root: Path, *, cluster: bool = False, read_only: bool = False) -> TrackingTarget:
    """The tracking URI to use. `read_only` (pxd frontier, pxd stages): never wait for a server to start;
    without a running one, read the embedded store's database directly (safe beside a writing server)."""
    check_tracking(cli_uri, cluster=cluster)
    uri = given_tracking_uri(cli_uri)
    if uri:
        return TrackingTarget(uri=uri, server=None)
    server = EmbeddedServer(root)
    if read_only and not server.running():
        return TrackingTarget(uri=server.backend_uri, server=None, store=root)
    return TrackingTarget(uri=server.start(), server=server, store=root)


def ui_command(target: TrackingTarget) -> str:
    """The exact command that opens the MLflow UI on the results, for every kind of tracking URI."""
    if target.store is not None:
        server = EmbeddedServer(target.store)
        return (f"mlflow server --backend-store-uri {server.backend_uri} "
                f"--artifacts-destination {server.artifacts} --port 5000   # then open http://127.0.0.1:5000")
    if target.uri.startswith(("http://", "https://")):
        return f"open {target.uri} in a browser"
    if target.uri.startswith("databricks"):
        return "open the experiment in your Databricks workspace"
    # a database or file store the user named: serve it with MLflow's own UI
    return f"mlflow ui --backend-store-uri {target.uri} --port 5000   # then open http://127.0.0.1:5000"


def experiment_page(ui: str, experiment_id: str) -> str:
    """`ui` (a `ui_command`) with the address it opens taken to the experiment's runs in MLflow's Model-training
    view. MLflow 3 opens an experiment in its GenAI view unless the address asks (`workflowType`): the sidebar's
    choice is kept per browser, and the experiment's `mlflow.experimentKind` tag does not switch it."""
    page = f"/#/experiments/{urllib.parse.quote(experiment_id, safe='')}/runs?workflowType=machine_learning"
    return re.sub(r"\bopen (https?://[^\s#?]+?)/?(?=\s|$)", lambda m: f"open {m.group(1)}{page}", ui, count=1)
