"""Every random stream a stage's training draws from, saved with its training state and restored from it."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["rng_states", "set_rng_states"]


def rng_states(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    """The data order and augmentation (`generator`), dropout and other layers (torch's global CPU and CUDA
    streams), and numpy's and Python's global streams. Plain types and tensors only, so the state loads
    with `torch.load(weights_only=True)`."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_key = numpy_state["state"]["key"].tolist()
    return {
        "data": generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {**numpy_state, "state": {"key": numpy_key, "pos": numpy_state["state"]["pos"]}},
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any], generator: torch.Generator, device: torch.device) -> None:
    """Every stream back where `rng_states` found it."""
    generator.set_state(states["data"])
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"], device)
    numpy_state = states["numpy"]
    np.random.set_state({**numpy_state, "state": {"key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32),
                                                 "pos": numpy_state["state"]["pos"]}})
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
