"""Errors pxd raises on purpose, all derived from `PxdError`.

`ConfigError` is for a user's input only (a config, a search space, a CLI flag): it names the field and
says what to do, and is raised before any compute is spent. A programming error is a plain exception
(`ValueError`, `TypeError`, ...), never a `ConfigError`.
"""

from __future__ import annotations

__all__ = ["PxdError", "ConfigError", "DatasetError", "DivergedError", "StudentRefused", "first_line"]


class PxdError(Exception):
    """Base of every error pxd raises on purpose (catch this to handle them all)."""


class ConfigError(PxdError, ValueError):
    """A config or search-space value is wrong. Raised before any compute is spent."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class DatasetError(ConfigError):
    """A dataset path is missing or not in the expected layout."""


class DivergedError(PxdError, RuntimeError):
    """A loss became NaN or infinite; the stage stops instead of producing a model."""


class StudentRefused(PxdError, ValueError):
    """A saved student pxd will not load: its weights do not match their recorded sha256, or it is not
    tensors (a pickled model, which would run code on load). The message names the student and what to do."""


def first_line(err: BaseException) -> str:
    """An exception as one line (its type and the first line of its message), for a one-line `ConfigError`."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"
