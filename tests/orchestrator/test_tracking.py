"""The embedded tracking server is shared safely by every pxd process on a root, and read-only
commands never wait for one to start. Real `mlflow server` processes throughout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.tracking.server import EmbeddedServer, _healthy, _pid_alive, resolve_tracking, ui_command
from tests.orchestrator.test_faults import REPO, _env

SAFETY_TIMEOUT_S = 300


def test_no_user_stops_a_server_another_one_is_using(tmp_path):
    first, second = EmbeddedServer(tmp_path), EmbeddedServer(tmp_path)
    uri = first.start()
    try:
        assert second.start() == uri  # joined, not a second server on the same SQLite file
        first.stop()  # the one that started it leaves first
        assert _healthy(uri), "the server was stopped while another user still used it"
        MlflowClient(uri).search_experiments()
    finally:
        second.stop()
    assert not _healthy(uri), "the last user's leaving stops the server"
    assert not (tmp_path / "mlflow-server.json").exists()


def _process_tree(pid: int) -> list[str]:
    """Command lines of `pid` and every descendant (from /proc)."""
    children: dict[int, list[int]] = {}
    commands: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
            commands[int(entry)] = open(f"/proc/{entry}/cmdline").read().replace("\0", " ")
        except OSError:
            continue
        children.setdefault(int(stat.rpartition(")")[2].split()[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(commands.get(current, ""))
        todo.extend(children.get(current, []))
    return found


def test_a_zombie_counts_as_a_dead_process():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + SAFETY_TIMEOUT_S
        while open(f"/proc/{child.pid}/stat").read().rpartition(")")[2].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child never exited"
            time.sleep(0.05)
        # exited but not reaped: signal 0 still reaches it, yet it serves nothing
        assert not _pid_alive(child.pid)
        assert _pid_alive(os.getpid())
    finally:
        child.wait()


def test_the_embedded_server_runs_no_job_runner_and_stopping_it_leaves_no_process(tmp_path):
    server = EmbeddedServer(tmp_path)
    server.start()
    pid = json.loads((tmp_path / "mlflow-server.json").read_text())["pid"]
    try:
        tree = _process_tree(pid)
        assert any("uvicorn" in command for command in tree), tree
        # MLflow's job execution (huey consumers, a job runner) is off: pxd runs no MLflow jobs
        assert not [command for command in tree if "huey" in command or "_job_runner" in command], tree
    finally:
        server.stop()
    # the starter reaped its child: no zombie left behind for the rest of the sweep's life
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_user_that_died_does_not_keep_the_server_alive(tmp_path):
    script = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from orchestrator.tracking.server import EmbeddedServer
        print(EmbeddedServer(Path({str(tmp_path)!r})).start(), flush=True)
        os._exit(0)  # dies without leaving, like a killed sweep
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=SAFETY_TIMEOUT_S)
    uri = done.stdout.strip().splitlines()[-1]
    assert _healthy(uri), "the server outlives its starter"
    mine = EmbeddedServer(tmp_path)
    assert mine.start() == uri
    mine.stop()
    assert not _healthy(uri), "the dead user was pruned; the last live user stopped the server"


def test_two_processes_starting_at_once_share_one_server(tmp_path):
    script = textwrap.dedent(f"""
        import json, time
        from pathlib import Path
        from orchestrator.tracking.server import EmbeddedServer
        server = EmbeddedServer(Path({str(tmp_path)!r}))
        uri = server.start()
        time.sleep(3)
        print(json.dumps(uri), flush=True)
        server.stop()
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    uris = [json.loads(p.communicate(timeout=SAFETY_TIMEOUT_S)[0].strip().splitlines()[-1]) for p in procs]
    assert uris[0] == uris[1]
    assert not _healthy(uris[0])


def test_read_only_commands_read_the_store_without_starting_a_server(tmp_path):
    server = EmbeddedServer(tmp_path)
    uri = server.start()
    MlflowClient(uri).create_experiment("kept")
    server.stop()
    target = resolve_tracking(None, tmp_path, read_only=True)
    assert target.server is None and target.uri.startswith("sqlite:///")
    assert "kept" in {e.name for e in MlflowClient(target.uri).search_experiments()}
    assert not (tmp_path / "mlflow-server.json").exists()  # no server was started
    assert "mlflow server --backend-store-uri sqlite:///" in ui_command(target)


def test_the_ui_hint_works_for_every_tracking_uri_kind(tmp_path):
    from orchestrator.tracking.server import TrackingTarget

    assert ui_command(TrackingTarget("http://10.0.0.5:5000", None)) == "open http://10.0.0.5:5000 in a browser"
    hint = ui_command(TrackingTarget(f"sqlite:///{tmp_path}/m.db", None))
    assert hint.startswith(f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/m.db")
    hint = ui_command(TrackingTarget("postgresql://u@db/mlflow", None))
    assert hint.startswith("mlflow ui --backend-store-uri postgresql://u@db/mlflow")


@pytest.mark.slow
@pytest.mark.long
def test_two_sweeps_launched_at_once_on_one_root_both_finish_with_all_their_runs(tmp_path):
    """Two `pxd sweep` processes on one root, no --tracking-uri: they share one embedded server, neither
    stops it under the other, and each sweep's runs are all there afterwards."""
    import tempfile

    import yaml

    from orchestrator.results import schema
    from tests.orchestrator.conftest import tiny_space

    root = tmp_path / "root"
    commands = []
    for index in range(2):
        raw = tiny_space(trials=2, max_concurrent=1)
        raw["seed"] = 40 + index
        space = tmp_path / f"space{index}.yaml"
        space.write_text(yaml.safe_dump(raw, sort_keys=False))
        commands.append([sys.executable, "-m", "orchestrator.cli", "sweep", str(space), "--root", str(root),
                         "--name", f"twin-{index}", "--quiet", "--json"])
    procs = [subprocess.Popen(command, cwd=REPO, env=_env(RAY_TMPDIR=tempfile.mkdtemp(prefix="pxdray")),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for command in commands]
    outputs = [proc.communicate(timeout=2 * SAFETY_TIMEOUT_S) for proc in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    assert not (root / "mlflow-server.json").exists(), "the last sweep to leave stops the shared server"
    target = resolve_tracking(None, root, read_only=True)  # the store itself, after both have gone
    client = MlflowClient(target.uri)
    for index in range(2):
        parent = schema.find_sweep_run(client, f"twin-{index}")
        assert parent is not None and parent.info.status == "FINISHED"
        states = [run.data.tags[schema.Tag.STATE] for run in schema.trial_runs(client, parent)]
        assert states == ["COMPLETE", "COMPLETE"]
