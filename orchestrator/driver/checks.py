"""A launch's input checks, run before anything is created: the dataset, names, the tracking URI, the Ray
cluster's resources and where stage leases live."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.space.spec import check_sweep_name
from orchestrator.tracking.server import check_tracking
from pxd.data import check_dataset
from pxd.errors import ConfigError

if TYPE_CHECKING:
    from orchestrator.driver.options import SweepOptions
    from orchestrator.space.spec import SweepSpec

__all__ = ["validate_launch", "check_reachable", "check_cluster_can_run", "lease_url"]


def lease_url(options: SweepOptions, root: Path) -> str:
    """Stage leases live where every trial can reach them: the sweep's server database when there
    is one (Postgres on a cluster), else a SQLite file shared by every sweep under this root."""
    if _shared_database(options.optuna_storage):
        return str(options.optuna_storage)
    return f"sqlite:///{root / 'stage-leases.db'}"


def _shared_database(storage_url: str | None) -> bool:
    return bool(storage_url) and not str(storage_url).startswith("sqlite")


def _check_lease_store(options: SweepOptions) -> None:
    """A cluster sweep needs a lease store every node reaches (`lease_url`): refused without one, since
    trials on other nodes would each train the shared stages (single-flight lost)."""
    if options.ray_address and not _shared_database(options.optuna_storage):
        given = (f"{options.optuna_storage} is a SQLite file" if options.optuna_storage
                 else "without it they are a SQLite file")
        raise ConfigError("--optuna-storage", f"a sweep on a Ray cluster (--ray-address) keeps its stage leases in the "
                                              f"Optuna database, which every node must reach; {given} on the driver's "
                                              "disk. Pass a Postgres URL, e.g. the compose stack's --optuna-storage "
                                              "postgresql+psycopg2://postgres@postgres:5432/optuna")


def validate_launch(spec: SweepSpec, options: SweepOptions) -> None:

    check_dataset(spec.base.dataset)
    if options.name is not None:
        check_sweep_name(options.name, "--name")
    check_tracking(options.tracking_uri, cluster=options.ray_address is not None)
    _check_lease_store(options)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """An unreachable --ray-address fails in seconds (Ray itself retries a dead address for minutes)."""

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError("--ray-address", f"expected HOST:PORT of the Ray head (e.g. 10.0.0.5:6379), got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConfigError("--ray-address", f"cannot reach {host}:{port} ({exc.strerror or exc}); check that the head "
                                           "runs (`ray start --head`) and the address, or omit it to run locally") from None


def check_cluster_can_run(spec: SweepSpec, available: dict[str, float]) -> None:
    """Refuse, before any compute, a trial the Ray cluster could never schedule (Tune would wait forever)."""
    search = spec.require_search()
    gpus, cpus = float(available.get("GPU", 0.0)), float(available.get("CPU", 0.0))
    if search.resources.gpu > gpus:
        raise ConfigError("search.resources.gpu", f"each trial asks for {search.resources.gpu:g} GPU but the Ray cluster "
                                                  f"has {gpus:g}; set search.resources.gpu: 0, or add GPU nodes")
    if search.resources.cpu > cpus:
        raise ConfigError("search.resources.cpu", f"each trial asks for {search.resources.cpu:g} CPUs but the Ray cluster "
                                                  f"has {cpus:g}; lower search.resources.cpu")
    for field, device in (("search.latency.device", search.latency.device), ("train.device", spec.base.train.device)):
        if device == "cuda" and search.resources.gpu <= 0:
            reason = "the Ray cluster has no GPU" if gpus == 0 else "trials reserve no GPU (search.resources.gpu: 0)"
            raise ConfigError(field, f"is cuda but {reason}; use auto or cpu, or give each trial a GPU with "
                                     "search.resources.gpu")
