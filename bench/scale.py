"""Scale (issue 30): a real `pxd sweep` of N trials on a Ray cluster of K nodes, simulated on one machine.

    PYTHONPATH=. python bench/scale.py --trials N --nodes K [--concurrency C] [--sampler S]
                                       [--kill-node-at M] [--seconds-per-epoch 0.5] --out FILE.json

What runs, every part a real process this script starts and stops by its own pid:

- PostgreSQL at 127.0.0.1:5432 (user postgres, trust auth): two fresh databases per run (MLflow's; Optuna's
  study and the stage leases), dropped at the end;
- `mlflow server` on the first, with proxied artifacts and basic auth, as the compose stack runs it (the
  test cluster of tests/orchestrator/test_cluster.py, `running_cluster`), with MLflow 3's job runner off
  (`MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`: its idle consumers poll at ~0.4 core);
- a Ray head that runs no trials and K worker nodes (`ray start`, 1 logical CPU each, object stores capped
  at 100 MB): K nodes on 2 physical cores, one trial per node at a time;
- `pxd sweep bench/scale.yaml --ray-address ...` as its own driver process, with
  `PXD_SIMULATED_TRAINING` set on every node: each stage's training is a sleep of `--seconds-per-epoch`
  per epoch and a deterministic score (`pxd.simulated`), everything else is real (Tune, Optuna on
  Postgres, MLflow runs, params, per-epoch metrics, stage look-ups, leases and uploads, the student's
  latency and model log, the frontier). The runs are marked (`pxd.simulated_training`).

`--kill-node-at M` kills every process of one worker node (its `ray start`, raylet and workers) once
the Optuna study holds M complete trials: Tune runs the trials it held again on the other nodes.

What it writes (FILE.json; the printed summary goes to stdout): `trials`, `nodes`, `trials_complete`,
`runs_left_running` (trial, stage and sweep runs still RUNNING in MLflow, plus RUNNING Optuna trials),
`trials_per_min` (over the driver's whole wall time), `driver_cpu_s_per_trial` and `driver_rss_mb` (the
`pxd sweep` process, from the kernel's accounting when it exits), `mlflow_requests_per_trial` (every
request the tracking server logged while the sweep ran, from its access log, ÷ trials; `mlflow_requests`
has them by endpoint and by phase), `growth_ratio` (median per-trial orchestration time, a trial run's
wall time minus its simulated training, of the last fifth of trials by start ÷ the first fifth),
`wall_over_ideal` (driver wall ÷ (trials × a trial's simulated seconds ÷ concurrency)), `end_of_sweep_s`
(from the last trial run's end until `pxd sweep` exits), `sampler_ms` and `pareto_page`
(bench/scale_probes.py), with the date, machine, versions and command. Not part of the test suite; a
30-trial version of it is (tests/orchestrator/test_scale.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml

from bench.scale_readback import read_back, request_counts
from orchestrator.worker.kept import SIMULATED_TRAINING_ENV
from tests.orchestrator.test_cluster import (
    REPO,
    Cluster,
    _admin_engine,
    _descendants,
    _kill_tree,
    _pg_url,
    _postgres_unavailable,
    _tail,
    _tool,
    fresh_databases,
    running_cluster,
)

SPACE = Path(__file__).resolve().parent / "scale.yaml"
# pxd's driver asks for no worker logs (`log_to_driver=False`): a node's log monitor would only poll its files
# (~0.6 % of a core each, the largest part of an idle node's CPU)
RAY_NODE_ARGS = ("--include-log-monitor=false",)


@dataclass
class ScaleSettings:
    trials: int
    nodes: int
    concurrency: int | None = None  # default: one trial per node
    sampler: str = "tpe"
    kill_node_at: int | None = None
    seconds_per_epoch: float = 0.5
    space: str = str(SPACE)
    samplers: list[str] = field(default_factory=lambda: ["tpe", "nsga2", "gp", "random"])
    sampler_budget_s: float = 600.0
    page_points: int = 1000  # 0: no page
    timeout_s: float = 4 * 3600.0  # a guard against a sweep that never ends; nothing asserts on durations
    logs: str | None = None  # a folder the server's and the driver's logs are copied to before the cluster stops

    @property
    def slots(self) -> int:
        return self.concurrency or self.nodes


@dataclass
class Driver:
    returncode: int
    wall_s: float
    cpu_s: float
    max_rss_mb: float
    started: float  # epoch seconds
    ended: float
    log: Path
    killed_node: dict[str, Any] | None = None


def node_environment(settings: ScaleSettings) -> dict[str, str]:
    """What every process of the cluster (nodes, server, driver) gets beside `running_cluster`'s own."""
    env = {
        SIMULATED_TRAINING_ENV: str(settings.seconds_per_epoch),
        "RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES": str(100 * 10**6),  # small object stores: K of them on one machine
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    }
    if settings.kill_node_at is not None:
        env.update({
            "PXD_STAGE_LEASE_TTL_S": "10",  # a lease held on the dead node frees quickly
            # the head notices a silent node within ~3 s instead of Ray's default ~30 s
            "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
        })
    return env


def sweep_name(settings: ScaleSettings) -> str:
    return f"scale-{settings.trials}x{settings.nodes}"


def driver_command(cluster: Cluster, settings: ScaleSettings) -> list[str]:
    overrides = {"search.trials": settings.trials, "search.max_concurrent": settings.slots,
                 "search.sampler.name": settings.sampler}
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    return [*_tool("pxd"), "sweep", settings.space, *sets, "--ray-address", cluster.ray_address,
            "--tracking-uri", cluster.tracking_uri, "--optuna-storage", cluster.optuna_storage,
            "--root", str(cluster.workdir / "root"), "--name", sweep_name(settings), "--json"]


def run_driver(cluster: Cluster, settings: ScaleSettings) -> Driver:
    """`pxd sweep` as its own process, waited for with the kernel's accounting of its CPU and peak memory;
    with `kill_node_at`, one worker node killed once the study holds that many complete trials."""
    log = cluster.workdir / "driver.log"
    with open(log, "ab") as stderr, open(cluster.workdir / "driver.json", "wb") as stdout:
        started, clock = time.perf_counter(), time.time()
        driver = subprocess.Popen(driver_command(cluster, settings), stdout=stdout, stderr=stderr, env=cluster.env,
                                  cwd=cluster.workdir, start_new_session=True)
    cluster.processes.append(driver)
    watch = NodeKiller(cluster, settings, driver) if settings.kill_node_at is not None else None
    guard = threading.Timer(settings.timeout_s, lambda: _kill_tree(driver))
    guard.daemon = True
    guard.start()
    if watch is not None:
        watch.start()
    _, status, usage = os.wait4(driver.pid, 0)
    wall = time.perf_counter() - started
    guard.cancel()
    if watch is not None:
        watch.stop.set()
        watch.join()
    driver.returncode = os.waitstatus_to_exitcode(status)
    return Driver(returncode=driver.returncode, wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime,
                  max_rss_mb=usage.ru_maxrss / 1024, started=clock, ended=clock + wall, log=log,
                  killed_node=watch.killed if watch is not None else None)


class NodeKiller(threading.Thread):
    """Kills one worker node's processes once the sweep's study holds `kill_node_at` complete trials
    (read from the Optuna database: no MLflow request is added to what the sweep makes)."""

    def __init__(self, cluster: Cluster, settings: ScaleSettings, driver: subprocess.Popen) -> None:
        super().__init__(name="pxd-scale-node-killer", daemon=True)
        self.cluster, self.settings, self.driver = cluster, settings, driver
        self.stop = threading.Event()
        self.killed: dict[str, Any] | None = None

    def run(self) -> None:
        engine = sa.create_engine(self.cluster.optuna_storage)
        try:
            while not self.stop.wait(1.0):
                if self._complete(engine) >= int(self.settings.kill_node_at or 0):
                    index = self._node_with_a_trial()
                    _kill_tree(self.cluster.workers[index])
                    self.killed = {"node_index": index, "at_complete": self._complete(engine), "at": time.time()}
                    print(f"[scale] killed worker node {index} at {self.killed['at_complete']} complete trials",
                          file=sys.stderr, flush=True)
                    return
        finally:
            engine.dispose()

    def _node_with_a_trial(self) -> int:
        """A worker node that holds a trial's process (Tune's actor, `ray::ImplicitFunc`), else the middle one."""
        for index, node in enumerate(self.cluster.workers):
            for pid in _descendants(node.pid):
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::ImplicitFunc"):
                        return index
        return len(self.cluster.workers) // 2

    @staticmethod
    def _complete(engine: sa.Engine) -> int:
        try:
            with engine.connect() as conn:
                return int(conn.execute(sa.text("SELECT count(*) FROM trials WHERE state = 'COMPLETE'")).scalar() or 0)
        except sa.exc.SQLAlchemyError:  # the study's tables do not exist yet
            return 0


@contextlib.contextmanager
def started_cluster(names: dict[str, str], settings: ScaleSettings, attempts: int = 3) -> Iterator[Cluster]:
    """`running_cluster` of `settings.nodes` 1-CPU worker nodes and a head that runs no trials. On a machine whose
    cores other work holds, a `ray start` can miss Ray's own 30 s start-up limit: the whole cluster is started
    again (each attempt's processes stopped first), at most `attempts` times."""
    for attempt in range(1, attempts + 1):
        with contextlib.ExitStack() as stack:
            try:
                cluster = stack.enter_context(running_cluster(
                    names, head_cpus=0, worker_cpus=(1,) * settings.nodes, env_extra=node_environment(settings),
                    ray_args=RAY_NODE_ARGS))
            except (Exception, _tool_failure()) as exc:
                if attempt == attempts:
                    raise
                print(f"[scale] the cluster did not start ({str(exc).splitlines()[0]}); again", file=sys.stderr)
                continue
            yield cluster
            return


def _tool_failure() -> type[BaseException]:
    """What the test helpers raise when a process does not start in time (pytest's `Failed`)."""
    import pytest  # the helpers come from the test suite, whose runner is installed with it

    return pytest.fail.Exception


def run_scale(settings: ScaleSettings, *, progress: bool = True, out: Path | None = None) -> dict[str, Any]:
    """The sweep on its cluster, then what it recorded read back; the probes without the cluster."""
    reason = _postgres_unavailable()
    if reason:
        raise RuntimeError(f"bench/scale.py needs PostgreSQL: {reason}")
    load_before = os.getloadavg()
    with fresh_databases("pxd_scale") as names:
        started = time.perf_counter()
        with started_cluster(names, settings) as cluster:
            cluster_start_s = time.perf_counter() - started
            if progress:
                print(f"[scale] {settings.nodes} worker nodes + head and mlflow server up in {cluster_start_s:.0f} s; "
                      f"sweep of {settings.trials} trials, {settings.slots} at a time ...", file=sys.stderr, flush=True)
            driver = run_driver(cluster, settings)
            if settings.logs:
                Path(settings.logs).mkdir(parents=True, exist_ok=True)
                for log in ("mlflow.log", "driver.log"):
                    shutil.copy(cluster.workdir / log, Path(settings.logs) / log)
            if driver.returncode != 0:
                raise RuntimeError(f"pxd sweep exited {driver.returncode}:\n{_tail(driver.log, 60)}")
            requests = request_counts(cluster.workdir / "mlflow.log", since=driver.started, until=driver.ended)
            result = read_back(cluster, settings, driver, requests, sweep=sweep_name(settings))
        result["cluster_start_s"] = cluster_start_s
        if out is not None:  # the sweep's figures are kept even if a probe below is cut short
            out.write_text(json.dumps(result, indent=2, default=str))
        if settings.samplers:
            from bench.scale_probes import sampler_ms  # optional: imports the sampler probe only when asked

            result["sampler_ms"] = sampler_ms(settings.samplers, [100, 500, 1000], storage=_pg_url(names["optuna"]),
                                              budget_s=settings.sampler_budget_s)
            if out is not None:  # kept if the page probe fails
                out.write_text(json.dumps(result, indent=2, default=str))
    if settings.page_points:
        from bench.scale_probes import pareto_page  # optional: playwright

        try:
            result["pareto_page"] = pareto_page(points=settings.page_points)
        except Exception as exc:  # noqa: BLE001 - e.g. no Chromium: the sweep's and samplers' figures stand
            result["pareto_page"] = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"}
            print(f"[scale] the Pareto page probe failed: {result['pareto_page']['error']}", file=sys.stderr, flush=True)
    result["environment"] = environment(load_before, settings)
    return result


def environment(load_before: tuple[float, float, float], settings: ScaleSettings) -> dict[str, Any]:
    """Date, machine, versions and command."""
    import mlflow  # versions only
    import optuna
    import ray
    import torch

    with _admin_engine().connect() as conn:
        postgres = str(conn.execute(sa.text("SHOW server_version")).scalar())
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"cpus": os.cpu_count(), "memory_gb": round(memory_gb, 1), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(), "gpu": None},
        "versions": {"python": platform.python_version(), "ray": ray.__version__, "mlflow": mlflow.__version__,
                     "optuna": optuna.__version__, "torch": torch.__version__, "postgres": postgres},
        "command": "PYTHONPATH=. python " + " ".join(sys.argv) if sys.argv[0].endswith("scale.py") else None,
        "settings": asdict(settings),
        "space": yaml.safe_load(Path(settings.space).read_text()),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, required=True)
    parser.add_argument("--nodes", type=int, required=True, help="worker nodes (a head that runs no trials besides)")
    parser.add_argument("--concurrency", type=int, default=None, help="search.max_concurrent (default: --nodes)")
    parser.add_argument("--sampler", default="tpe", help="the sweep's sampler")
    parser.add_argument("--kill-node-at", type=int, default=None, metavar="M",
                        help="kill one worker node's processes once M trials are complete")
    parser.add_argument("--seconds-per-epoch", type=float, default=0.5, help="a simulated epoch's sleep")
    parser.add_argument("--samplers", nargs="*", default=["tpe", "nsga2", "gp", "random"],
                        help="samplers whose ask+tell is timed at 100/500/1,000 trials (none: skip)")
    parser.add_argument("--sampler-budget-s", type=float, default=600.0, help="per sampler; gp stops early")
    parser.add_argument("--page-points", type=int, default=1000, help="points of the Pareto page timed (0: skip)")
    parser.add_argument("--logs", default=None, help="copy the tracking server's and the driver's logs here")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    settings = ScaleSettings(trials=args.trials, nodes=args.nodes, concurrency=args.concurrency, sampler=args.sampler,
                             kill_node_at=args.kill_node_at, seconds_per_epoch=args.seconds_per_epoch,
                             samplers=args.samplers, sampler_budget_s=args.sampler_budget_s,
                             page_points=args.page_points, logs=args.logs)
    result = run_scale(settings, out=args.out)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    from bench.scale_readback import summary  # the printed table

    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
