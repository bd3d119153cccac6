"""Where runs are tracked: a user's MLflow server, or an embedded one that pxd starts.

Tracking URI precedence follows MLflow's habit: `--tracking-uri`, then `MLFLOW_TRACKING_URI`, then an
embedded default. The embedded default is a real `mlflow server` on 127.0.0.1 with a SQLite backend
and proxied artifacts under the results root. Why a server and not `sqlite:///` straight from every
trial: SQLite locks under concurrent writers from several processes; behind one server process the
writes are serialised, and MLflow's HTTP client retries transient errors with backoff, so concurrent
trials (and a restarting server) lose nothing. Trials on other nodes need a URI they can reach, so a
cluster run (`--ray-address`) must name a tracking server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pxd.errors import ConfigError

__all__ = [
    "DEFAULT_ROOT",
    "EmbeddedServer",
    "TrackingTarget",
    "results_root",
    "resolve_tracking",
    "check_tracking",
    "ui_command",
]

DEFAULT_ROOT = "pxd-results"
SERVER_FILE = "mlflow-server.json"


def results_root(root: str | Path | None = None) -> Path:
    """The folder for embedded stores: `--root`, else `PXD_HOME`, else ./pxd-results."""
    path = Path(root or os.environ.get("PXD_HOME") or DEFAULT_ROOT).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


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
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class EmbeddedServer:
    """A local `mlflow server` (SQLite backend, proxied artifacts) owned by this results root."""

    root: Path
    process: subprocess.Popen | None = None
    uri: str | None = None
    port: int | None = None  # fixed port (e.g. to restart on the same URI); None: any free port

    @property
    def backend_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifacts(self) -> Path:
        return self.root / "mlartifacts"

    def start(self, timeout_s: float = 180.0) -> str:
        """Reuse a healthy server already serving this root, else start one and wait until healthy."""
        existing = self._running()
        if existing:
            self.uri = existing
            return existing
        port = self.port or _free_port()
        uri = f"http://127.0.0.1:{port}"
        log = open(self.root / "mlflow-server.log", "ab")
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend_uri,
            "--artifacts-destination", str(self.artifacts),
            "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ]
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the embedded MLflow server exited at start; see {self.root / 'mlflow-server.log'}")
            if _healthy(uri):
                (self.root / SERVER_FILE).write_text(json.dumps({"pid": self.process.pid, "uri": uri}))
                self.uri = uri
                return uri
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the embedded MLflow server did not answer within {timeout_s:.0f}s; see {self.root / 'mlflow-server.log'}")

    def _running(self) -> str | None:
        path = self.root / SERVER_FILE
        if not path.exists():
            return None
        try:
            info = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if _pid_alive(int(info.get("pid", -1))) and _healthy(info["uri"]):
            return str(info["uri"])
        return None

    def stop(self) -> None:
        """Stop the server if this object started it (a reused one belongs to someone else)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
        (self.root / SERVER_FILE).unlink(missing_ok=True)
        self.process = None


@dataclass
class TrackingTarget:
    uri: str
    server: EmbeddedServer | None  # set when pxd started (or reused) an embedded server

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


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


def resolve_tracking(cli_uri: str | None, root: Path, *, cluster: bool = False) -> TrackingTarget:
    check_tracking(cli_uri, cluster=cluster)
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return TrackingTarget(uri=uri, server=None)
    server = EmbeddedServer(root)
    return TrackingTarget(uri=server.start(), server=server)


def ui_command(target: TrackingTarget) -> str:
    """The exact command a user runs to open the MLflow UI on the results."""
    if target.server is None:
        return f"open {target.uri} in a browser"
    server = target.server
    return (
        f"mlflow server --backend-store-uri {server.backend_uri} "
        f"--artifacts-destination {server.artifacts} --port 5000   # then open http://127.0.0.1:5000"
    )
