"""Reading and writing stages on the tracking server: retries with backoff for transient failures, and the
environment knobs that tune them."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TypeVar

from pxd.errors import PxdError
from pxd.train import DEFAULT_CHECKPOINT_INTERVAL_S

__all__ = ["StageUnavailable", "with_retries", "checkpoint_interval_s", "env_float"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


class StageUnavailable(PxdError, RuntimeError):
    """A stored stage could not be read or written after every retry (network, artifact store, disk); the
    stage itself was left as it is, so a later attempt can use it."""

    transient = True  # the trial is retried (search.max_retries): the store may be back by then


def env_float(name: str, default: float, minimum: float) -> float:
    raw = os.environ.get(name)
    try:
        value = float(raw) if raw is not None else default
    except ValueError:
        value = float("nan")
    if not value >= minimum:
        raise ValueError(f"{name}={raw!r}: expected a number ≥ {minimum:g} (unset: {default:g})")
    return value


def checkpoint_interval_s() -> float:
    """Seconds between training-state checkpoints of a stage (`PXD_STAGE_CHECKPOINT_INTERVAL_S`; 0: every epoch)."""

    return env_float("PXD_STAGE_CHECKPOINT_INTERVAL_S", DEFAULT_CHECKPOINT_INTERVAL_S, 0.0)


def with_retries(action: Callable[[], T], what: str) -> T:
    """`action()`, retried with exponential backoff on any exception: `PXD_STAGE_IO_ATTEMPTS` tries (default 5),
    waiting `PXD_STAGE_IO_BACKOFF_S` (default 2) seconds, doubled after each try, at most 60."""
    attempts = int(env_float("PXD_STAGE_IO_ATTEMPTS", 5, 1))
    delay = env_float("PXD_STAGE_IO_BACKOFF_S", 2.0, 0.0)
    for attempt in range(1, attempts):
        try:
            return action()
        except Exception as exc:  # noqa: BLE001 - logged, and the last try below raises
            logger.warning("could not %s (attempt %d of %d, retrying in %.1fs): %s",
                           what, attempt, attempts, delay, exc)
            time.sleep(delay)
            delay = min(delay * 2, 60.0)
    try:
        return action()
    except Exception as exc:  # noqa: BLE001 - re-raised as the error the trial fails with
        raise StageUnavailable(
            f"could not {what} after {attempts} attempts: {type(exc).__name__}: {exc}; the stage was left as "
            "it is: check the tracking server, its artifact store and the local temp disk, then retry "
            "(PXD_STAGE_IO_ATTEMPTS / PXD_STAGE_IO_BACKOFF_S set the retries)"
        ) from exc
