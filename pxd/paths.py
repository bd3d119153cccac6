"""Dotted paths into nested mappings and lists: one spelling everywhere.

`student.depths.1` names the second item of `student.depths`: in `--set` flags, search-space
parameters, Optuna, MLflow params, the frontier table and error messages alike (Ray Tune's
`flatten_dict` habit). The same three functions serve every place that needs a path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["join", "get_path", "set_path", "flatten"]

SEP = "."


def join(prefix: str, key: str | int) -> str:
    """`join("student.depths", 1)` → `student.depths.1`; an empty prefix gives the key alone."""
    return f"{prefix}{SEP}{key}" if prefix else str(key)


def _step(node: Any, part: str, path: str) -> Any:
    if isinstance(node, list):
        index = _index(node, part, path)
        return node[index]
    if isinstance(node, Mapping):
        if part not in node:
            raise KeyError(f"{path}: no key {part!r}")
        return node[part]
    raise KeyError(f"{path}: {part!r} is inside a value that is neither a mapping nor a list")


def _index(node: list[Any], part: str, path: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise KeyError(f"{path}: {part!r} is not an index of a list of {len(node)} items (0 … {len(node) - 1})")
    return int(part)


def get_path(tree: Any, path: str) -> Any:
    """The value at `path`; KeyError naming the path when it does not exist."""
    node = tree
    for part in path.split(SEP):
        node = _step(node, part, path)
    return node


def set_path(tree: dict[str, Any], path: str, value: Any, *, create: bool = False) -> None:
    """Set the value at `path`, list items included (`student.depths.1`).

    With `create`, missing mapping keys on the way are created as empty mappings (what `--set` needs
    to add a section); list indices must always exist. KeyError names the path otherwise.
    """
    *parents, last = path.split(SEP)
    node: Any = tree
    for part in parents:
        if create and isinstance(node, dict) and node.get(part) is None:
            node[part] = {}
        node = _step(node, part, path)
    if isinstance(node, list):
        node[_index(node, last, path)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise KeyError(f"{path}: cannot set {last!r} inside {node!r}, which is neither a mapping nor a list")


def flatten(tree: Mapping[str, Any], prefix: str = "", *, lists: bool = False) -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}. With `lists`, list items get their own paths (`a.0`)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = join(prefix, key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name, lists=lists))
        elif lists and isinstance(value, (list, tuple)):
            flat.update(flatten({str(i): item for i, item in enumerate(value)}, name, lists=lists))
        else:
            flat[name] = value
    return flat
