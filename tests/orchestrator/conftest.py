"""Real components for sweep tests: a local Ray, a real `mlflow server` over HTTP, tiny spaces."""

from __future__ import annotations

import copy
import socket
from typing import Any

import pytest

from tests.conftest import TINY_CONFIG


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        # address="local": a new local cluster even if a `ray start` cluster runs on this machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def results_root(tmp_path_factory):
    return tmp_path_factory.mktemp("pxd-results")


@pytest.fixture(scope="session")
def mlflow_server(results_root):
    """A real MLflow tracking server (SQLite backend, proxied artifacts) on 127.0.0.1."""
    from orchestrator.tracking.server import EmbeddedServer

    server = EmbeddedServer(results_root)
    uri = server.start()
    yield uri
    server.stop()


def tiny_space(**search: Any) -> dict[str, Any]:
    """The tiny config as a search space: 2 architectures × 3 input sizes on a grid."""
    raw = copy.deepcopy(TINY_CONFIG)
    raw["student"]["arch"] = {"choice": ["blockwise_resnet", "resnet10t"]}
    raw["student"]["resolution"] = {"choice": [8, 16, 24]}
    raw["search"] = {
        "trials": 6,
        "max_concurrent": 2,
        "sampler": {"name": "grid", "seed": 0},
        "objectives": [{"metric": "val_top1", "mode": "max"}, {"metric": "pixels", "mode": "min"}],
        "reference_point": {"val_top1": 0.0, "pixels": 1024},
        **search,
    }
    return raw


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
