"""Requests to the tracking server that survive its restart: an answer cut off mid-body is asked again.

MLflow's client retries a request whose connection fails or whose status is transient, every method
included (urllib3's `Retry` with `allowed_methods=None`). It does not retry when the server dies while its
answer's body is on the wire: the headers came, the body broke off (`requests.exceptions.ChunkedEncodingError`,
"IncompleteRead"), and the call fails with an `MlflowException`. In a trial that is a failed attempt, retried
by Tune from the start (seen under load in the server-restart fault test). `install_body_retries` makes MLflow's
request function ask again, with MLflow's own retry count and backoff, on that error alone.

Asking again repeats a write the server may have committed before it died. pxd's writes are safe to repeat:
params and tags with the same values, metrics (the same value at the same step), terminating a run, searches
and reads; a run creation leaves no second run (`orchestrator.results.run_creation`). `watch_retries` says
whether a request was sent more than once (MLflow's own retries, seen in urllib3's retry history, or these),
so a run creation searches for a second run only when there can be one.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import requests
from mlflow.utils import request_utils, rest_utils

__all__ = ["install_body_retries", "watch_retries", "with_body_retries"]

logger = logging.getLogger(__name__)
_MARK = "__pxd_body_retries__"
_BACKOFF_MAX_S = 60.0
# the requests sent more than once within the innermost `watch_retries` block of this thread; None: no block
_RETRIED: ContextVar[list[str] | None] = ContextVar("pxd_retried_requests", default=None)


@contextmanager
def watch_retries() -> Iterator[list[str]]:
    """Within the block, "METHOD url" of each request of this thread that was sent more than once. Where
    `install_body_retries` is not in force nothing can be watched: the list then says so, non-empty, so a
    caller that acts on a retry stays on the safe side."""
    retried: list[str] = [] if getattr(rest_utils._get_http_response_with_retries, _MARK, False) else ["unwatched"]
    token = _RETRIED.set(retried)
    try:
        yield retried
    finally:
        _RETRIED.reset(token)


def _note_retry(method: str, url: str) -> None:
    retried = _RETRIED.get()
    if retried is not None:
        retried.append(f"{method} {url}")


def with_body_retries(send: Callable[..., Any]) -> Callable[..., Any]:
    """`send` (MLflow's `_get_http_response_with_retries(method, url, max_retries, backoff_factor, ...)`)
    asked again, up to `max_retries` more times with exponential backoff, when an answer's body breaks off."""
    if getattr(send, _MARK, False):
        return send

    @functools.wraps(send)
    def request(method: str, url: str, max_retries: int, backoff_factor: float, *args: Any, **kwargs: Any) -> Any:
        for attempt in range(int(max_retries) + 1):
            try:
                response = send(method, url, max_retries, backoff_factor, *args, **kwargs)
            except requests.exceptions.ChunkedEncodingError as exc:
                _note_retry(method, url)
                if attempt >= int(max_retries):
                    raise
                delay = min(max(float(backoff_factor), 0.1) * 2**attempt, _BACKOFF_MAX_S)
                logger.warning("the tracking server's answer to %s %s broke off (%s); asking again in %.1fs",
                               method, url, exc, delay)
                time.sleep(delay)
                continue
            # urllib3 keeps the attempts it retried (MLflow's own retries) on the response
            if getattr(getattr(getattr(response, "raw", None), "retries", None), "history", ()):
                _note_retry(method, url)
            return response
        raise AssertionError("unreachable")

    setattr(request, _MARK, True)
    return request


def install_body_retries() -> None:
    """Make MLflow's REST calls in this process ask again when an answer breaks off (idempotent)."""
    for module in (rest_utils, request_utils):
        send = getattr(module, "_get_http_response_with_retries", None)
        if send is None:  # a later MLflow moved it: its own retries still apply
            logger.warning("MLflow has no %s._get_http_response_with_retries; answers that break off are not "
                           "asked again", module.__name__)
            continue
        module._get_http_response_with_retries = with_body_retries(send)
