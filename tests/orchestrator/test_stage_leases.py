"""Lease database connections are pooled per process: one engine per URL, a bounded number of connections."""

from __future__ import annotations

import importlib.util
import pickle
import threading
import uuid

import pytest
import sqlalchemy as sa

from orchestrator.stages.leases import LEASE_MAX_OVERFLOW, LEASE_POOL_SIZE, SqlLeases

BOUND = LEASE_POOL_SIZE + LEASE_MAX_OVERFLOW
# the installed driver named explicitly: a bare postgresql:// means psycopg 3 under SQLAlchemy 2.1, psycopg2 under 2.0
DRIVER = next((name for name in ("psycopg2", "psycopg") if importlib.util.find_spec(name)), None)
POSTGRES_URL = f"postgresql+{DRIVER}://postgres@127.0.0.1:5432/test"


def _hammer(leases: list[SqlLeases], rounds: int = 10) -> None:
    """Many trials' stores at once, each taking, renewing and dropping leases from its own thread."""
    errors: list[BaseException] = []

    def trial(index: int) -> None:
        try:
            store = leases[index % len(leases)]
            for round_ in range(rounds):
                key = f"k{(index + round_) % 3}"
                if store.acquire(key, f"owner-{index}", 30.0):
                    store.renew(key, f"owner-{index}", 30.0)
                    store.holder(key)
                    store.release(key, f"owner-{index}")
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    threads = [threading.Thread(target=trial, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def _peak_checked_out(engine: sa.engine.Engine) -> list[int]:
    """Tracks how many pooled connections are in use at once; [current, peak]."""
    counts = [0, 0]
    lock = threading.Lock()

    def checkout(*_args) -> None:
        with lock:
            counts[0] += 1
            counts[1] = max(counts)

    def checkin(*_args) -> None:
        with lock:
            counts[0] -= 1

    sa.event.listen(engine, "checkout", checkout)
    sa.event.listen(engine, "checkin", checkin)
    return counts


def test_every_sqlite_lease_store_of_a_process_shares_one_bounded_engine(tmp_path):
    url = f"sqlite:///{tmp_path / 'leases.db'}"
    leases = [SqlLeases(url) for _ in range(40)] + [pickle.loads(pickle.dumps(SqlLeases(url)))]
    engine = leases[0]._engine
    assert all(lease._engine is engine for lease in leases)
    assert SqlLeases(f"sqlite:///{tmp_path / 'other.db'}")._engine is not engine  # one engine per URL
    counts = _peak_checked_out(engine)
    _hammer(leases)
    assert 1 <= counts[1] <= BOUND
    assert engine.pool.size() == LEASE_POOL_SIZE


@pytest.mark.skipif(DRIVER is None, reason="no Postgres driver (psycopg2 or psycopg) installed")
def test_postgres_connections_of_a_process_stay_under_the_bound():
    application = f"pxd-lease-test-{uuid.uuid4().hex[:8]}"
    url = f"{POSTGRES_URL}?application_name={application}"
    try:
        leases = [SqlLeases(url) for _ in range(40)]
    except sa.exc.OperationalError as exc:
        pytest.skip(f"Postgres at {POSTGRES_URL} is unreachable: {str(exc).splitlines()[0]}")
    counts = _peak_checked_out(leases[0]._engine)
    _hammer(leases)
    observer = sa.create_engine(POSTGRES_URL, poolclass=sa.pool.NullPool)
    with observer.connect() as conn:
        opened = conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :name"),
                              {"name": application}).scalar()
    observer.dispose()
    assert 1 <= counts[1] <= BOUND
    assert 1 <= opened <= BOUND  # what the server sees: this process's connections, all of them pooled
