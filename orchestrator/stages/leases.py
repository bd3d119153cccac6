"""Single-flight leases on stage keys: one trial trains a missing stage while the others wait.

`SqlLeases` keeps them in a SQL table every trial reaches (a SQLite file under the results root on one
machine, the sweep's Postgres on a cluster); `LocalLeases` within one process. The holder renews its
lease every TTL/3 (`_Heartbeat`); if it dies, the lease expires after `PXD_STAGE_LEASE_TTL_S` seconds
(default 60) and the next waiter takes over.

Database connections are pooled per process: every `SqlLeases` on the same URL in a process shares one
engine with at most `LEASE_POOL_SIZE + LEASE_MAX_OVERFLOW` connections, however many trials, stores and
heartbeats use it.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

__all__ = ["LocalLeases", "SqlLeases", "Leases", "Heartbeat", "lease_ttl_s", "lease_engine",
           "LEASE_POOL_SIZE", "LEASE_MAX_OVERFLOW"]

# A trial holds at most one connection at a time (its lease calls), plus its heartbeat thread's; a process
# seldom runs more than a couple of trials, so 2 + 2 leaves room without letting a node open dozens.
LEASE_POOL_SIZE = 2
LEASE_MAX_OVERFLOW = 2
TABLE = "pxd_stage_leases"

_engines: dict[tuple[int, str], Engine] = {}
_engines_lock = threading.Lock()


def lease_ttl_s() -> float:
    return float(os.environ.get("PXD_STAGE_LEASE_TTL_S", "60"))


def lease_engine(url: str) -> Engine:
    """The process's one engine for `url`, with the lease table created. Keyed by process id too, so a
    forked child never shares its parent's connections."""
    with _engines_lock:
        key = (os.getpid(), url)
        engine = _engines.get(key)
        if engine is None:
            engine = _create_engine(url)
            _engines[key] = engine
        return engine


def _create_engine(url: str) -> Engine:

    connect_args: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # one file shared by every process of the machine: wait for its write lock rather than fail, and let
        # a pooled connection move between a trial's threads (the heartbeat renews from its own thread)
        connect_args = {"timeout": 60, "check_same_thread": False}
    engine = sa.create_engine(
        url, connect_args=connect_args, pool_size=LEASE_POOL_SIZE, max_overflow=LEASE_MAX_OVERFLOW,
        pool_timeout=120, pool_pre_ping=True, pool_recycle=1800,
    )
    with engine.begin() as conn:
        conn.execute(sa.text(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (key VARCHAR(128) PRIMARY KEY, "
            "owner VARCHAR(256) NOT NULL, expires_at DOUBLE PRECISION NOT NULL)"
        ))
    return engine


class LocalLeases:
    """Leases within one process (tests, `pxd train`); same contract as `SqlLeases`."""

    def __init__(self) -> None:
        self._table: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str, owner: str, ttl_s: float) -> bool:
        with self._lock:
            holder = self._table.get(key)
            now = time.monotonic()
            if holder is None or holder[0] == owner or holder[1] < now:
                self._table[key] = (owner, now + ttl_s)
                return True
            return False

    renew = acquire

    def release(self, key: str, owner: str) -> None:
        with self._lock:
            if self._table.get(key, ("",))[0] == owner:
                del self._table[key]

    def holder(self, key: str) -> str | None:
        with self._lock:
            holder = self._table.get(key)
            return holder[0] if holder and holder[1] >= time.monotonic() else None


class SqlLeases:
    """Leases in a SQL table every trial can reach: a SQLite file under the results root on one machine,
    the sweep's Postgres on a cluster. Acquire is one atomic upsert, so exactly one owner wins.

    Expiry uses wall-clock time: nodes must keep their clocks in sync (NTP) to well within the TTL.
    """

    TABLE = TABLE

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine = lease_engine(url)

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"])

    def acquire(self, key: str, owner: str, ttl_s: float) -> bool:

        now = time.time()
        with self._engine.begin() as conn:
            conn.execute(sa.text(
                f"INSERT INTO {TABLE} (key, owner, expires_at) VALUES (:key, :owner, :expires) "
                f"ON CONFLICT (key) DO UPDATE SET owner = :owner, expires_at = :expires "
                f"WHERE {TABLE}.owner = :owner OR {TABLE}.expires_at < :now"
            ), {"key": key, "owner": owner, "expires": now + ttl_s, "now": now})
            holder = conn.execute(sa.text(f"SELECT owner FROM {TABLE} WHERE key = :key"), {"key": key}).scalar()
        return holder == owner

    def renew(self, key: str, owner: str, ttl_s: float) -> bool:
        return self.acquire(key, owner, ttl_s)

    def release(self, key: str, owner: str) -> None:

        with self._engine.begin() as conn:
            conn.execute(sa.text(f"DELETE FROM {TABLE} WHERE key = :key AND owner = :owner"),
                         {"key": key, "owner": owner})

    def holder(self, key: str) -> str | None:

        with self._engine.begin() as conn:
            row = conn.execute(sa.text(f"SELECT owner, expires_at FROM {TABLE} WHERE key = :key"), {"key": key}).first()
        return str(row[0]) if row and row[1] >= time.time() else None


Leases = LocalLeases | SqlLeases  # one contract: acquire, renew, release, holder


class Heartbeat:
    """Renews a lease in the background while the holder trains."""

    def __init__(self, leases: Leases, key: str, owner: str, ttl_s: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(leases, key, owner, ttl_s), daemon=True)

    def _run(self, leases: Leases, key: str, owner: str, ttl_s: float) -> None:
        while not self._stop.wait(ttl_s / 3):
            leases.renew(key, owner, ttl_s)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
