"""A plain mapping (YAML, `--set` overrides) → a typed, frozen dataclass, every value checked against
its type hint; errors name the dotted field (`student.depths.1`, `search.sampler.seed`).

The one typed parser of every config section, `search:` included (`orchestrator.space.search`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

from pxd.errors import ConfigError
from pxd.paths import join

__all__ = ["parse_dataclass"]


def parse_dataclass(cls: type, raw: Any, prefix: str = "") -> Any:
    """A dataclass from a plain mapping, every value checked against its type hint; nested dataclasses,
    `tuple[X, ...]`, `dict[str, X]` and optional fields included. Errors name the dotted field
    (`student.depths.1`, `search.sampler.seed`), `prefix` being the path of `raw` itself."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(prefix or "config", f"expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in raw if key not in known]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(join(prefix, unknown[0]), f"unknown key; {hint}known keys here: {', '.join(known)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for name in required:
        if name not in raw:
            raise ConfigError(join(prefix, name), f"missing; {cls.__name__} needs {', '.join(required)}")
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, join(prefix, name))
    return cls(**values)


def _coerce(hint: Any, value: Any, name: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return parse_dataclass(hint, value, prefix=name)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, name)
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(name, f"expected a mapping, got {value!r}")
        return {str(key): _coerce(args[1], item, join(name, key)) for key, item in value.items()}
    if hint is Any:
        return value
    if isinstance(value, dict):
        raise ConfigError(name, f"expected a single value, got a mapping {value!r} (distributions belong in a search space run by `pxd sweep`)")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(name, f"expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, join(name, i)) for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(name, f"expected a whole number, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads `5e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(name, f"expected a string, got {value!r}")
        return value
    return value
