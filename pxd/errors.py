"""Errors that speak to the user: which field was wrong and what to do about it."""

from __future__ import annotations

__all__ = ["ConfigError", "DatasetError", "DivergedError"]


class ConfigError(ValueError):
    """A config or search-space value is wrong. Raised before any compute is spent."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class DatasetError(ConfigError):
    """A dataset path is missing or not in the expected layout."""


class DivergedError(RuntimeError):
    """A loss became NaN or infinite; the stage stops instead of producing a model."""
