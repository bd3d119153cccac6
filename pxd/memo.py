"""Small tables a process keeps between runs (stage checkpoints, upstream modules, static costs)."""

from __future__ import annotations

from typing import TypeVar

__all__ = ["remember"]

K = TypeVar("K")
V = TypeVar("V")


def remember(table: dict[K, V], key: K, value: V, limit: int) -> V:
    """Put `value` under `key` as the newest entry of `table` (a dict keeps insertion order), dropping the
    oldest entries beyond `limit`; returns `value`. Remembering a kept entry again makes it the newest, so
    the table drops the least recently used first."""
    table.pop(key, None)
    while table and len(table) >= limit:
        table.pop(next(iter(table)))
    table[key] = value
    return value
