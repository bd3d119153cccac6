"""Passwords in database and tracking URLs stay out of everything pxd writes.

A user may pass `--optuna-storage postgresql+psycopg2://pxd:PASSWORD@db:5432/optuna`, or a tracking URL
with `user:password@`. pxd connects with the URL as given, but no copy it stores or shows holds the
password:

- MLflow tags and printed lines show `redact(url)` (`pxd:***@db`);
- error texts recorded on runs pass through `scrub`, which masks every password this process was given;
- the Optuna storage is a `PrivateRDBStorage`: Tune pickles the searcher (`searcher-state-*.pkl`,
  `tuner.pkl`) and with it the storage, whose pickle holds the URL without its password. When it is
  unpickled (`--resume`), the password comes back from the URL the driver was given again on the command
  line; without one, the driver (libpq) reads it from `PGPASSWORD` or `~/.pgpass`, as any Postgres client.

Trials receive the full URLs in their `TrialContext`, through Ray's object store (never written to the
sweep's folder), and register them here so their error texts are scrubbed too.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

import optuna

__all__ = ["MASK", "PrivateRDBStorage", "full_url", "redact", "remember", "scrub", "without_password"]

MASK = "***"
_full_urls: dict[str, str] = {}  # password-free URL → the URL as given, for this process only
_passwords: set[str] = set()


def _split(url: str) -> tuple[str, str, str | None]:
    """(the URL before the password, after it, the password) of `scheme://user:password@host/...`."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url, "", None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    head = f"{parts.scheme}://{user}"
    tail = urllib.parse.urlunsplit(("", hostport, parts.path, parts.query, parts.fragment)).removeprefix("//")
    return head, f"@{tail}", userinfo.split(":", 1)[1]


def redact(url: str) -> str:
    """The URL to show: its password, if any, replaced by `***`."""
    head, tail, password = _split(url)
    return url if password is None else f"{head}:{MASK}{tail}"


def without_password(url: str) -> str:
    """The URL to keep (pickles, links): its password left out."""
    head, tail, password = _split(url)
    return url if password is None else f"{head}{tail}"


def remember(url: str | None) -> None:
    """Note the URL's password in this process: `scrub` masks it and `PrivateRDBStorage` restores it."""
    if not url:
        return
    password = _split(url)[2]
    if password is None:
        return
    _full_urls[without_password(url)] = url
    _passwords.update({password, urllib.parse.unquote(password)} - {""})


def full_url(url: str) -> str:
    """The URL as given to this process (password included) for its password-free form, else `url`."""
    return _full_urls.get(url, url)


def scrub(text: str) -> str:
    """`text` with every remembered password masked (error messages may quote a URL)."""
    for password in sorted(_passwords, key=len, reverse=True):
        text = text.replace(password, MASK)
    return text


class PrivateRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage, pickled without the password of its URL (see the module's docstring)."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        remember(url)
        super().__init__(url, **kwargs)

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state["url"] = without_password(state["url"])
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__({**state, "url": full_url(state["url"])})
