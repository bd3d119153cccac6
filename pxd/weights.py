"""Weights into a model: a local weights file (`teacher.checkpoint`, `student.checkpoint`), and the same
architecture's weights built for another input size (`init_from`: the student starting from its
assistant).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from torch import nn

from pxd.errors import ConfigError, first_line

__all__ = ["load_checkpoint", "init_from"]

# Prefixes added by DataParallel/DDP ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _unwrap_state_dict(loaded: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(loaded, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not isinstance(loaded, Mapping) or not loaded:
        return None
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        return None
    state = dict(loaded)
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> str:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    reshaped = [
        f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(given))
        if given[k].shape != expected[k].shape
    ]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", reshaped)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            parts.append(f"{len(keys)} {label}: {', '.join(keys[:3])}{more}")
    return "; ".join(parts)


def load_checkpoint(model: nn.Module, path: str | Path, field: str = "model") -> None:
    """Load a local weights file into `model`: a state_dict, or a dict holding one under
    "state_dict" or "model". Anything that does not fit exactly is one `ConfigError`."""
    name = f"{field}.checkpoint"
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(name, f"{path} is not a file")
    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - on arbitrary bytes torch.load raises many types, even IndexError
        raise ConfigError(name, f"{path} is not a readable PyTorch weights file ({first_line(err)})") from err
    state = _unwrap_state_dict(loaded)
    if state is None:
        raise ConfigError(name, f"{path} holds no state_dict (expected one, or a dict with 'state_dict' or 'model')")
    problem = _mismatch(model.state_dict(), state)
    if problem:
        raise ConfigError(
            name,
            f"{path} does not fit this model ({problem}); it must come from the same arch, "
            "resolution/patch size, depths/widths and number of classes",
        )
    model.load_state_dict(state)


def init_from(source: dict[str, torch.Tensor], model: nn.Module) -> list[str]:
    """Copy weights from the same architecture built for another input size; returns the names copied.

    Tensors whose shape depends on the input size (a ViT's position embedding and, when the patch size
    differs, its patch projection) are resampled with timm's own helpers; anything else that does not
    match is left as initialised.
    """
    target = model.state_dict()
    copied: dict[str, torch.Tensor] = {}
    for name, value in source.items():
        if name not in target:
            continue
        wanted = target[name].shape
        if value.shape == wanted:
            copied[name] = value
        elif name.endswith("pos_embed") and value.ndim == 3 and hasattr(model, "patch_embed"):
            copied[name] = resample_abs_pos_embed(
                value, new_size=list(model.patch_embed.grid_size),
                num_prefix_tokens=getattr(model, "num_prefix_tokens", 1),
            )
        elif name.endswith("patch_embed.proj.weight") and value.ndim == 4 and value.shape[:2] == wanted[:2]:
            copied[name] = resample_patch_embed(value, new_size=list(wanted[-2:]))
    model.load_state_dict(copied, strict=False)
    return sorted(copied)
