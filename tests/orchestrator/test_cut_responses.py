"""A tracking server that goes down mid-request costs a trial nothing: a write whose answer was lost is
asked again, and a run creation asked again leaves no second run behind.

When the server dies after it committed a `runs/create` but before its answer reached the trial, MLflow's
client retries the POST (it retries every method) and the server creates a second run. The first one,
whose id the trial never saw, would stay RUNNING under the sweep and count as an extra, lost attempt of the
trial. A real MLflow server sits behind a real TCP proxy here that forwards the request and cuts the
connection before the answer, once. When the server dies while its answer's body is on the wire, MLflow's
client does not ask again by itself (`ChunkedEncodingError`: "IncompleteRead"); pxd's
`orchestrator.tracking.retries` does. The proxy cuts such an answer after its headers and one byte.
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
    its answer is dropped (`mid_body`: all but its headers and one byte) and the client's connection closed, as
    if the server had died just after committing."""

    def __init__(self, upstream: tuple[str, int], cut: bytes, *, mid_body: bool = False) -> None:
        self.upstream, self.cut, self.mid_body = upstream, cut, mid_body
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
            threading.Thread(target=self._answers, args=(server, client, cutting, self.mid_body), daemon=True).start()

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
    def _answers(server: socket.socket, client: socket.socket, cutting: threading.Event, mid_body: bool) -> None:
        try:
            while chunk := server.recv(65536):
                if cutting.is_set():  # the server has answered the request it committed: the answer is lost
                    end = chunk.find(b"\r\n\r\n")
                    if mid_body and end >= 0:
                        client.sendall(chunk[: end + 5])  # the headers and one byte of the body
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


CUTS = {
    "run creation, answer lost": (b"POST /api/2.0/mlflow/runs/create", False),
    "params, answer broken off mid-body": (b"POST /api/2.0/mlflow/runs/log-batch", True),
}


@pytest.mark.parametrize("cut", CUTS, ids=list(CUTS))
def test_a_trial_whose_answer_is_cut_completes_with_one_run(cut, mlflow_server, monkeypatch):
    host, port = mlflow_server.removeprefix("http://").rsplit(":", 1)
    request, mid_body = CUTS[cut]
    proxy = AnswerCuttingProxy((host, int(port)), request, mid_body=mid_body)
    through_proxy = f"http://127.0.0.1:{proxy.port}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")  # MLflow's own retries, quickly
    raw = tiny_space()
    raw["seed"] = 71 + list(CUTS).index(cut)  # stages of its own: the stage store is shared with the other sweep tests
    raw["student"]["arch"], raw["student"]["resolution"] = "resnet10t", 8
    del raw["student"]["depths"], raw["student"]["widths"]
    spec = parse_spec(raw, source_path="cut.yaml")
    client = MlflowClient(mlflow_server)
    experiment_id = ensure_experiment(client, "cut-responses")
    name = f"cut-{uuid.uuid4().hex[:6]}"
    parent = open_parent_run(client, experiment_id, name, spec, "sqlite:///unused.db", resume=False)
    context = TrialContext(spec=spec, sweep_name=name, tracking_uri=through_proxy, experiment_id=experiment_id,
                           parent_run_id=parent)

    try:
        result = run_trial({}, context, WorkerState.from_environment())
    finally:
        proxy.close()

    assert proxy.cuts == 1, f"the proxy must have cut the answer to {request.decode()}"
    runs = schema.trial_runs(client, client.get_run(parent))
    assert [run.info.run_id for run in runs] == [result.run_id], [
        (run.info.run_id, run.info.status, run.data.tags.get(Tag.STATE)) for run in runs]
    assert runs[0].data.tags[Tag.STATE] == "COMPLETE"
