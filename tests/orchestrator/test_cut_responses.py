"""A tracking server that goes down mid-request costs a trial nothing: a write whose response was lost is
retried by MLflow's client, and a retried run creation leaves no second run behind.

When the server dies after it committed a `runs/create` but before its answer reached the trial, MLflow's
client retries the POST (it retries every method) and the server creates a second run. The first one,
whose id the trial never saw, would stay RUNNING under the sweep and count as an extra, lost attempt of the
trial. A real MLflow server sits behind a real TCP proxy here that forwards the request and cuts the
connection before the answer, once.
"""

from __future__ import annotations

import socket
import threading
import uuid

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.driver.parent_run import ensure_experiment, open_parent_run
from orchestrator.results import schema
from orchestrator.results.schema import Tag
from orchestrator.space.spec import parse_spec
from orchestrator.worker.context import TrialContext
from orchestrator.worker.kept import WorkerState
from orchestrator.worker.trial import run_trial
from tests.orchestrator.conftest import free_port, tiny_space


class AnswerCuttingProxy:
    """Forwards TCP to `upstream`; the first request whose first line starts with `cut` reaches the server, and
    its answer is dropped and the client's connection closed, as if the server had died just after committing."""

    def __init__(self, upstream: tuple[str, int], cut: bytes) -> None:
        self.upstream, self.cut = upstream, cut
        self.port = free_port()
        self.cuts = 0
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            cutting = threading.Event()
            threading.Thread(target=self._requests, args=(client, server, cutting), daemon=True).start()
            threading.Thread(target=self._answers, args=(server, client, cutting), daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket, cutting: threading.Event) -> None:
        try:
            while chunk := client.recv(65536):
                with self._lock:
                    if self.cuts == 0 and chunk.startswith(self.cut):
                        self.cuts += 1
                        cutting.set()
                server.sendall(chunk)
        except OSError:
            pass

    @staticmethod
    def _answers(server: socket.socket, client: socket.socket, cutting: threading.Event) -> None:
        try:
            while chunk := server.recv(65536):
                if cutting.is_set():  # the server has answered the request it committed: the answer is lost
                    break
                client.sendall(chunk)
        except OSError:
            pass
        for sock in (client, server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def cut_run_creation(mlflow_server):
    host, port = mlflow_server.removeprefix("http://").rsplit(":", 1)
    proxy = AnswerCuttingProxy((host, int(port)), b"POST /api/2.0/mlflow/runs/create")
    yield proxy, f"http://127.0.0.1:{proxy.port}"
    proxy.close()


def test_a_trial_whose_run_creation_answer_is_lost_leaves_one_run(cut_run_creation, mlflow_server, monkeypatch):
    proxy, through_proxy = cut_run_creation
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")  # MLflow's own retries, quickly
    raw = tiny_space()
    raw["student"]["arch"], raw["student"]["resolution"] = "resnet10t", 8
    del raw["student"]["depths"], raw["student"]["widths"]
    spec = parse_spec(raw, source_path="cut.yaml")
    client = MlflowClient(mlflow_server)
    experiment_id = ensure_experiment(client, "cut-responses")
    name = f"cut-{uuid.uuid4().hex[:6]}"
    parent = open_parent_run(client, experiment_id, name, spec, "sqlite:///unused.db", resume=False)
    context = TrialContext(spec=spec, sweep_name=name, tracking_uri=through_proxy, experiment_id=experiment_id,
                           parent_run_id=parent)

    result = run_trial({}, context, WorkerState.from_environment())

    assert proxy.cuts == 1, "the proxy must have cut the answer to the run's creation"
    runs = schema.trial_runs(client, client.get_run(parent))
    assert [run.info.run_id for run in runs] == [result.run_id], [
        (run.info.run_id, run.info.status, run.data.tags.get(Tag.STATE)) for run in runs]
    assert runs[0].data.tags[Tag.STATE] == "COMPLETE"
