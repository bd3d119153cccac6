"""Which trial failures would repeat if the trial ran again (then Tune does not retry it; see
`orchestrator.driver.attempts`)."""

from __future__ import annotations

from pxd.errors import PxdError

__all__ = ["WILL_REPEAT", "will_repeat"]

WILL_REPEAT: tuple[type[BaseException], ...] = (PxdError,)


def will_repeat(exc: BaseException) -> bool:
    """Whether running the trial again would fail the same way (then it is not retried). A pxd error that
    says it is `transient` (a stage store still unreachable after its own retries) is retried."""
    return isinstance(exc, WILL_REPEAT) and not getattr(exc, "transient", False)
