"""What a process keeps between runs: one `ProcessMemory`, created by the caller and passed in.

A worker process that runs trial after trial (a sweep's `search.reuse_actors`) keeps, in one object, the
teacher and assistant modules it built, the costs it counted before training, the latencies it timed and
its compiled upstream forward, so the next trial does not build, count, time or compile them again. The
caller owns the object: a run given none keeps nothing, and a test builds a fresh one instead of patching
module state. Tables are bounded where they hold modules or tensors; `remember` drops the least recently
used entry first.

Nothing here imports the rest of pxd (every module that fills a table imports this one), so the tables
are typed by what they hold in words.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["ProcessMemory", "remember"]

K = TypeVar("K")
V = TypeVar("V")


@dataclass
class ProcessMemory:
    """The tables one process keeps between runs (`pxd.pipeline.run_tas(..., memory=...)`).

    `upstream`: (stage kind, stage key) → (the `StageResult` a module was loaded from, that module). A kept
    module is used only when the provider hands out that same result object again (a store's verified
    in-memory copy, e.g. `orchestrator.stages.store`), so its weights are exactly the stage's. Upstream
    modules are only read (eval mode, no gradients) by the stages that distil from them; a stage that
    trains always builds a new module. Between runs they sit on the CPU. A module a CUDA run put in
    channels_last stays so (`train.channels_last` changes speed, not values, and is the same for every
    trial of a sweep).

    `static_costs`: architecture and input (a digest) → the `Cost` known before training
    (`pxd.cost.static_cost`); it depends on the architecture alone, never on the weights.

    `latency`: `LatencyCache` key → the timing measured or read from disk (`pxd.cost.LatencyCache`).

    `compiled_taps`: `torch.compile(forward_taps)`, one function for every upstream this process distils
    from (`pxd.train.upstream_forward`); None until a stage first asks for it.
    """

    upstream: dict[tuple[str, str], tuple[Any, Any]] = field(default_factory=dict)
    static_costs: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, dict[str, Any]] = field(default_factory=dict)
    compiled_taps: Callable[..., Any] | None = None
    upstream_limit: int = 4  # modules: a teacher and an assistant or two, on the CPU between runs
    static_cost_limit: int = 256


def remember(table: dict[K, V], key: K, value: V, limit: int) -> V:
    """Put `value` under `key` as the newest entry of `table` (a dict keeps insertion order), dropping the
    oldest entries beyond `limit`; returns `value`. Remembering a kept entry again makes it the newest, so
    the table drops the least recently used first."""
    table.pop(key, None)
    while table and len(table) >= limit:
        table.pop(next(iter(table)))
    table[key] = value
    return value
